"""bench/plot_runs.py: runs in, one PNG out; a folder that is not a run, a bad --out or no matplotlib is
one line `error: ...` with the exit table's status."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SCRIPT = REPO / "bench" / "plot_runs.py"


plot_runs = load_script("bench/plot_runs.py")


def make_run(folder, scale=1.0):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens_seen": 64 * s, "clm": scale * 8 / s, "loss": scale * 8 / s}) + "\n"
        for s in (1, 2, 4, 8)))
    history = [{"step": s, "tokens_seen": 64 * s, "perplexity": scale * 3000 / s, "tokens": 10} for s in (4, 8)]
    (folder / "eval_results.json").write_text(json.dumps({**history[-1], "history": history}))
    return folder


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_two_runs_make_one_png(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", scale=0.5)
    out = tmp_path / "both.png"
    assert plot_runs.main([str(a), str(b), "--out", str(out), "--label", "kd", "--label", "no_kd"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_folder_that_is_not_a_run_exits_1_in_one_line(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x.png"
    assert plot_runs.main([str(a), str(tmp_path / "empty"), "--out", str(out)]) == 1
    one_error_line(capsys, "empty is not a training run", "metrics.jsonl")
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--out", "x.jpg"], ["FILE.png"]),
    (["--out", "x.png", "--label", "only_one"], ["1 --label for 2 runs"]),
    ([], ["--out"]),
])
def test_bad_arguments_exit_2_in_one_line(tmp_path, capsys, extra, words):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    assert plot_runs.main([str(a), str(b), *extra]) == 2
    one_error_line(capsys, *words)


def test_without_matplotlib_exit_2_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_runs.main([str(make_run(tmp_path / "a")), "--out", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys, "pip install matplotlib")


@pytest.mark.slow
def test_the_script_runs_from_another_folder(tmp_path):
    make_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--out", "curves.png"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
