"""`bash run_distill.sh --demo`: the offline end-to-end run (slow: a few minutes on 2 cores)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

# The demo's figures as the docs state them, e.g. "held-out perplexities: teacher 109.80, student_kd 131.66,
# student_no_kd 169.75". They are deterministic for one torch build on one kind of CPU (measured equal to the
# last digit on two runs); other CPUs' kernels round differently and training amplifies it, hence 2 %.
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
DOCUMENTED = re.compile(rf"held-out perplexities:\s+teacher {NUMBER},\s+student_kd {NUMBER},\s+student_no_kd {NUMBER}")
TOLERANCE = 0.02


def documented_figures() -> dict[str, float]:
    """The one statement of the demo's figures in README.md and docs/ (it must be exactly one)."""
    found = [m for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
             for m in DOCUMENTED.finditer(path.read_text(encoding="utf-8"))]
    assert len(found) == 1, f"{len(found)} statements of the demo's perplexities in README.md and docs/"
    return dict(zip(("teacher", "student_kd", "student_no_kd"), map(float, found[0].groups())))


def test_the_docs_state_the_demos_figures_once():
    figures = documented_figures()
    assert figures["student_kd"] < figures["student_no_kd"]


@pytest.mark.slow
def test_demo_distillation_beats_training_alone(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", str(REPO / "run_distill.sh"), "--demo", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results: {out}/results.json" in proc.stdout
    assert f"plot:    {out}/curves.png" in proc.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((out / run / "curves.png").is_file() for run in ("teacher", "student_kd", "student_no_kd"))
    for label in ("teacher", "student_kd", "student_no_kd"):
        assert label in proc.stdout  # the perplexity table
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "student_kd", "student_no_kd"}
    assert all(math.isfinite(v) and v > 1 for v in results.values())
    assert results["student_kd"] < results["student_no_kd"]
    for label, documented in documented_figures().items():  # the figures a user reads are the ones a user gets
        assert abs(results[label] - documented) <= TOLERANCE * documented, (label, results[label], documented)

    # the export loads through the Auto classes alone, in a fresh process
    check = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline;"
             "tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
             "print(pipeline('text-generation', model=m, tokenizer=tok)('春になると', max_new_tokens=8)[0]['generated_text'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", check, str(out / "export")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("春になると")
    assert "student_kd" in (out / "export" / "README.md").read_text()

    # a rerun overwrites its own folder
    assert (out / "teacher" / "model.safetensors").is_file()
