"""data_prep/prepare.py end to end on dumps the test writes (a CirrusSearch .json.gz and a CC-100 .xz):
the shards equal those of the three commands run by hand; a rerun redoes nothing; a stage left
unfinished (killed: output without marker) is redone with the stages after it, the ones before kept;
a failed stage is its exit status."""
import json
import os

import numpy as np
import pytest

from data_prep import binarize, build_corpus, prepare
from distil_ja.shards import load_sequences
from data_prep_fixtures import tiny_tokenizer_dir, write_cc100_xz, write_cirrus_dump, write_truncated_xz


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepare")
    return {"jawiki": write_cirrus_dump(str(base / "jawiki-cirrussearch-content.json.gz")),
            "cc100": write_cc100_xz(str(base / "ja.txt.xz"), n_docs=120), "tok": tiny_tokenizer_dir(base),
            "base": base}


def args(dumps, out, cc100=None):
    return ["--output_dir", str(out), "--tokenizer", dumps["tok"], "--jawiki", dumps["jawiki"],
            "--cc100", cc100 or dumps["cc100"], "--dev_docs", "3", "--num_workers", "2", "--quiet",
            "--shard_size", "500", "--binarize_jobs", "2"]


def shard_bytes(folder):
    """Every file under folder (the binarize parts), by relative path."""
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


def mtimes(out):
    return {name: os.stat(out / "stages" / f"{name}.json").st_mtime_ns for name in ("jawiki", "cc100", "binarize")}


@pytest.fixture(scope="module")
def prepared(dumps):
    out = dumps["base"] / "out"
    assert prepare.main(args(dumps, out)) == 0
    return out


@pytest.mark.slow
def test_same_shards_as_the_commands_by_hand(dumps, prepared, tmp_path):
    for name, source in (("jawiki", "jawiki-cirrus"), ("cc100", "cc100")):
        build_corpus.build_corpus(source, [dumps[name]], str(tmp_path / name), dev_docs=3, progress=False,
                                  num_workers=1)
    binarize.binarize([str(tmp_path / "jawiki" / "doc_data"), str(tmp_path / "cc100" / "doc_data")], dumps["tok"],
                      str(tmp_path / "bin"), num_workers=1, shard_size=500, progress=False)
    parts = sorted(p for p in (prepared / "binarized").iterdir() if p.name.startswith("part-"))
    assert [p.name for p in parts] == ["part-0", "part-1"]  # --binarize_jobs 2
    ours, _ = load_sequences([str(p) for p in parts])
    theirs, _ = load_sequences([str(tmp_path / "bin")])
    assert len(ours) == len(theirs) > 10 and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.slow
def test_rerun_skips_finished_stages(dumps, prepared, caplog):
    before = mtimes(prepared)
    caplog.set_level("INFO", logger="prepare")
    assert prepare.main(args(dumps, prepared)) == 0
    assert mtimes(prepared) == before
    assert caplog.text.count("done earlier") == 3


@pytest.mark.slow
def test_unfinished_stage_is_redone_with_those_after_it(dumps, prepared, tmp_path, caplog):
    out = tmp_path / "out"
    assert prepare.main(args(dumps, out)) == 0
    expected = shard_bytes(out / "binarized")
    before = mtimes(out)
    # what a killed cc100 stage leaves: no marker, no stats.json, a partial doc_data/
    os.remove(out / "stages" / "cc100.json")
    os.remove(out / "corpus" / "cc100" / "stats.json")
    (out / "corpus" / "cc100" / "doc_data" / "0.txt").write_text("途中まで。\n", encoding="utf-8")
    caplog.set_level("INFO", logger="prepare")
    assert prepare.main(args(dumps, out)) == 0
    after = mtimes(out)
    assert after["jawiki"] == before["jawiki"] and after["binarize"] != before["binarize"]
    assert "stage 1/3 jawiki: done earlier" in caplog.text
    assert shard_bytes(out / "binarized") == expected


@pytest.mark.slow
def test_failed_stage_returns_its_status_and_a_fixed_rerun_resumes(dumps, tmp_path, capfd):
    out = tmp_path / "out"
    bad = write_truncated_xz(str(tmp_path / "ja.txt.xz"))
    assert prepare.main(args(dumps, out, cc100=bad)) == 1
    assert "error: truncated or corrupt input" in capfd.readouterr().err  # the stage's own line
    assert (out / "stages" / "jawiki.json").exists() and not (out / "stages" / "cc100.json").exists()
    assert not (out / "stages" / "binarize.json").exists()
    assert prepare.main(args(dumps, out)) == 0  # other --cc100: the cc100 stage and binarize are redone
    assert json.loads((out / "corpus" / "cc100" / "stats.json").read_text())["damaged_inputs"] == []


def test_nothing_to_prepare_is_a_usage_error(tmp_path, capsys):
    assert prepare.main(["--output_dir", str(tmp_path), "--tokenizer", "x"]) == 2
    assert "nothing to prepare" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_killed_for_real_is_redone_and_the_rest_kept(dumps, tmp_path, caplog):
    """SIGKILL to prepare.py and its stage (what a scheduler's kill does) while cc100 is being built:
    no cc100 marker; the rerun skips jawiki, rebuilds cc100 whole and binarizes."""
    import signal
    import subprocess
    import sys
    import time

    from data_prep_fixtures import cc100_bytes
    from helpers import REPO

    big = tmp_path / "ja.txt"
    big.write_bytes(cc100_bytes(seed=4, n_docs=20_000))  # seconds of cleaning
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--tokenizer", dumps["tok"], "--jawiki", dumps["jawiki"], "--cc100", str(big),
            "--num_workers", "1", "--binarize_jobs", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / "prepare.py"), *argv],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "corpus" / "cc100" / "doc_data").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / "stages" / "jawiki.json").exists() and not (out / "stages" / "cc100.json").exists()
    jawiki_marker = (out / "stages" / "jawiki.json").stat().st_mtime_ns
    caplog.set_level("INFO", logger="prepare")
    assert prepare.main(argv) == 0
    assert "stage 1/3 jawiki: done earlier" in caplog.text
    assert (out / "stages" / "jawiki.json").stat().st_mtime_ns == jawiki_marker
    stats = json.loads((out / "corpus" / "cc100" / "stats.json").read_text())
    assert stats["docs_read"] == 20_000 and stats["damaged_inputs"] == []
    assert (out / "binarized" / "part-0" / "manifest.json").exists()
