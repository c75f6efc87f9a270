"""The format of a run's records, written by training_log.py and read by plots.py and bench/quality.py.

A run's folder (DUMP_PATH) holds `metrics.jsonl` (one JSON object per log line: step, tokens_seen,
the weighted loss terms named by LOSS_TERMS, loss, the loop state named by LOGGED_STATE where the
run has it, skipped_steps, and in a window with on-policy steps ON_POLICY_RECORDS: their number and the
share of the window's time rank 0 spent sampling) and `eval_results.json` (the
latest evaluation, with every earlier one under "history"; an evaluation of --eval_data holds the
perplexity and, for text, the held-out measures named by HELD_OUT_PER_TEXT). This module is the one place that
names those files and reads them back; it imports nothing of the training side.
"""

import json
from pathlib import Path

from distil_ja.cli import DataError

LOSS_TERMS = ("ce", "clm", "mse", "cos")  # the order of the sums in a step's tensor; "ce" is the KD term
ON_POLICY_RECORDS = ("on_policy_steps", "generation_share")  # --on_policy_fraction: per log window
LOGGED_STATE = ("taid_t",)  # loop state logged beside the terms: TAID's t after the step (--kd_loss taid)
# An evaluation's measures of --eval_data that cross tokenizers (perplexity.held_out_scores): None for binarized data
HELD_OUT_PER_TEXT = ("bits_per_char", "bits_per_byte")
METRICS = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"


def read_records(dump_path) -> tuple[list[dict], list[dict]]:
    """A run's metrics.jsonl lines and evaluations (eval_results.json's history), as written above.

    A folder holding neither file is not a run: DataError, one line naming it.
    """
    dump_path = Path(dump_path)
    metrics_file, eval_file = dump_path / METRICS, dump_path / EVAL_RESULTS
    if not dump_path.is_dir():
        raise DataError(f"{dump_path} is not a folder")
    if not metrics_file.is_file() and not eval_file.is_file():
        raise DataError(f"{dump_path} is not a training run: it holds neither {METRICS} nor {EVAL_RESULTS}")
    metrics = []
    if metrics_file.is_file():
        for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
            if line.strip():
                metrics.append(parse_json(line, f"{metrics_file}, line {number}"))
    evaluations = []
    if eval_file.is_file():
        last = parse_json(eval_file.read_text(), str(eval_file))
        if not isinstance(last, dict):
            raise DataError(f"{eval_file} holds no evaluation record")
        evaluations = last.get("history", [last])  # a file without history holds one evaluation
    return metrics, evaluations


def parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg})") from err
