"""Training curves in one PNG: each loss term, the held-out perplexity, bits per character and task accuracy
against tokens seen.

One panel per loss term that any run logged (metrics.jsonl), one for TAID's t where a run logged it,
one for the held-out perplexity, one for the held-out bits per character (where --eval_data was text;
it compares runs whose students have different tokenizers, which perplexity does not; bits per byte,
the same curve times chars/bytes of that text, gets no panel of its own) and one per task's accuracy
(--eval_tasks; all from eval_results.json),
one line per run in the same colour in every panel, one legend. The weighted
total (`loss`) is left out: runs with other weights would not compare. The x axis
is the real tokens the optimizer has trained on, so runs with other batch shapes line up; runs
recorded before `tokens_seen` existed are drawn against optimizer steps instead (all of them, so
that one axis never mixes the two).

train.py redraws DUMP_PATH/curves.png at each evaluation and at the end (TrainingLog.plot);
bench/plot_runs.py draws any runs side by side; bench/quality.py draws its students.

matplotlib is imported on first use and only through its object API (Figure, no pyplot): no
global state, no display, the Agg renderer. Where it is missing (the GPU machine has none),
PlotsUnavailable says so and the caller decides: train.py warns once and goes on.
"""

import math
from pathlib import Path

from distil_ja import fileio
from distil_ja.cli import DataError, UsageError, first_line
from records import LOGGED_STATE, LOSS_TERMS, read_records

PLOT_FILE = "curves.png"  # train.py's picture in DUMP_PATH
PANEL_INCHES = (4.0, 2.9)
DPI = 80  # a 4-panel picture is ~50-60 KB: small enough to commit
LOG_SPAN = 3.0  # a panel whose values span more than this factor gets a log y axis
TASK_PREFIX = "acc:"  # a panel key naming a task of --eval_tasks: its accuracy
TITLES = {
    "ce": "ce: KD term (KL to the teacher)",
    "clm": "clm: next-token cross-entropy",
    "mse": "mse: logits vs the teacher's",
    "cos": "cos: 1 - cosine to the teacher",
    "taid_t": "taid_t: TAID's interpolation weight",
    "perplexity": "held-out perplexity",
    "bits_per_char": "held-out bits per character",
}
EVAL_PANELS = ("perplexity", "bits_per_char")  # an evaluation's measures of --eval_data that get a panel
YLABELS = {"perplexity": "perplexity", "bits_per_char": "bits / character", "taid_t": "t"}


class PlotsUnavailable(UsageError):
    """matplotlib cannot be imported: no picture (exit 2 from a command; train.py only warns)."""


def figure_class():
    """matplotlib's Figure, imported here so that nothing else needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotsUnavailable(f"matplotlib cannot be imported ({first_line(err)}); pip install matplotlib") from err
    return Figure


class Run:
    """One run's records: the metrics lines and the evaluations, under a label."""

    def __init__(self, dump_path, label: str | None = None):
        self.path = Path(dump_path)
        self.label = label or self.path.name
        self.metrics, self.evaluations = read_records(self.path)

    def has_tokens(self) -> bool:
        return all(r.get("tokens_seen") is not None for r in self.metrics + self.evaluations)

    def series(self, key: str, x: str) -> tuple[list, list]:
        """(x values, values of `key`) over the records that hold `key` (TASK_PREFIX + name: that task's acc)."""
        if key.startswith(TASK_PREFIX):
            name = key[len(TASK_PREFIX):]
            records = [{**r, key: r["tasks"][name]["acc"]} for r in self.evaluations if name in r.get("tasks", {})]
        else:
            records = self.evaluations if key in EVAL_PANELS else self.metrics
        points = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(name for r in self.evaluations for name in r.get("tasks", {})))


def panels(runs: list[Run]) -> list[str]:
    """The loss terms and loop state any run logged (LOSS_TERMS, LOGGED_STATE order), then the perplexity and
    the bits per character where any run measured them, then each task's accuracy (--eval_tasks)."""
    keys = [k for k in LOSS_TERMS + LOGGED_STATE if any(k in m for r in runs for m in r.metrics)]
    keys += [k for k in EVAL_PANELS if any(e.get(k) is not None for r in runs for e in r.evaluations)]
    return keys + [TASK_PREFIX + name for name in dict.fromkeys(n for r in runs for n in r.task_names())]


def log_span(values: list[float]) -> float | None:
    """max / min of the finite values, where all are positive (a log axis can show them); else None."""
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) / min(finite) if finite and min(finite) > 0 else None


def figure(runs: list[Run]):
    """The picture of `runs` as a matplotlib Figure (nothing written): one panel per key of panels()."""
    Figure = figure_class()
    from matplotlib.ticker import EngFormatter

    keys = panels(runs)
    if not keys:
        raise DataError(f"nothing to plot: {', '.join(str(r.path) for r in runs)} logged no step and no evaluation")
    x = "tokens_seen" if all(r.has_tokens() for r in runs) else "step"
    cols = 2 if len(keys) == 4 else min(3, len(keys))  # four panels: a square, not a row with a gap
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        draw_panel(ax, key, runs, x)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    # one legend, in the order of the runs (a run may be absent from some panels: no ce without a teacher)
    handles = {line.get_label(): line for ax in axes for line in ax.get_lines()}
    labels = [r.label for r in runs if r.label in handles]
    fig.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


def draw_panel(ax, key: str, runs: list[Run], x: str) -> None:
    values = []
    for index, run in enumerate(runs):
        xs, ys = run.series(key, x)
        if xs:
            # evaluations are few: mark each one; the loss lines are dense enough without markers
            evaluated = key in EVAL_PANELS or key.startswith(TASK_PREFIX)
            ax.plot(xs, ys, color=f"C{index % 10}", label=run.label, marker="o" if evaluated else None,
                    markersize=3)
            values += ys
    task = key.startswith(TASK_PREFIX)
    if task:  # the chance level, dashed: where an accuracy means nothing
        name = key[len(TASK_PREFIX):]
        chances = [e["tasks"][name]["chance"] for r in runs for e in r.evaluations if name in e.get("tasks", {})]
        ax.axhline(chances[-1], color="0.5", linestyle="--", linewidth=1)
    ax.set_title(f"{key[len(TASK_PREFIX):]} accuracy (dashed: chance)" if task else TITLES.get(key, key),
                 fontsize="medium")
    ax.set_xlabel("tokens seen" if x == "tokens_seen" else "optimizer steps")
    ax.set_ylabel("accuracy" if task else YLABELS.get(key, "loss per token"))
    span = None if task else log_span(values)  # accuracy stays on a linear axis
    if span is not None and span > LOG_SPAN:  # a log y axis where it helps: values spread over > LOG_SPAN times
        ax.set_yscale("log")
        label_log_axis(ax.yaxis, span)
    ax.grid(True, which="major", alpha=0.3)


def label_log_axis(axis, span: float) -> None:
    """Plain numbers (400, 0.02; not 4 x 10^2), and some minor ticks labelled where the decades
    alone would leave one label or none: 2, 3, 5 within a decade, 2 and 5 within two."""
    from matplotlib.ticker import FuncFormatter

    keep = {2, 3, 5} if span < 10 else {2, 5} if span < 100 else set()

    def minor(value, _):
        mantissa = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if mantissa in keep else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def save(fig, out) -> Path:
    """The PNG, written atomically (a reader never sees half a picture)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def default_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [p.name for p in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def write_plot(dump_paths, out, labels=None) -> Path:
    """Read the runs, draw them, write `out`; raises DataError (not a run) or PlotsUnavailable."""
    figure_class()  # before reading anything: a missing matplotlib is the first thing to say
    paths = [Path(p) for p in dump_paths]
    runs = [Run(path, label) for path, label in zip(paths, labels or default_labels(paths))]
    return save(figure(runs), out)
