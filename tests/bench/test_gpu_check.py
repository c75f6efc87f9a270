"""bench/gpu_check.sh: the GPU check's steps at tiny sizes on the CPU, its output limits, and its table."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"
ROWS = ("a_bs8", "a_bs8", "b_bs16", "b_bs32", "c_plain_bs8", "d_train_pad64", "c_train_pad1")


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the markdown table that ends the output (header and rule left out)."""
    lines = stdout.rstrip().splitlines()
    start = len(lines)
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:]]


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_ends_with_the_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT": str(out)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)  # at most two folders deep
    assert {"env.txt", "step_bs8.txt", "results.json", "summary.md"} <= {p.name for p in files}
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == list(ROWS)
    for row in rows:
        assert row[7] == "ok", row
        assert float(row[3].replace(",", "")) > 0, row
    assert "GPU busy" not in proc.stdout  # the CPU has no kernel time to report
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "cpu" and results["distill_step"]["a_bs8"]["match"] is True
    train = results["train"]["d_train_pad64"]
    assert train["pad_multiple"] == 64 and len(train["windows"]) == 3 and 0 <= train["padding_fraction"] < 1
    assert results["train"]["c_train_pad1"]["pad_multiple"] == 1


def test_prepare_names_missing_corpora_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--prepare", str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CORPORA": str(tmp_path / "nowhere")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no {tmp_path / 'nowhere'}/jawiki_jaquad_train.txt.xz: set CORPORA to the folder of the corpora"]


def test_table_reports_timeouts_failures_and_skips(tmp_path):
    """Every row is printed, whatever happened to its step."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    bench = {"batch": [8, 1024], "match": True, "project_settings": {"precision": "bf16", "fused_loss": True,
                                                                     "compile": True},
             "results": [{"name": "reference", "tokens_per_s": 22000.0, "mfu": 0.033, "peak_gib": 27.0},
                         {"name": "project", "tokens_per_s": 200000.0, "mfu": 0.30, "peak_gib": 6.0,
                          "gpu_busy": {"busy": 0.9}}],
             "table": ["distill step | ..."]}
    (work / "a_bs8.json").write_text(json.dumps(bench))
    (work / "d_train_pad64.err").write_text(
        "INFO - Dataset: 10 sequences in, 12 after splitting to max_len 1024, 0 too short\n"
        "V1127 [0/1] [__recompiles] Recompiling function forward in model.py\n"
        "INFO - step 100/300 | ce 1.0 | lr 0.0005 | 50000 tok/s\n"
        "INFO - step 200/300 | ce 1.0 | lr 0.0005 | 190000 tok/s\n"
        "INFO - step 300/300 | ce 1.0 | lr 0.0005 | 210000 tok/s\n")
    (work / "status.tsv").write_text("a_bs8\t0\t150\t210\nc_plain_bs8\t124\t90\t90\nteacher\t0\t10\t60\n"
                                     "d_train_pad64\t0\t80\t150\nc_train_pad1\t1\t5\t120\n"
                                     "b_bs16\t0\t50\t90\nb_bs32\tskipped\t0\ttime budget spent\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check_table.py"), "--mode", "gpu", "--work",
                           str(work), "--out", str(out), "--budget", "470"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {(r[0], r[1][:6]): r for r in table_rows(proc.stdout)}
    assert rows[("a_bs8", "(a) pr")][3] == "200,000" and "GPU busy 90%" in rows[("a_bs8", "(a) pr")][8]
    assert rows[("c_plain_bs8", "(c) pr")][7] == "timeout (90 s)"
    assert rows[("c_train_pad1", "(c) tr")][7] == "failed (exit 1)"
    assert rows[("b_bs16", "(b) pr")][7] == "failed (no result)"  # exit 0 but no JSON
    assert rows[("b_bs32", "(b) pr")][7] == "skipped: time budget spent"
    train = rows[("d_train_pad64", "(d) tr")]
    assert train[2] == "? × ≤ 1024"  # no parameters.json in this work folder
    assert train[3] == "200,000" and "1 recompiles" in train[8] and "1.00× the bench step" in train[8]
    assert (out / "summary.md").exists() and json.loads((out / "results.json").read_text())["mode"] == "gpu"


def test_gpu_mode_out_of_time_skips_every_step_and_still_prints_every_row(tmp_path):
    """The budget caps every step: with none left, nothing runs, and the table still has all its rows."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET": "0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == list(ROWS)
    assert all(r[7].startswith("skipped: ") and r[3] == "–" for r in rows), rows
    assert "a_bs8 skipped: time budget spent" in proc.stderr
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
