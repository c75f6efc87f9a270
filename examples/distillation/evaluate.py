#!/usr/bin/env python
"""Token-weighted perplexity of causal language models on held-out Japanese text.

    python examples/distillation/evaluate.py --model checkpoints/distilgpt2-ja \
        --model teacher=rinna/japanese-gpt2-medium --tokenizer rinna/japanese-gpt2-medium \
        --data data_prep/sample/ja_dev.txt [--max_length 1024] [--stride 512] [--bf16] [--json OUT]

Perplexity = exp(total NLL / number of predicted tokens), over every token after the
first of each document (the `</s>` closing a document is predicted too).

--data: rinna-layout text (one sentence per line, a blank line between documents; files or
directories of .txt/.txt.gz/.txt.xz) tokenized exactly as data_prep/binarize.py does
(NFKC + lowercase, each line encoded separately, `<s> ... </s>` per document), or
binarize.py output (a directory with manifest.json, or .pickle shards).

A document longer than --max_length is scored with a sliding window that moves by --stride
tokens: each token is scored exactly once, with at least max_length - stride tokens of
context (except near the start of the document).

--model may be given several times (`LABEL=DIR_OR_NAME` names a row); the models are
printed side by side. Exit status: 0 done, 1 bad data, 2 bad arguments or unloadable model.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data_prep
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lm_seqs_dataset when imported from elsewhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("distillation.evaluate")

EXIT_DATA, EXIT_USAGE = 1, 2
SHARD_SUFFIXES = (".pickle", ".pkl")


class EvalError(Exception):
    """Bad arguments, data or model for the evaluation; the message says which."""


class EvalDataError(EvalError):
    """Unusable evaluation data."""


# ---- data -------------------------------------------------------------------------------


class _TransformersEncoder:
    """Fallback when a tokenizer folder has no spiece.model (transformers 5 saves only
    tokenizer.json): the transformers tokenizer on each normalized line, no special tokens,
    which gives the same ids as DocumentEncoder."""

    def __init__(self, name_or_dir):
        from data_prep.tokenization import fix_unigram_unk_id, load_tokenizer, normalize_text

        self.tok = fix_unigram_unk_id(load_tokenizer(name_or_dir))
        self.normalize = normalize_text
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise EvalError(f"tokenizer {name_or_dir!r} defines no <s> or </s>")

    def encode_document(self, lines, unit="doc"):
        ids = [self.tok(self.normalize(line), add_special_tokens=False)["input_ids"] for line in lines]
        if unit == "doc":
            return [[self.bos_id] + [i for line in ids for i in line] + [self.eos_id]]
        return [[self.bos_id] + line + [self.eos_id] for line in ids if line]


def document_encoder(tokenizer: str):
    """data_prep's DocumentEncoder (what binarize.py uses) for a hub name or folder."""
    from data_prep.tokenization import DocumentEncoder

    try:
        return DocumentEncoder(tokenizer)
    except FileNotFoundError:
        if not Path(tokenizer).is_dir():
            raise
        logger.info("%s has no spiece.model: tokenizing through its tokenizer.json", tokenizer)
        return _TransformersEncoder(tokenizer)


def is_binarized(path: Path) -> bool:
    return (path.is_dir() and (path / "manifest.json").is_file()) or path.name.endswith(SHARD_SUFFIXES)


def load_eval_sequences(data, tokenizer: str | None = None, unit: str = "doc") -> list[np.ndarray]:
    """Token sequences of held-out data: binarize.py output, or text tokenized like binarize.py.

    data: a path or a list of paths (text files/folders, a binarize.py folder, .pickle shards).
    """
    from lm_seqs_dataset import DataError, load_sequences

    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise EvalDataError("no evaluation data given")
    sequences, encoder = [], None
    for path in map(Path, paths):
        if not path.exists():
            raise EvalDataError(f"{path}: no such file or directory")
        if is_binarized(path):
            try:
                sequences += load_sequences([str(path)])[0]
            except DataError as err:
                raise EvalDataError(str(err)) from err
            continue
        if tokenizer is None:
            raise EvalError(f"{path} is text: name the tokenizer that binarized the training data")
        if encoder is None:
            try:
                encoder = document_encoder(tokenizer)
            except (OSError, ValueError) as err:
                raise EvalError(f"cannot load tokenizer {tokenizer!r}: {err}") from err
        from data_prep.tokenization import iter_documents

        n_before = len(sequences)
        try:
            for doc in iter_documents(str(path)):
                sequences += [np.asarray(s, dtype=np.int64) for s in encoder.encode_document(doc, unit)]
        except (OSError, EOFError) as err:
            raise EvalDataError(f"{path}: unreadable ({err})") from err
        logger.info("%s: %d sequences", path, len(sequences) - n_before)
    sequences = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not sequences:
        raise EvalDataError(f"no document with at least 2 tokens in {', '.join(map(str, paths))}")
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


def model_max_length(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise EvalError(f"--max_length must be >= 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise EvalError(f"--stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")


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
    from tqdm import tqdm

    limit = model_max_length(model)
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
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
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
        import torch.distributed as dist

        device = kwargs.get("device") or next(model.parameters()).device
        sums = torch.tensor([out["nll_sum"], out["tokens"]], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        nll, tokens = sums[0].item(), int(round(sums[1].item()))
        out = {"nll_sum": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens) if tokens else float("nan")}
    return out


# ---- models -----------------------------------------------------------------------------


def parse_model_arg(value: str) -> tuple[str, str]:
    """`LABEL=PATH_OR_NAME` or `PATH_OR_NAME` (labelled by itself)."""
    label, sep, target = value.partition("=")
    if sep and label and target and not Path(value).exists() and "/" not in label:
        return label, target
    return value, value


def load_model(name_or_dir: str, device="cpu"):
    """A causal LM from a folder (export, dump_path) or a hub name, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"cannot load model {name_or_dir!r}: {first}") from err
    return model.to(device).eval()


def format_table(rows: dict[str, dict]) -> str:
    width = max([len("model")] + [len(k) for k in rows])
    lines = [f"{'model':<{width}}  {'tokens':>9}  {'nll/token':>9}  {'perplexity':>10}"]
    for label, r in rows.items():
        nll = r["nll_sum"] / r["tokens"] if r["tokens"] else float("nan")
        lines.append(f"{label:<{width}}  {r['tokens']:>9d}  {nll:>9.4f}  {r['perplexity']:>10.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="Model folder or hub name, optionally LABEL=...; repeat for a side-by-side table.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer (hub name or folder) for text data; default: the first model's folder.")
    parser.add_argument("--data", nargs="+", required=True, help="Text files/folders or binarize.py output.")
    parser.add_argument("--unit", choices=("doc", "line"), default="doc",
                        help="Text sequences per document (rinna, default) or per line, as binarize.py --unit.")
    parser.add_argument("--max_length", type=int, default=1024, help="Window length (capped at the model's context).")
    parser.add_argument("--stride", type=int, default=None, help="Window step for long documents (default: max_length // 2).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU).")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda when available)")
    parser.add_argument("--json", default=None, help="Write the numbers to this JSON file.")
    return parser


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device} but CUDA is not available")
    if args.stride is None:
        args.stride = args.max_length // 2
    check_window(args.max_length, args.stride)
    if args.batch_size < 1:
        raise EvalError(f"--batch_size must be >= 1, got {args.batch_size}")
    models = [parse_model_arg(m) for m in args.model]
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise EvalError(f"duplicate model labels: {labels}")
    tokenizer = args.tokenizer
    if tokenizer is None and Path(models[0][1]).is_dir():
        tokenizer = models[0][1]
    sequences = load_eval_sequences(args.data, tokenizer, args.unit)
    logger.info("Scoring %d sequences (%d tokens) with %d model(s) on %s", len(sequences),
                sum(len(s) for s in sequences), len(models), device)
    amp_dtype = torch.bfloat16 if args.bf16 else None
    rows = {}
    for label, target in models:
        model = load_model(target, device)
        vocab = model.get_input_embeddings().num_embeddings
        top = max(int(s.max()) for s in sequences)
        if top >= vocab:
            raise EvalError(f"the data holds token id {top}, beyond {label}'s vocabulary ({vocab}): wrong tokenizer?")
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        rows[label] = perplexity(model, sequences, args.max_length, args.stride, args.batch_size, device,
                                 amp_dtype, progress=True, pad_id=pad_id)
        rows[label]["model"] = target
        logger.info("%s: perplexity %.3f over %d tokens", label, rows[label]["perplexity"], rows[label]["tokens"])
        del model
    print(format_table(rows))
    result = {"perplexity": {k: r["perplexity"] for k, r in rows.items()}, "details": rows,
              "data": [str(d) for d in args.data], "tokenizer": tokenizer, "unit": args.unit,
              "max_length": args.max_length, "stride": args.stride, "bf16": args.bf16}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        logger.info("Wrote %s", args.json)
    return result


def main(argv=None) -> None:
    from utils import silence_attention_mask_advice

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    silence_attention_mask_advice()
    code = 0
    try:
        run(args)
    except EvalDataError as err:
        logger.error("%s", err)
        code = EXIT_DATA
    except EvalError as err:
        logger.error("%s", err)
        code = EXIT_USAGE
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
