"""Token-weighted perplexity of causal language models on held-out data: the library behind
evaluate.py (the command) and the trainer's --eval_data.

Perplexity = exp(total NLL / number of predicted tokens), over every token after the first of
each document (the `</s>` closing a document is predicted too). Text is tokenized exactly as
data_prep/binarize.py does (NFKC + lowercase, each line encoded separately, `<s> ... </s>` per
document); binarize.py output is read as it is. A document longer than the window is scored with
a sliding window: each token exactly once, with at least max_length - stride tokens of context.
"""

import contextlib
import functools
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from distil_ja import shards
from distil_ja.cli import DataError, UsageError, first_line
from distil_ja.text_checks import TextChecks
from distil_ja.tokenization import (DocumentEncoder, expand_paths, iter_documents, load_tokenizer,
                                    normalize_text)
from models import max_positions

logger = logging.getLogger("distillation.evaluate")


# ---- data -------------------------------------------------------------------------------


class _TransformersEncoder:
    """Fallback when a tokenizer folder has no spiece.model (transformers 5 saves only
    tokenizer.json): the transformers tokenizer on each normalized line, no special tokens,
    which gives the same ids as DocumentEncoder."""

    def __init__(self, name_or_dir):
        self.tok = load_tokenizer(name_or_dir)  # with data_prep's unk-id fix
        self.normalize = normalize_text
        self.bos_id, self.eos_id, self.unk_id = self.tok.bos_token_id, self.tok.eos_token_id, self.tok.unk_token_id
        if self.bos_id is None or self.eos_id is None:
            raise UsageError(f"tokenizer {name_or_dir!r} defines no <s> or </s>")

    def encode_batch(self, lines):
        return [self.tok(self.normalize(line), add_special_tokens=False)["input_ids"] for line in lines]

    def encode_lines(self, lines):
        return [i for ids in self.encode_batch(lines) for i in ids]

    def encode_document(self, lines, unit="doc"):
        ids = self.encode_batch(lines)
        if unit == "doc":
            return [[self.bos_id] + [i for line in ids for i in line] + [self.eos_id]]
        return [[self.bos_id] + line + [self.eos_id] for line in ids if line]


def document_encoder(tokenizer: str):
    """data_prep's DocumentEncoder (what binarize.py uses) for a hub name or folder."""
    try:
        return DocumentEncoder(tokenizer)
    except FileNotFoundError:
        if not Path(tokenizer).is_dir():
            raise
        logger.info("%s has no spiece.model: tokenizing through its tokenizer.json", tokenizer)
        return _TransformersEncoder(tokenizer)


def load_encoder(tokenizer: str):
    """document_encoder(tokenizer), an unloadable tokenizer being one line (UsageError)."""
    try:
        return document_encoder(tokenizer)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {tokenizer!r}: {first_line(err)}") from err


EVAL_ALLOW_HINT = "or pass --allow_bad_text to score it anyway"


def load_eval_sequences(data, tokenizer: str | None = None, unit: str = "doc", allow_bad_text: bool = False,
                        allow_hint: str = EVAL_ALLOW_HINT) -> list[np.ndarray]:
    """Token sequences of held-out data: binarize.py output, or text tokenized like binarize.py.

    data: a path or a list of paths (text files/folders, a binarize.py folder, .pickle shards).
    Text goes through binarize's bad-text rules (distil_ja.text_checks): a file of undecodable lines,
    or <unk> over the limit, is a DataError, unless allow_bad_text (allow_hint says how to give it).
    """
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise DataError("no evaluation data given")
    sequences, encoder = [], None
    text_files = [f for path in map(Path, paths) if path.exists() and not shards.is_binarized(path)
                  for f in expand_paths(str(path))]
    checks = TextChecks(text_files, allow_bad_text, allow_hint)
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if shards.is_binarized(path):
            sequences += shards.load_sequences([path])[0]
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
                    encoded = encoder.encode_document(doc, unit)
                    checks.add_sequences(index, encoded, encoder.unk_id)
                    sequences += [np.asarray(s, dtype=np.int64) for s in encoded]
        except (OSError, EOFError, ValueError) as err:  # a truncated .xz/.gz raises ValueError too
            raise DataError(f"{path}: unreadable ({err})") from err
        logger.info("%s: %d sequences", path, len(sequences) - n_before)
    checks.check_unk()
    sequences = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not sequences:
        raise DataError(f"no document with at least 2 tokens in {', '.join(map(str, paths))}")
    return sequences


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


def shared_perplexity(model, sequences, rank: int = 0, world_size: int = 1, **kwargs) -> dict:
    """perplexity() with the sequences shared between the ranks of a process group (every
    rank must call it); each rank gets the totals over all sequences."""
    out = perplexity(model, sequences[rank::world_size], **kwargs)
    if world_size > 1:
        device = kwargs.get("device") or next(model.parameters()).device
        sums = torch.tensor([out["nll_sum"], out["tokens"]], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        nll, tokens = sums[0].item(), int(round(sums[1].item()))
        out = {"nll_sum": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens) if tokens else float("nan")}
    return out
