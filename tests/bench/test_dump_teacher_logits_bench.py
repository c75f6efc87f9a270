"""bench/dump_teacher_logits_bench.py runs end to end on tiny shapes and reports what it promises."""

import json

import pytest

from helpers import load_script

bench = load_script("bench/dump_teacher_logits_bench.py")


def test_tiny_bench_reports_speed_size_and_float16_error(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--n_layer", "1", "--n_embd", "32", "--vocab", "300", "--seq_len", "32", "--sequences", "6",
                       "--batch_size", "2", "--top_k", "8", "--threads", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["forward_tokens_per_s"] > 0
    rows = {row["logprobs_dtype"]: row for row in results["dumps"]}
    header = 2 * 128 / (6 * 32)  # the two .npy headers, spread over the tokens
    assert rows["float16"]["bytes_per_token"] == pytest.approx(8 * (2 + 2) + header)
    assert rows["float32"]["bytes_per_token"] == pytest.approx(8 * (2 + 4) + header)
    assert 0 <= rows["float16"]["tail_error_mean"] <= rows["float16"]["tail_error_max"] < 1e-2  # rounded down: >= 0
    assert rows["float16"]["tail16_min"] >= 0
    assert "| 8 | float16 |" in capsys.readouterr().out
