"""bench/corpus_bench.py --quick: every run happens, the old and the new code write the same text,
and the projection names the stage that bounds each build."""

import json

import pytest

from helpers import load_script

corpus_bench = load_script("bench/corpus_bench.py")


@pytest.mark.slow
def test_quick_run_measures_every_variant_and_projects(tmp_path, capsys, tiny_tokenizer):
    out = tmp_path / "r.json"
    assert corpus_bench.main(["--work_dir", str(tmp_path / "w"), "--quick", "--json", str(out),
                              "--tokenizer", str(tiny_tokenizer)]) == 0
    result = json.loads(out.read_text())
    runs = {(r["input"], r["run"]) for r in result["rows"]}
    for name in ("cc100", "jawiki"):
        assert {(name, "old (38f8d4b, 1 process)"), (name, "new, 1 worker"), (name, "new, 2 workers")} <= runs
    assert all(r["same_output"] for r in result["rows"] if "same_output" in r)
    assert any(run.startswith("floor") for _, run in runs)
    binarized = [r for r in result["rows"] if r["input"] == "binarize"]
    assert len(binarized) == 2 and binarized[1]["tokens"] > 500 and binarized[1]["worker_cpu_s"] > 0
    stages = result["projection"]
    assert len(stages) == 4 and all(s["wall_s"] > 0 and s["bound_by"] for s in stages)
    assert stages[3]["stage"].startswith("binarize (") and "one_job_s" in stages[3]
    assert "total with CC-100 as one xz block" in capsys.readouterr().out
