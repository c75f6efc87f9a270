#!/usr/bin/env python
"""Perplexity and bits per character on held-out Japanese text, and multiple-choice task accuracy, of causal
language models.

    python examples/distillation/evaluate.py --model checkpoints/distilgpt2-ja \
        --model teacher=rinna/japanese-gpt2-medium --tokenizer rinna/japanese-gpt2-medium \
        --data data_prep/sample/ja_dev.txt [--max_length 1024] [--stride 512] [--bf16] [--json OUT]
    python examples/distillation/evaluate.py --model student=checkpoints/distilgpt2-ja \
        --model teacher=models/Qwen2.5-0.5B --data data_prep/sample/ja_dev.txt   # each its own tokenizer
    python examples/distillation/evaluate.py --model student=checkpoints/distilgpt2-ja \
        --model teacher=rinna/japanese-gpt2-medium --task jcommonsenseqa --task_data valid-v1.3.json \
        [--num_fewshot 3 --fewshot_data train-v1.3.json [--fewshot_seed 1234]] [--bf16] [--json OUT]

Perplexity = exp(total NLL / number of predicted tokens), over every token after the
first of each document (the `</s>` closing a document is predicted too). It compares models of one
tokenizer only. Bits per character (per byte) = total NLL / ln 2 / the characters (UTF-8 bytes) of
the original text, counted before any normalisation: each document's lines joined by "\n". It is
the same denominator whatever the tokenizer, so it compares models with different vocabularies, each
scoring the text with its own tokenizer. Binarized data has no text: no bits per character.

Each model's tokenizer (for text data and tasks): its `--tokenizer LABEL=TOK`, else a plain
`--tokenizer TOK`, else the model's own folder or hub name where it holds a tokenizer, else the first
model's folder. A sentencepiece (rinna-layout) tokenizer reads the text as binarize.py does; any
other transformers tokenizer (a byte-level BPE, say) reads each line as it is.

--data: rinna-layout text (one sentence per line, a blank line between documents; files or
directories of .txt/.txt.gz/.txt.xz) tokenized exactly as data_prep/binarize.py does
(NFKC + lowercase, each line encoded separately, `<s> ... </s>` per document), or
binarize.py output (a directory with manifest.json, or .pickle shards).

A document longer than --max_length is scored with a sliding window that moves by --stride
tokens: each token is scored exactly once, with at least max_length - stride tokens of
context (except near the start of the document).

--task NAME (built in: jcommonsenseqa, jnli; see task_defs/) or --task_def FILE.json (any
multiple-choice JSON lines, described by a task definition) with --task_data FILE (JGLUE's own
JSON-lines file): accuracy by log-likelihood of the choices, its length-normalised variant, their
standard errors, the number of items and the chance level; the prompt's id is in every result.
--data and --task may be given together; at least one of them.

--model may be given several times (`LABEL=DIR_OR_NAME` names a row); the models are
printed side by side. The scoring itself lives in perplexity.py and tasks.py (the trainer's
--eval_data and --eval_tasks use them too). Exit status: 0 done, 1 bad data, 2 bad arguments or
unloadable model.
"""

import argparse
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from distil_ja import fileio, hub, shards  # noqa: E402
from distil_ja.cli import ArgumentParser, UsageError, run_command, setup_logging  # noqa: E402
from models import load_causal_lm  # noqa: E402
from perplexity import check_window, held_out_scores, load_encoder, read_eval_data  # noqa: E402
from records import HELD_OUT_PER_TEXT  # noqa: E402
from tasks import DEFAULT_FEWSHOT_SEED, builtin_tasks, evaluate_task, load_task_def, prepare_task  # noqa: E402
from utils import silence_attention_mask_advice  # noqa: E402

logger = logging.getLogger("distillation.evaluate")


def parse_model_arg(value: str) -> tuple[str, str]:
    """`LABEL=PATH_OR_NAME` or `PATH_OR_NAME` (labelled by itself)."""
    label, sep, target = value.partition("=")
    if sep and label and target and not Path(value).exists() and "/" not in label:
        return label, target
    return value, value


def format_table(rows: dict[str, dict]) -> str:
    """The perplexity table; a tokenizer column, and a line saying what compares, where tokenizers differ."""
    width = max([len("model")] + [len(k) for k in rows])
    tokenizers = {r.get("tokenizer") for r in rows.values()}
    tok_width = max(len("tokenizer"), *(len(str(t)) for t in tokenizers))
    tok_head = f"  {'tokenizer':<{tok_width}}" if len(tokenizers) > 1 else ""
    lines = [f"{'model':<{width}}{tok_head}  {'tokens':>9}  {'nll/token':>9}  {'perplexity':>10}  {'bits/char':>9}  "
             f"{'bits/byte':>9}"]
    for label, r in rows.items():
        nll = r["nll_sum"] / r["tokens"] if r["tokens"] else float("nan")
        tok = f"  {str(r.get('tokenizer')):<{tok_width}}" if tok_head else ""
        per_text = "".join(f"  {'–' if r.get(k) is None else format(r[k], '.4f'):>9}"
                           for k in ("bits_per_char", "bits_per_byte"))
        lines.append(f"{label:<{width}}{tok}  {r['tokens']:>9d}  {nll:>9.4f}  {r['perplexity']:>10.3f}{per_text}")
    first = next(iter(rows.values()))
    if first.get("chars") is not None:
        lines.append(f"bits over {first['chars']:,} characters ({first['bytes']:,} UTF-8 bytes) of the original text"
                     + ("; tokenizers differ: perplexity compares only rows of one tokenizer, bits/char and "
                        "bits/byte compare all" if tok_head else ""))
    elif tok_head:
        lines.append("tokenizers differ and the data is binarized (no text, no bits/char): the rows do not compare")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="Model folder or hub name, optionally LABEL=...; repeat for a side-by-side table.")
    parser.add_argument("--tokenizer", action="append", default=None,
                        help="Tokenizer (hub name or folder) for text data and tasks: TOK for every model, or "
                             "LABEL=TOK for one (repeat); default: each model's own folder or hub name where it "
                             "holds a tokenizer, else the first model's folder.")
    parser.add_argument("--data", nargs="+", default=None, help="Text files/folders or binarize.py output (perplexity).")
    task = parser.add_argument_group("multiple-choice tasks (tasks.py)")
    choose = task.add_mutually_exclusive_group()
    choose.add_argument("--task", default=None, help=f"A built-in task ({', '.join(builtin_tasks())}) or a task definition file.")
    choose.add_argument("--task_def", default=None, help="A task definition JSON file (any multiple-choice JSON lines).")
    task.add_argument("--task_data", default=None, help="The task's JSON-lines file (e.g. JGLUE's valid-v1.3.json).")
    task.add_argument("--num_fewshot", type=int, default=0, help="Solved examples before each question (default 0).")
    task.add_argument("--fewshot_data", default=None, help="JSON-lines file the examples are drawn from (e.g. train).")
    task.add_argument("--fewshot_seed", type=int, default=DEFAULT_FEWSHOT_SEED,
                      help=f"Seed of the examples' draw (default {DEFAULT_FEWSHOT_SEED}); each item's depends on it and its index only.")
    parser.add_argument("--unit", choices=("doc", "line"), default="doc",
                        help="Text sequences per document (rinna, default) or per line, as binarize.py --unit.")
    parser.add_argument("--allow_bad_text", action="store_true",
                        help="Score text over binarize.py's limits (undecodable lines, <unk> rate) with a warning.")
    parser.add_argument("--max_length", type=int, default=1024, help="Window length (capped at the model's context).")
    parser.add_argument("--stride", type=int, default=None, help="Window step for long documents (default: max_length // 2).")
    parser.add_argument("--batch_size", type=int, default=4, help="Windows (perplexity) or choices (tasks) per forward.")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU).")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda when available)")
    parser.add_argument("--json", default=None, help="Write the numbers to this JSON file.")
    return parser


def format_task_table(task: str, rows: dict[str, dict]) -> str:
    width = max([len("model")] + [len(k) for k in rows])
    first = next(iter(rows.values()))
    lines = [f"{task} ({first['prompt_id']}, {first['num_fewshot']}-shot, {first['n']} items, "
             f"chance {first['chance']:.4f}"
             + (f", {first['merged_choices']} choices merged into <unk>" if first.get("merged_choices") else "") + ")",
             f"{'model':<{width}}  {'acc':>6}  {'± se':>6}  {'acc_norm':>8}  {'± se':>6}"]
    for label, r in rows.items():
        lines.append(f"{label:<{width}}  {r['acc']:>6.4f}  {r['acc_stderr']:>6.4f}  {r['acc_norm']:>8.4f}  "
                     f"{r['acc_norm_stderr']:>6.4f}")
    return "\n".join(lines)


TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def model_tokenizers(models: list[tuple[str, str]], values: list[str] | None) -> dict[str, str | None]:
    """Each model's tokenizer: its `--tokenizer LABEL=TOK`, else the plain `--tokenizer TOK`, else the
    model itself (a folder holding a tokenizer, or a hub name), else the first model's folder (None
    where there is none: binarized data needs no tokenizer)."""
    labels = [label for label, _ in models]
    plain, own = [], {}
    for value in values or []:
        label, target = parse_model_arg(value)
        if label == value:
            plain.append(value)
        elif label not in labels:
            raise UsageError(f"--tokenizer {value}: no --model is labelled {label!r} (labels: {', '.join(labels)})")
        elif label in own:
            raise UsageError(f"--tokenizer: two tokenizers for {label!r}")
        else:
            own[label] = target
    if len(plain) > 1:
        raise UsageError(f"--tokenizer: {len(plain)} tokenizers for every model ({', '.join(plain)}); "
                         "give one, or LABEL=TOK for each model")
    first = models[0][1] if Path(models[0][1]).is_dir() else None
    default = plain[0] if plain else None

    def own_tokenizer(target: str) -> str | None:
        path = Path(target)
        if path.is_dir():
            return target if any((path / name).is_file() for name in TOKENIZER_FILES) else None
        return None if hub.looks_local(target) else target

    return {label: own.get(label) or default or own_tokenizer(target) or first for label, target in models}


def load_task(args, tokenizer):
    """The task of --task/--task_def over --task_data, tokenized (tasks.prepare_task), or None."""
    name = args.task or args.task_def
    if name is None:
        if args.task_data or args.num_fewshot or args.fewshot_data:
            raise UsageError("--task_data, --num_fewshot and --fewshot_data need --task or --task_def")
        return None
    if not args.task_data:
        raise UsageError(f"--task {name} needs --task_data FILE (the task's JSON lines)")
    if tokenizer is None:
        raise UsageError("--task needs --tokenizer (or a first --model that is a folder holding one)")
    task = load_task_def(name)
    return prepare_task(task, args.task_data, load_encoder(tokenizer), args.num_fewshot, args.fewshot_data,
                        args.fewshot_seed)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} but CUDA is not available")
    if not args.data and not (args.task or args.task_def):
        raise UsageError("nothing to evaluate: give --data (perplexity), --task/--task_def with --task_data, or both")
    if args.stride is None:
        args.stride = args.max_length // 2
    check_window(args.max_length, args.stride)
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    models = [parse_model_arg(m) for m in args.model]
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate model labels: {labels}")
    tokenizers = model_tokenizers(models, args.tokenizer)
    # text is read and tokenized once per tokenizer; binarized data once, its ids being the same for every model
    text_given = bool(args.data) and not all(shards.is_binarized(path) for path in args.data)
    data_key = {label: tok if text_given else None for label, tok in tokenizers.items()}
    eval_data = {key: read_eval_data(args.data, key, args.unit, args.allow_bad_text)
                 for key in dict.fromkeys(data_key.values())} if args.data else {}
    task_data = {tok: load_task(args, tok) for tok in dict.fromkeys(tokenizers.values())}
    for key, data in eval_data.items():
        logger.info("Scoring %d sequences (%d tokens%s) with %d model(s) on %s", len(data),
                    sum(len(s) for s in data.sequences), f" of {key}" if key else "",
                    list(data_key.values()).count(key), device)
    amp_dtype = torch.bfloat16 if args.bf16 else None
    rows, task_rows, task_items = {}, {}, {}
    for label, target in models:
        tok = tokenizers[label]
        model = load_causal_lm(target).to(device).eval()
        vocab = model.get_input_embeddings().num_embeddings
        sequences = eval_data[data_key[label]].sequences if args.data else []
        top = max([int(s.max()) for s in sequences] + [task_data[tok].max_id if task_data[tok] else 0])
        if top >= vocab:
            raise UsageError(f"the data holds token id {top}, beyond {label}'s vocabulary ({vocab}): wrong tokenizer?")
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        if args.data:
            rows[label] = held_out_scores(model, eval_data[data_key[label]], max_length=args.max_length, stride=args.stride,
                                          batch_size=args.batch_size, device=device, amp_dtype=amp_dtype,
                                          progress=True, pad_id=pad_id)
            rows[label].update(model=target, tokenizer=tok)
            r = rows[label]
            logger.info("%s: perplexity %.3f over %d tokens%s", label, r["perplexity"], r["tokens"],
                        "" if r["bits_per_char"] is None else
                        f", {r['bits_per_char']:.4f} bits/char over {r['chars']:,} characters")
        if task_data[tok] is not None:
            task_rows[label], task_items[label] = evaluate_task(model, task_data[tok], batch_size=args.batch_size,
                                                                device=device, amp_dtype=amp_dtype, progress=True,
                                                                pad_id=pad_id)
            task_rows[label]["model"] = target
            logger.info("%s: %s acc %.4f, acc_norm %.4f over %d items", label, task_data[tok].task.name,
                        task_rows[label]["acc"], task_rows[label]["acc_norm"], task_rows[label]["n"])
        del model
    first = tokenizers[models[0][0]]
    result = {"tokenizer": first, "tokenizers": tokenizers, "bf16": args.bf16}
    if args.data:
        print(format_table(rows))
        result.update({key: {k: r[key] for k, r in rows.items()} for key in ("perplexity", *HELD_OUT_PER_TEXT)})
        result.update({"details": rows, "data": [str(d) for d in args.data], "unit": args.unit,
                       "max_length": args.max_length, "stride": args.stride})
    task_data = task_data[first]
    if task_data is not None:
        print(format_task_table(task_data.task.name, task_rows))
        result["task"] = {"definition": task_data.task.to_json(), "prompt_id": task_data.task.prompt_id,
                          "data": task_data.path, "num_fewshot": task_data.num_fewshot,
                          "fewshot_data": task_data.fewshot_path, "fewshot_seed": task_data.fewshot_seed,
                          "results": task_rows, "items": task_items}
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
