#!/usr/bin/env python
"""The independent check of tasks.py: the same file, the same prompt, scored by lm-evaluation-harness.

    python bench/lm_eval_check.py --model EXPORT_DIR --task jcommonsenseqa --task_data valid-v1.3.json \
        [--limit 300] [--lm_eval "/path/to/venv/bin/python -m lm_eval"] [--out_dir DIR]

EXPORT_DIR is an export.py folder (AutoModelForCausalLM and AutoTokenizer load it as it is). The
script writes the task as an lm-eval task configuration (output_type multiple_choice over the local
JSON lines: the prompt template in Jinja, the choices, the answer's index), runs `lm_eval run` on
the CPU in float32 with the tokenizer's `<s>` (add_bos_token=True) and --log_samples, scores the
same file with tasks.py in float32, and compares, item by item: the log-likelihood of every choice
(to --atol), the predicted choice, its length-normalised variant, and the two accuracies.

lm_eval is a bench-only dependency with many of its own (datasets, pandas, scikit-learn, ...): install
it in a virtual environment of its own (bench/requirements-lm-eval.txt) and pass its python with
--lm_eval. Only few-shot 0 is compared: lm-eval draws its examples otherwise than tasks.py.
Exit status: 0 equal, 1 different (or lm_eval failed, its log named), 2 bad arguments.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]

from distil_ja.cli import ArgumentParser, DataError, UsageError, run_command, setup_logging  # noqa: E402


def jinja_expression(template: str) -> str:
    """A tasks.py template ({field} in literal text) as one Jinja expression: literals ~ fields."""
    import string

    from tasks import template_fields

    template_fields(template, "template")  # plain fields only, as tasks.py accepts
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(json.dumps(literal, ensure_ascii=False))
        if name is not None:
            parts.append(f"({name}|string)")
    return " ~ ".join(parts) or '""'


def lm_eval_config(task, data_file: Path, name: str) -> dict:
    """An lm-eval task configuration (written as JSON, which YAML reads) scoring `task` over `data_file`:
    the prompt, the choices and the answer's index written again as lm-eval's Jinja templates."""
    if isinstance(task.choices, str):
        choices = "{{" + task.choices + "}}"
    else:
        choices = "{{[" + ", ".join(jinja_expression(c) for c in task.choices) + "]}}"
    if task.label_values is not None:
        target = "{{" + json.dumps(list(task.label_values), ensure_ascii=False) + ".index(" + task.label + ")}}"
    else:
        target = "{{" + task.label + "|int}}"
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{" + jinja_expression(task.prompt) + "}}",
            "doc_to_choice": choices, "doc_to_target": target, "target_delimiter": task.target_delimiter,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def first_lines(src: Path, dst: Path, limit: int | None) -> Path:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    dst.write_text("".join(line + "\n" for line in lines[:limit] if line), encoding="utf-8")
    return dst


def run_lm_eval(lm_eval: str, model: Path, task_dir: Path, name: str, out: Path, batch_size: int):
    """lm_eval's per-item samples, ordered by doc_id, and its summary (acc,none, acc_stderr,none, ...)."""
    cmd = shlex.split(lm_eval) + ["run", "--model", "hf", "--model_args",
                                  f"pretrained={model},add_bos_token=True,dtype=float32", "--tasks", name,
                                  "--include_path", str(task_dir), "--device", "cpu", "--batch_size", str(batch_size),
                                  "--log_samples", "--output_path", str(out / "lm_eval")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = out / "lm_eval.log"
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise DataError(f"lm_eval failed (exit {proc.returncode}); its output: {log}")
    found = sorted((out / "lm_eval").rglob(f"samples_{name}_*.jsonl"))
    if not found:
        raise DataError(f"lm_eval wrote no samples_{name}_*.jsonl under {out / 'lm_eval'}; its output: {log}")
    samples = [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]
    results = sorted((out / "lm_eval").rglob("results_*.json"))
    summary = json.loads(results[-1].read_text())["results"][name] if results else {}
    return sorted(samples, key=lambda s: s["doc_id"]), summary


def compare(ours: list[dict], theirs: list[dict], atol: float, summary: dict | None = None,
            their_summary: dict | None = None) -> dict:
    """Item by item: the largest log-likelihood difference and the items whose predictions differ; then the
    accuracies and their standard errors as each side reports them."""
    if len(ours) != len(theirs):
        return {"equal": False, "why": f"{len(ours)} items here, {len(theirs)} in lm_eval"}
    max_diff, pred_diff, norm_diff = 0.0, [], []
    for mine, sample in zip(ours, theirs):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        max_diff = max([max_diff] + [abs(a - b) for a, b in zip(mine["loglikelihoods"], lls)])
        if int(sample["acc"]) != int(mine["pred"] == mine["label"]) or int(max(range(len(lls)), key=lls.__getitem__)) != mine["pred"]:
            pred_diff.append(mine["id"])
        if int(sample["acc_norm"]) != int(mine["pred_norm"] == mine["label"]):
            norm_diff.append(mine["id"])
    acc_theirs = sum(s["acc"] for s in theirs) / len(theirs)
    norm_theirs = sum(s["acc_norm"] for s in theirs) / len(theirs)
    metrics_differ = []
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        if summary and their_summary and abs(summary[key] - their_summary.get(f"{key},none", float("nan"))) > 1e-9:
            metrics_differ.append(key)
    return {"equal": max_diff <= atol and not pred_diff and not norm_diff and not metrics_differ, "items": len(ours),
            "max_abs_loglikelihood_diff": max_diff, "items_pred_differs": pred_diff,
            "items_acc_norm_differs": norm_diff, "metrics_differ": metrics_differ, "lm_eval_acc": acc_theirs,
            "lm_eval_acc_norm": norm_theirs, "lm_eval_summary": their_summary}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="An export.py folder.")
    choose = parser.add_mutually_exclusive_group(required=True)
    choose.add_argument("--task", help="A built-in task (jcommonsenseqa, jnli).")
    choose.add_argument("--task_def", help="A task definition JSON file.")
    parser.add_argument("--task_data", required=True, help="The task's JSON lines.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N items (both sides).")
    parser.add_argument("--lm_eval", default=f"{sys.executable} -m lm_eval",
                        help="How to start lm_eval (default: this python's -m lm_eval).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--atol", type=float, default=1e-4, help="Largest log-likelihood difference taken as equal.")
    parser.add_argument("--out_dir", default="checkpoints/lm_eval_check")
    return parser


def run(args) -> int:
    import torch

    from models import load_causal_lm
    from perplexity import load_encoder
    from tasks import evaluate_task, load_task_def, prepare_task

    model_dir, out = Path(args.model).resolve(), Path(args.out_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir} is not a model folder (export.py output)")
    task = load_task_def(args.task or args.task_def)
    out.mkdir(parents=True, exist_ok=True)
    data_file = first_lines(Path(args.task_data), out / "data.jsonl", args.limit)
    name = f"distil_ja_{task.name}"
    task_dir = out / "task"
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{name}.yaml").write_text(json.dumps(lm_eval_config(task, data_file, name), ensure_ascii=False,
                                                      indent=1), encoding="utf-8")
    torch.manual_seed(0)
    data = prepare_task(task, data_file, load_encoder(str(model_dir)))
    model = load_causal_lm(str(model_dir)).eval()
    summary, ours = evaluate_task(model, data, batch_size=args.batch_size, progress=False,
                                  pad_id=getattr(model.config, "pad_token_id", None) or 0)
    theirs, their_summary = run_lm_eval(args.lm_eval, model_dir, task_dir, name, out, args.batch_size)
    report = {"task": task.prompt_id, "data": str(args.task_data), "limit": args.limit, "ours": summary,
              **compare(ours, theirs, args.atol, summary, their_summary)}
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    print(f"{task.prompt_id} on {report.get('items')} items: tasks.py acc {summary['acc']:.4f} acc_norm "
          f"{summary['acc_norm']:.4f} | lm_eval acc {report.get('lm_eval_acc', float('nan')):.4f} acc_norm "
          f"{report.get('lm_eval_acc_norm', float('nan')):.4f} | max |Δ log-likelihood| "
          f"{report.get('max_abs_loglikelihood_diff', float('nan')):.2e} | predictions differ on "
          f"{len(report.get('items_pred_differs', []))} item(s), acc_norm on {len(report.get('items_acc_norm_differs', []))}; "
          f"acc/acc_norm/stderr differ: {', '.join(report.get('metrics_differ', [])) or 'none'}")
    print(f"{'EQUAL' if report['equal'] else 'DIFFERENT'} (report: {out / 'report.json'})")
    if not report["equal"]:
        raise DataError(f"tasks.py and lm_eval disagree: {out / 'report.json'}")
    return 0


def main(argv=None) -> int:
    from utils import silence_attention_mask_advice

    setup_logging()
    silence_attention_mask_advice()
    return run_command(lambda argv: run(build_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
