#!/usr/bin/env python
"""Training curves of one or more runs in one PNG: the loss terms and the held-out perplexity
against tokens seen, one line per run.

    python bench/plot_runs.py DUMP_PATH [DUMP_PATH ...] --out FILE.png [--label NAME ...]

Reads each run's metrics.jsonl and eval_results.json (train.py writes both; --eval_data gives the
perplexity panel). The drawing is examples/distillation/plots.py, the same picture train.py writes
to DUMP_PATH/curves.png. Exit status: 0 done, 1 a folder that is not a run (or unreadable records),
2 bad arguments or no matplotlib.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]

import plots  # noqa: E402
from distil_ja.cli import ArgumentParser, UsageError, run_command, setup_logging  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_paths", nargs="+", metavar="DUMP_PATH", help="train.py --dump_path folders.")
    parser.add_argument("--out", required=True, help="The PNG to write.")
    parser.add_argument("--label", action="append", default=None,
                        help="Legend name of each run, in order (default: the folder names).")
    return parser


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(f"--out {args.out}: the picture is a PNG, name it FILE.png")
    if args.label is not None and len(args.label) != len(args.dump_paths):
        raise UsageError(f"{len(args.label)} --label for {len(args.dump_paths)} runs: give one per run or none")
    out = plots.write_plot(args.dump_paths, args.out, args.label)
    print(f"wrote {out}")


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
