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
printed side by side. The scoring itself lives in perplexity.py (the trainer's --eval_data
uses it too). Exit status: 0 done, 1 bad data, 2 bad arguments or unloadable model.
"""

import argparse
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from distil_ja import fileio  # noqa: E402
from distil_ja.cli import ArgumentParser, UsageError, run_command, setup_logging  # noqa: E402
from models import load_causal_lm  # noqa: E402
from perplexity import check_window, load_eval_sequences, perplexity  # noqa: E402
from utils import silence_attention_mask_advice  # noqa: E402

logger = logging.getLogger("distillation.evaluate")


def parse_model_arg(value: str) -> tuple[str, str]:
    """`LABEL=PATH_OR_NAME` or `PATH_OR_NAME` (labelled by itself)."""
    label, sep, target = value.partition("=")
    if sep and label and target and not Path(value).exists() and "/" not in label:
        return label, target
    return value, value


def format_table(rows: dict[str, dict]) -> str:
    width = max([len("model")] + [len(k) for k in rows])
    lines = [f"{'model':<{width}}  {'tokens':>9}  {'nll/token':>9}  {'perplexity':>10}"]
    for label, r in rows.items():
        nll = r["nll_sum"] / r["tokens"] if r["tokens"] else float("nan")
        lines.append(f"{label:<{width}}  {r['tokens']:>9d}  {nll:>9.4f}  {r['perplexity']:>10.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="Model folder or hub name, optionally LABEL=...; repeat for a side-by-side table.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer (hub name or folder) for text data; default: the first model's folder.")
    parser.add_argument("--data", nargs="+", required=True, help="Text files/folders or binarize.py output.")
    parser.add_argument("--unit", choices=("doc", "line"), default="doc",
                        help="Text sequences per document (rinna, default) or per line, as binarize.py --unit.")
    parser.add_argument("--allow_bad_text", action="store_true",
                        help="Score text over binarize.py's limits (undecodable lines, <unk> rate) with a warning.")
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
        raise UsageError(f"--device {args.device} but CUDA is not available")
    if args.stride is None:
        args.stride = args.max_length // 2
    check_window(args.max_length, args.stride)
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    models = [parse_model_arg(m) for m in args.model]
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate model labels: {labels}")
    tokenizer = args.tokenizer
    if tokenizer is None and Path(models[0][1]).is_dir():
        tokenizer = models[0][1]
    sequences = load_eval_sequences(args.data, tokenizer, args.unit, args.allow_bad_text)
    logger.info("Scoring %d sequences (%d tokens) with %d model(s) on %s", len(sequences),
                sum(len(s) for s in sequences), len(models), device)
    amp_dtype = torch.bfloat16 if args.bf16 else None
    rows = {}
    for label, target in models:
        model = load_causal_lm(target).to(device).eval()
        vocab = model.get_input_embeddings().num_embeddings
        top = max(int(s.max()) for s in sequences)
        if top >= vocab:
            raise UsageError(f"the data holds token id {top}, beyond {label}'s vocabulary ({vocab}): wrong tokenizer?")
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
        fileio.write_json(args.json, result)
        logger.info("Wrote %s", args.json)
    return result


def main(argv=None) -> int:
    setup_logging()
    silence_attention_mask_advice()

    def command(argv):
        run(build_parser().parse_args(argv))

    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())
