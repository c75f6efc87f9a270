"""plots.py and train.py's curves.png: the picture is a real PNG of the expected size, and its lines hold
exactly the records the runs wrote; tokens_seen agrees with the Distiller's own count; no matplotlib
is one warning, not a failed run."""

import json
import struct
import sys

import pytest
import torch

import plots
import train
from distil_ja.cli import DataError
from helpers import random_sequences, train_args, write_shard
from records import read_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's own header: signature, then the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def write_run(folder, metrics, evaluations):
    """A run folder as TrainingLog writes it: metrics.jsonl lines and eval_results.json with its history."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if evaluations:
        (folder / "eval_results.json").write_text(json.dumps({**evaluations[-1], "history": evaluations}))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    """A KD run (ce, clm, cos) and a run without a teacher (clm only), the latter on bigger steps."""
    kd = write_run(tmp_path / "kd",
                   [{"step": s, "tokens_seen": 100 * s, "ce": 4.0 / s, "clm": 9.0 - s, "cos": 0.25, "loss": 1.0,
                     "skipped_steps": 0} for s in (1, 2, 3, 4)],
                   [{"step": s, "tokens_seen": 100 * s, "perplexity": 900.0 / s, "tokens": 50} for s in (2, 4)])
    alone = write_run(tmp_path / "alone",
                      [{"step": s, "tokens_seen": 150 * s, "clm": 8.5 - s, "loss": 8.5 - s, "skipped_steps": 0}
                       for s in (1, 2, 3)],
                      [{"step": 3, "tokens_seen": 450, "perplexity": 700.0, "tokens": 50}])
    return kd, alone


def panel(fig, title_start):
    return next(ax for ax in fig.axes if ax.get_visible() and ax.get_title().startswith(title_start))


def lines(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_each_panel_holds_each_runs_records_against_tokens_seen(two_runs):
    kd, alone = two_runs
    fig = plots.figure([plots.Run(kd), plots.Run(alone, "no teacher")])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert [t.split(":")[0] for t in titles] == ["ce", "clm", "cos", "held-out perplexity"]
    assert lines(panel(fig, "ce")) == {"kd": ([100, 200, 300, 400], [4.0, 2.0, 4.0 / 3, 1.0])}
    assert lines(panel(fig, "clm")) == {"kd": ([100, 200, 300, 400], [8.0, 7.0, 6.0, 5.0]),
                                        "no teacher": ([150, 300, 450], [7.5, 6.5, 5.5])}
    assert lines(panel(fig, "held-out")) == {"kd": ([200, 400], [450.0, 225.0]), "no teacher": ([450], [700.0])}
    for ax in fig.axes[:4]:
        assert ax.get_xlabel() == "tokens seen" and ax.get_ylabel() in ("loss per token", "perplexity")
    # log scale where the values spread (ce spans 4x, perplexity 3.1x), linear where they do not
    scales = {t.split(":")[0]: ax.get_yscale() for t, ax in zip(titles, fig.axes)}
    assert scales == {"ce": "log", "clm": "linear", "cos": "linear", "held-out perplexity": "log"}
    # one legend, one entry per run in the runs' order, though "no teacher" has no ce line
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kd", "no teacher"]
    colours = {label: {line.get_color() for ax in fig.axes for line in ax.get_lines() if line.get_label() == label}
               for label in ("kd", "no teacher")}
    assert all(len(c) == 1 for c in colours.values()) and colours["kd"] != colours["no teacher"]


def test_runs_recorded_without_tokens_seen_are_drawn_against_steps(two_runs, tmp_path):
    kd, _ = two_runs
    old = write_run(tmp_path / "old", [{"step": s, "clm": 3.0, "loss": 3.0} for s in (5, 10)], [])
    fig = plots.figure([plots.Run(kd), plots.Run(old)])  # one axis for both: steps
    clm = panel(fig, "clm")
    assert clm.get_xlabel() == "optimizer steps"
    assert lines(clm) == {"kd": ([1, 2, 3, 4], [8.0, 7.0, 6.0, 5.0]), "old": ([5, 10], [3.0, 3.0])}
    assert lines(panel(fig, "held-out")) == {"kd": ([2, 4], [450.0, 225.0])}  # "old" was never evaluated


def test_write_plot_writes_a_png_of_the_figure_size(two_runs, tmp_path):
    kd, alone = two_runs
    out = plots.write_plot([kd, alone], tmp_path / "sub" / "both.png")
    width, height = png_size(out)
    # 4 panels in 2 x 2, each PANEL_INCHES at DPI, plus the legend row
    assert width == round(2 * plots.PANEL_INCHES[0] * plots.DPI)
    assert height == round((2 * plots.PANEL_INCHES[1] + 0.5) * plots.DPI)
    assert 10_000 < out.stat().st_size < 150_000
    assert not list(out.parent.glob("*.tmp"))


def test_same_folder_names_get_their_paths_as_labels(tmp_path):
    a = write_run(tmp_path / "a" / "run", [{"step": 1, "tokens_seen": 9, "clm": 2.0}], [])
    b = write_run(tmp_path / "b" / "run", [{"step": 1, "tokens_seen": 9, "clm": 3.0}], [])
    assert plots.default_labels([a, b]) == [str(a), str(b)]
    assert plots.default_labels([a, tmp_path / "c"]) == ["run", "c"]


@pytest.mark.parametrize("make, words", [
    (lambda d: d, "is not a training run"),  # an empty folder
    (lambda d: d / "missing", "is not a folder"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n') and d, "metrics.jsonl, line 2"),
    (lambda d: (d / "eval_results.json").write_text("[1, 2]") and d, "holds no evaluation record"),
])
def test_a_folder_that_is_not_a_run_is_a_data_error(tmp_path, make, words):
    folder = make(tmp_path)
    with pytest.raises(DataError, match=words):
        read_records(folder)


def test_eval_results_without_history_is_one_evaluation(tmp_path):
    (tmp_path / "eval_results.json").write_text(json.dumps({"step": 4, "perplexity": 33.5}))
    assert read_records(tmp_path) == ([], [{"step": 4, "perplexity": 33.5}])


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as on the GPU machine (sys.modules None entries make `import` raise)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_plots_are_unavailable(two_runs, tmp_path, no_matplotlib):
    with pytest.raises(plots.PlotsUnavailable, match="pip install matplotlib"):
        plots.write_plot([two_runs[0]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---- train.py ---------------------------------------------------------------------------------------

def run_with_eval(tiny_setup, dump, *extra):
    dev = write_shard(dump.parent / "dev.pickle", random_sequences(5, seed=9))
    return train.main(train_args(tiny_setup, dump, "--eval_data", str(dev), "--eval_interval", "3", *extra))


def test_train_draws_its_curves_at_each_evaluation_and_at_the_end(tiny_setup, tmp_path, monkeypatch):
    drawn = []
    real = plots.write_plot

    def spy(dump_paths, out, labels=None):
        path = real(dump_paths, out, labels)
        png_size(path)  # a complete picture each time
        drawn.append(len(read_records(dump_paths[0])[1]))  # the evaluations it was drawn from
        return path

    monkeypatch.setattr(plots, "write_plot", spy)
    dump = tmp_path / "run"
    assert run_with_eval(tiny_setup, dump) == 0  # 6 steps, log every 2, evaluate at 3 and 6
    assert drawn == [1, 2, 2]  # after the evaluation of step 3, of step 6, and at the end
    png_size(dump / plots.PLOT_FILE)

    metrics, evaluations = read_records(dump)
    state = torch.load(dump / "checkpoint_step00000006" / "training_state.pt", weights_only=True)
    # the logged count is the Distiller's own (no step was skipped), and it only grows
    assert metrics[-1]["tokens_seen"] == state["loop_state"]["tokens_seen"] > 0
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert metrics[0]["tokens_seen"] < metrics[1]["tokens_seen"] < metrics[2]["tokens_seen"]
    assert [(e["step"], e["tokens_seen"]) for e in evaluations] == [(3, evaluations[0]["tokens_seen"]),
                                                                    (6, metrics[-1]["tokens_seen"])]
    assert metrics[0]["tokens_seen"] < evaluations[0]["tokens_seen"] < metrics[1]["tokens_seen"]


def test_no_plots_writes_no_picture(tiny_setup, tmp_path):
    dump = tmp_path / "run"
    assert run_with_eval(tiny_setup, dump, "--no-plots") == 0
    assert (dump / "eval_results.json").is_file() and not (dump / plots.PLOT_FILE).exists()


def test_without_matplotlib_training_warns_once_and_goes_on(tiny_setup, tmp_path, capsys, no_matplotlib):
    dump = tmp_path / "run"
    assert run_with_eval(tiny_setup, dump) == 0
    err = capsys.readouterr().err
    assert err.count("No plots for this run") == 1 and "pip install matplotlib" in err
    assert (dump / "model.safetensors").is_file() and not (dump / plots.PLOT_FILE).exists()


def test_the_readme_shows_a_small_committed_picture():
    from helpers import REPO

    picture = "bench/figures/quality_tiny_curves.png"
    assert f"]({picture})" in (REPO / "README.md").read_text(encoding="utf-8")
    width, height = png_size(REPO / picture)
    assert width >= 400 and height >= 300 and (REPO / picture).stat().st_size < 100_000
