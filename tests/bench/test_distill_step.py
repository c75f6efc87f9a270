"""bench/distill_step.py --tiny on the CPU: the table is printed and both steps' loss terms agree."""

import json
import subprocess
import sys

import pytest

from config import RECIPE
from helpers import REPO


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "distill_step.py"), "--tiny", "--threads", "1",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_tiny_benchmark_prints_the_table_and_matching_losses(tmp_path):
    stdout, result = run_bench(tmp_path)
    assert "| reference (2019: fp32, eager, masked_select) |" in stdout
    assert "| project (Distiller: fp32, sdpa, fused loss) |" in stdout
    assert "speed ratio project/reference:" in stdout and "MATCH" in stdout and "MISMATCH" not in stdout
    ref, proj = (next(r for r in result["results"] if r["name"] == n) for n in ("reference", "project"))
    for term in ("ce", "clm", "cos"):
        assert proj["terms"][term] == pytest.approx(ref["terms"][term], rel=1e-4, abs=1e-6)
    assert result["recipe"] == RECIPE  # both sides ran train.py's recipe (config.RECIPE)
    assert result["real_tokens"] < 4 * 64  # --tiny pads: the masks of both sides are exercised
    # MFU is tokens/s x FLOPs per token / peak, with issue 5's FLOP count
    t = 2 * (12 * 4 * 64**2 + 64 * 512 + 2 * 4 * 64 * 64)
    s = 2 * (12 * 2 * 64**2 + 64 * 512 + 2 * 2 * 64 * 64)
    assert result["flops_per_token"] == t + 3 * s
    assert proj["mfu"] == pytest.approx(proj["tokens_per_s"] * (t + 3 * s) / 989e12)


def test_mfu_count_reproduces_the_issue_figure():
    sys.path.insert(0, str(REPO / "bench"))
    from distill_step import configs, step_flops_per_token

    flops = step_flops_per_token(*configs(tiny=False), seq=1024)
    assert 22.5e3 * flops / 989e12 == pytest.approx(0.034, abs=0.0005)  # issue 5: 22.5k tokens/s = 3.4% MFU
    assert 181e3 * flops / 989e12 == pytest.approx(0.27, abs=0.005)  # and 181k tokens/s = 27%


@pytest.mark.slow
def test_tiny_benchmark_in_bf16_matches_within_bf16_tolerance(tmp_path):
    stdout, result = run_bench(tmp_path, "--bf16")
    assert "project (Distiller: bf16" in stdout and result["match"] is True
