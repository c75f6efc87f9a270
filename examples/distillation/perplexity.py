"""Token-weighted perplexity and bits per character of causal language models on held-out data:
the library behind evaluate.py (the command) and the trainer's --eval_data.

Perplexity = exp(total NLL / number of predicted tokens), over every token after the first of
each document (the `</s>` closing a document is predicted too). It compares models that share a
tokenizer only: a token is another unit in another vocabulary.

Bits per character = total NLL / ln 2 / the number of characters of the original text, and bits
per byte the same over its UTF-8 bytes. The characters are counted on the text as read, before any
normalisation (NFKC, lowercasing): a document's lines (each without its line break, undecodable
bytes as U+FFFD) joined by "\n" (--unit line: each line), whatever the tokenizer. So two models with
different vocabularies, each scoring the text with its own tokenizer, are divided by the same number
and compare. Binarized data holds no text: it has no character count and no bits per character.

Text is tokenized as data_prep/binarize.py does for a sentencepiece (rinna-layout) tokenizer (NFKC +
lowercase, each line encoded separately, `<s> ... </s>` per document); binarize.py output is read as
it is; any other transformers tokenizer (a byte-level BPE, say) encodes each line as it is
(TokenizerEncoder). A document longer than the window is scored with a sliding window: each token
exactly once, with at least max_length - stride tokens of context.
"""

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from distil_ja import hub, shards
from distil_ja.cli import DataError, UsageError, first_line
from distil_ja.text_checks import TextChecks
from distil_ja.tokenization import (DocumentEncoder, expand_paths, iter_documents, load_tokenizer,
                                    normalize_text)
from models import max_positions

logger = logging.getLogger("distillation.evaluate")


# ---- data -------------------------------------------------------------------------------


class TokenizerEncoder:
    """The document encoder of a transformers tokenizer without a spiece.model: a byte-level BPE
    (GPT-2, Qwen), a cased sentencepiece saved as tokenizer.json (llm-jp), or a rinna-layout folder
    saved by transformers 5 (tokenizer.json only). Same interface as DocumentEncoder.

    Each line is encoded on its own with no special tokens, as DocumentEncoder does. The text is
    lowercased and NFKC'd first only where the tokenizer says so (`do_lower_case` in its config:
    rinna's and make_tokenizer.py's; transformers itself ignores it); any other tokenizer sees the
    text as it is, with its own normaliser. A document starts with the tokenizer's bos token, or,
    where it has none (Qwen), with its eos token, which such models are trained to read as a
    document boundary (lm-evaluation-harness's prefix for the same case); it ends with eos.
    """

    def __init__(self, name_or_dir):
        self.tok = load_tokenizer(name_or_dir)  # with data_prep's unk-id fix
        self.lowercase = bool(self.tok.init_kwargs.get("do_lower_case", False))
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id
        self.unk_id = self.tok.unk_token_id if self.tok.unk_token_id is not None else -1  # byte-level: no unknowns
        if self.eos_id is None:
            raise UsageError(f"tokenizer {name_or_dir!r} defines no end-of-text token (</s>, <|endoftext|>)")

    def encode_batch(self, lines):
        if not lines:
            return []
        texts = [normalize_text(line) for line in lines] if self.lowercase else list(lines)
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def encode_lines(self, lines):
        return [i for ids in self.encode_batch(lines) for i in ids]

    def encode_document(self, lines, unit="doc"):
        ids = self.encode_batch(lines)
        if unit == "doc":
            return [[self.bos_id] + [i for line in ids for i in line] + [self.eos_id]]
        return [[self.bos_id] + line + [self.eos_id] for line in ids if line]


def document_encoder(tokenizer: str):
    """data_prep's DocumentEncoder (what binarize.py uses) for a hub name or folder with a
    spiece.model; any other tokenizer (a folder or hub name without one: Qwen's, GPT-2's) gets the
    TokenizerEncoder of its transformers tokenizer."""
    try:
        return DocumentEncoder(tokenizer)
    except OSError:  # FileNotFoundError: a folder without spiece.model; OSError: a hub repo without one
        if hub.looks_local(tokenizer) and not Path(tokenizer).is_dir():
            raise
    encoder = TokenizerEncoder(tokenizer)
    logger.info("%s has no spiece.model: tokenizing each line through transformers (%s)", tokenizer,
                "NFKC + lowercase first, as its config says" if encoder.lowercase else "the text as it is")
    return encoder


def load_encoder(tokenizer: str):
    """document_encoder(tokenizer), an unloadable tokenizer being one line (UsageError)."""
    try:
        return document_encoder(tokenizer)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {tokenizer!r}: {first_line(err)}") from err


EVAL_ALLOW_HINT = "or pass --allow_bad_text to score it anyway"


@dataclass
class EvalData:
    """Held-out token sequences and, where they come from text, the size of the text each one holds.

    chars[i] / utf8_bytes[i]: the characters / UTF-8 bytes of sequence i's original text (see the
    module docstring for what counts); None when any of the data is binarized (no text to count).
    """

    sequences: list[np.ndarray]
    chars: list[int] | None = None
    utf8_bytes: list[int] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def share(self, rank: int, world_size: int) -> "EvalData":
        """The sequences rank r of world_size scores (r, r + W, ...), with their text sizes."""
        part = slice(rank, None, world_size)
        return EvalData(self.sequences[part], None if self.chars is None else self.chars[part],
                        None if self.utf8_bytes is None else self.utf8_bytes[part])


def text_units(doc: list[str], unit: str = "doc") -> list[list[str]]:
    """The lines of each sequence a document gives: all of them (unit doc) or one each (unit line).
    A sequence's original text, what bits per character divides by, is its lines joined by "\n"."""
    return [doc] if unit == "doc" else [[line] for line in doc]


def read_eval_data(data, tokenizer: str | None = None, unit: str = "doc", allow_bad_text: bool = False,
                   allow_hint: str = EVAL_ALLOW_HINT) -> EvalData:
    """Token sequences of held-out data, binarize.py output or text tokenized like binarize.py, and the
    size of the original text of each (text only).

    data: a path or a list of paths (text files/folders, a binarize.py folder, .pickle shards).
    Text goes through binarize's bad-text rules (distil_ja.text_checks): a file of undecodable lines,
    or <unk> over the limit, is a DataError, unless allow_bad_text (allow_hint says how to give it).
    A sequence of fewer than 2 tokens predicts nothing: it is dropped, and its text with it.
    """
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise DataError("no evaluation data given")
    sequences, texts, encoder = [], [], None
    text_files = [f for path in map(Path, paths) if path.exists() and not shards.is_binarized(path)
                  for f in expand_paths(str(path))]
    checks = TextChecks(text_files, allow_bad_text, allow_hint)
    binarized = False
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if shards.is_binarized(path):
            found = shards.load_sequences([path])[0]
            sequences += found
            texts += [None] * len(found)
            binarized = True
            continue
        if tokenizer is None:
            raise UsageError(f"{path} is text: name the tokenizer that binarized the training data")
        if encoder is None:
            encoder = load_encoder(tokenizer)
        n_before = len(sequences)
        try:
            for file in expand_paths(str(path)):
                index = checks.files.index(file)
                for doc in iter_documents(file, functools.partial(checks.file_read, index)):
                    for lines in text_units(doc, unit):
                        encoded = encoder.encode_document(lines, unit)  # one sequence, or none for an empty line
                        checks.add_sequences(index, encoded, encoder.unk_id)
                        sequences += [np.asarray(s, dtype=np.int64) for s in encoded]
                        texts += ["\n".join(lines)] * len(encoded)
        except (OSError, EOFError, ValueError) as err:  # a truncated .xz/.gz raises ValueError too
            raise DataError(f"{path}: unreadable ({err})") from err
        logger.info("%s: %d sequences", path, len(sequences) - n_before)
    checks.check_unk()
    kept = [(np.asarray(s, dtype=np.int64), text) for s, text in zip(sequences, texts) if len(s) >= 2]
    if not kept:
        raise DataError(f"no document with at least 2 tokens in {', '.join(map(str, paths))}")
    if binarized:
        if text_files:
            logger.info("Some evaluation data is binarized (no text): no bits per character")
        return EvalData([s for s, _ in kept])
    return EvalData([s for s, _ in kept], [len(t) for _, t in kept], [len(t.encode("utf-8")) for _, t in kept])


# ---- scoring ----------------------------------------------------------------------------


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of `length` tokens: (begin, end, first_scored).

    Window tokens are [begin, end); targets first_scored..end-1 are scored in it, so every
    position 1..length-1 is scored exactly once.
    """
    if length <= max_length:
        return [(0, length, 1)]
    out, begin, prev_end = [], 0, 1
    while True:
        end = min(begin + max_length, length)
        out.append((begin, end, max(prev_end, begin + 1)))
        if end == length:
            return out
        prev_end, begin = end, begin + stride


def check_window(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise UsageError(f"--max_length must be >= 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise UsageError(f"--stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")


@torch.no_grad()
def perplexity(model, sequences, max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
               device=None, amp_dtype=None, progress: bool = False, pad_id: int = 0) -> dict:
    """Token-weighted perplexity of `model` on `sequences` (1-D int arrays or lists of ids).

    Returns {"nll_sum", "tokens", "perplexity"}: the summed NLL (nats) of every predicted
    token, their number, and exp(nll_sum / tokens) (nan when there is no token).
    max_length defaults to the model's context; stride to max_length // 2. Windows are
    right-padded (causal attention: real positions never see the padding). The model's
    train/eval mode is restored afterwards.
    """
    limit = max_positions(model.config)
    if max_length is None:
        max_length = limit or 1024
    if limit is not None and max_length > limit:
        logger.info("max_length %d > the model's context %d: using %d", max_length, limit, limit)
        if stride is not None and stride >= limit:
            stride = limit // 2
        max_length = limit
    stride = max_length // 2 if stride is None else stride
    check_window(max_length, stride)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    items = []  # (sequence index, begin, end, first scored)
    for i, seq in enumerate(sequences):
        items += [(i, *w) for w in windows(len(seq), max_length, stride)]
    items.sort(key=lambda item: item[2] - item[1])  # similar lengths together: less padding

    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="Scoring", unit="batch", disable=not progress):
            batch = items[start : start + batch_size]
            width = max(end - begin for _, begin, end, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for row, (i, begin, end, first) in enumerate(batch):
                ids[row, : end - begin] = torch.as_tensor(np.asarray(sequences[i][begin:end], dtype=np.int64))
                scored[row, first - begin - 1 : end - begin - 1] = True  # logit j predicts token j + 1
            ids, scored = ids.to(device), scored.to(device)
            with autocast:
                logits = model(input_ids=ids, use_cache=False).logits
            logits = logits[:, :-1][scored].float()
            nll_sum += F.cross_entropy(logits, ids[:, 1:][scored], reduction="sum").double()
            tokens += int(scored.sum())
    finally:
        model.train(was_training)
    nll = nll_sum.item()
    return {"nll_sum": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens) if tokens else float("nan")}


def bits_per_unit(nll_sum: float, units: int | None) -> float | None:
    """Bits per character (or byte): the summed NLL in nats / ln 2 / the text's characters (bytes).
    None where the text's size is unknown (binarized data) or zero."""
    return nll_sum / math.log(2) / units if units else None


def held_out_scores(model, data: EvalData, rank: int = 0, world_size: int = 1, **kwargs) -> dict:
    """perplexity() of `data` plus its bits per character and per byte, the sequences shared between
    the ranks of a process group (every rank must call it; each gets the totals over all of them).

    Returns {"nll_sum", "tokens", "perplexity", "chars", "bytes", "bits_per_char", "bits_per_byte"};
    the last four are None for binarized data. perplexity() scores every token after each
    sequence's first exactly once, windows or not, so the NLL and the characters cover the same text.
    """
    part = data.share(rank, world_size)
    out = perplexity(model, part.sequences, **kwargs)
    sizes = [0, 0] if part.chars is None else [sum(part.chars), sum(part.utf8_bytes)]
    nll, tokens = out["nll_sum"], out["tokens"]
    if world_size > 1:
        device = kwargs.get("device") or next(model.parameters()).device
        sums = torch.tensor([nll, tokens, *sizes], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        nll, tokens = sums[0].item(), int(round(sums[1].item()))
        sizes = [int(round(x)) for x in sums[2:].tolist()]
    chars, n_bytes = (None, None) if data.chars is None else sizes
    return {"nll_sum": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
            "chars": chars, "bytes": n_bytes, "bits_per_char": bits_per_unit(nll, chars),
            "bits_per_byte": bits_per_unit(nll, n_bytes)}
