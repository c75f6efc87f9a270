"""bench/quality.py: the raw text -> tokenizer -> teacher -> three students -> perplexity chain."""

import json
import lzma
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

QUALITY = REPO / "bench" / "quality.py"


def path_of(text: str) -> Path:
    """A path as results JSON gives it: relative to the repo when inside it."""
    return Path(text) if Path(text).is_absolute() else REPO / text


def run_quality(*args, timeout=300):
    return subprocess.run([sys.executable, str(QUALITY), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_size_gives_four_rows_on_one_token_budget(tmp_path):
    out = tmp_path / "quality"
    proc = run_quality("--size", "smoke", "--out_dir", out, "--report_dir", tmp_path / "report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "results-default.json").read_text())
    runs = result["runs"]
    assert list(runs) == ["teacher", "no_kd", "kd", "kd_init"]
    for name, row in runs.items():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, name
        assert math.isclose(row["ratio"], row["perplexity"] / runs["teacher"]["perplexity"])
        assert row["wall_s"] > 0 and row["tokens_seen"] > 0
        assert path_of(row["tensorboard"]).is_dir()
    students = [runs[n] for n in ("no_kd", "kd", "kd_init")]
    # one budget: the same steps over the same batches, so exactly the same tokens
    assert len({r["tokens_seen"] for r in students}) == 1
    assert len({r["steps"] for r in students}) == 1
    assert runs["teacher"]["tokens_seen"] > students[0]["tokens_seen"]  # the smoke teacher runs twice the steps
    assert [runs[n]["teacher"] for n in runs] == [False, False, True, True]
    assert runs["kd_init"]["init"] == "teacher layers" and runs["kd"]["init"] == "random"
    # the students' train.py settings really differ only in the losses and the init
    params = {n: json.loads((path_of(runs[n]["path"]) / "parameters.json").read_text()) for n in ("no_kd", "kd", "kd_init")}
    assert params["no_kd"]["alpha_ce"] == 0 and params["no_kd"]["teacher_name"] is None
    recipe = result["recipe"]  # train.py's loss settings (config.RECIPE), the project's default
    for name in ("kd", "kd_init"):
        assert [params[name][k] for k in ("temperature", "alpha_ce", "alpha_clm", "alpha_cos")] == \
            [recipe[k] for k in ("T", "ce", "clm", "cos")]
    assert params["kd_init"]["student_pretrained_weights"].endswith("student_init.pth")
    for key in ("max_steps", "batch_size", "learning_rate", "seed", "data_file"):
        assert len({json.dumps(p[key]) for p in params.values()}) == 1, key

    table = (out / "results-default.md").read_text()
    for name in runs:
        assert f"| {name} |" in table
    assert "ppl ÷ teacher" in table and "tensorboard" in table
    assert (tmp_path / "report" / "results-default.json").is_file()
    assert (tmp_path / "report" / "kd" / "log").is_dir()
    assert not (out / "text").exists()  # derived text is deleted once binarized


def test_dry_run_gpu_size_commands(tmp_path):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for name in ("jawiki_jaquad_train", "jawiki_jaquad_dev", "jawikinews", "aozora_modern_50MB"):
        (corpora / f"{name}.txt.xz").write_bytes(lzma.compress("文。\n".encode()))
    proc = run_quality("--size", "gpu", "--corpora", corpora, "--out_dir", tmp_path / "q", "--dry_run",
                       "--recipe", "T=1,ce=0.9,clm=0.1,cos=0", "--student_lr", "1e-3", "--kd_lr", "2e-3", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "train.py" in line]
    assert len(lines) == 4  # teacher and three students
    assert all("--n_gpu 1" in line and "--precision bf16" in line for line in lines)
    no_teacher = [line for line in lines if "--teacher_name" not in line]  # the teacher and no_kd
    assert len(no_teacher) == 2 and all("--alpha_ce 0 --alpha_clm 1 --alpha_cos 0" in line for line in no_teacher)
    kd = [line for line in lines if "--teacher_name" in line]
    assert len(kd) == 2 and all("--temperature 1.0 --alpha_ce 0.9 --alpha_clm 0.1 --alpha_cos 0.0" in line for line in kd)
    assert sum("--student_pretrained_weights" in line for line in lines) == 1
    assert all("--learning_rate 0.002" in line for line in kd)  # --kd_lr: the distilled students only
    assert sum("--learning_rate 0.001 " in line for line in lines) == 2  # the teacher (gpu size) and no_kd
    assert "evaluate.py" in proc.stdout and "--bf16" in proc.stdout.split("evaluate.py")[1]


def test_missing_corpora_and_bad_arguments_exit_2(tmp_path):
    proc = run_quality("--size", "tiny", "--corpora", tmp_path / "nowhere", "--out_dir", tmp_path / "q", timeout=60)
    assert proc.returncode == 2 and "--corpora" in proc.stderr
    proc = run_quality("--size", "smoke", "--recipe", "beta=3", "--out_dir", tmp_path / "q", timeout=60)
    assert proc.returncode == 2 and "--recipe" in proc.stderr
    proc = run_quality("--size", "smoke", "--runs", "kd,other", "--out_dir", tmp_path / "q", timeout=60)
    assert proc.returncode == 2 and "--runs" in proc.stderr
