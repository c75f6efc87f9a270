"""bench/alignment_share.py --cpu: the table CI can make, its shares read back from binarize's manifests."""

import json

import pytest

from helpers import load_script


@pytest.mark.slow
def test_cpu_mode_reports_every_pair(tmp_path, capsys):
    script = load_script("bench/alignment_share.py")
    assert script.main(["--cpu", "--out_dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["teacher"] for r in rows] == ["unigram-2x", "bpe-bytes", "unigram-cased"]
    for r in rows:
        manifest = json.loads((tmp_path / f"data-{r['teacher']}" / "manifest.json").read_text())["totals"]
        assert r["aligned_share"] == manifest["aligned_share"] and r["boundary_agreement"] == manifest["boundary_agreement"]
        assert 0 < r["aligned_share"] <= r["boundary_agreement"] <= 1
    assert "| bpe-bytes |" in capsys.readouterr().out
