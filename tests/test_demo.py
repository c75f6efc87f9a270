"""`bash run_distill.sh --demo`: the offline end-to-end run (slow: a few minutes on 2 cores)."""

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO


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
