#!/usr/bin/env python
"""The whole data preparation in one command, resumable: dumps -> cleaned text -> binarized shards.

    python data_prep/prepare.py --output_dir data/prep --tokenizer rinna/japanese-gpt2-medium \
        --jawiki jawiki-20240101-cirrussearch-content.json.gz --cc100 ja.txt.xz --dev_docs 2000

Stages, each one command run as a subprocess (its progress bar, with bytes and ETA, and its
log lines go to the terminal):
    jawiki    build_corpus.py --source jawiki-cirrus  -> OUT/corpus/jawiki/
    cc100     build_corpus.py --source cc100          -> OUT/corpus/cc100/
    binarize  binarize.py on both doc_data/ folders   -> OUT/binarized/
Either dump may be left out (at least one is needed).

Resuming: a stage that exits 0 gets a marker, OUT/stages/NAME.json (its command line), written last
and atomically.  A rerun skips every stage whose marker holds the same command; the first stage it
runs (no marker, or other settings) is started afresh (--overwrite: the folder is this pipeline's
own), and so is every stage after it, since they read its output.  So after Ctrl-C, a killed job
or a failed stage, the same command resumes at the stage that did not finish.

Exit status (distil_ja/cli.py): that of the first stage that failed (its one `error:` line is
above; the stages before it stay done), 2 for bad flags, 130 interrupted.
"""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja import fileio
from distil_ja.cli import ArgumentParser, UsageError, run_command, setup_logging

logger = logging.getLogger("prepare")

HERE = os.path.dirname(os.path.abspath(__file__))


def stages(args):
    """(name, output folder, command) of each stage to run, in order."""
    out = args.output_dir
    common = ["--num_workers", str(args.num_workers)] + (["--quiet"] if args.quiet else [])
    found, doc_dirs = [], []
    for name, source, inputs in (("jawiki", "jawiki-cirrus", args.jawiki), ("cc100", "cc100", args.cc100)):
        if not inputs:
            continue
        folder = os.path.join(out, "corpus", name)
        found.append((name, folder, [os.path.join(HERE, "build_corpus.py"), "--source", source, "--input",
                                     *map(os.path.abspath, inputs), "--output_dir", folder,
                                     "--dev_docs", str(args.dev_docs), *common]))
        doc_dirs.append(os.path.join(folder, "doc_data"))
    folder = os.path.join(out, "binarized")
    tokenizer = os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer) else args.tokenizer
    found.append(("binarize", folder, [os.path.join(HERE, "binarize.py"), "--input", *doc_dirs, "--tokenizer",
                                       tokenizer, "--output_dir", folder, "--shard_size",
                                       str(args.shard_size), *common]))
    return found


def marker_path(output_dir, name):
    return os.path.join(output_dir, "stages", f"{name}.json")


def is_done(output_dir, name, command):
    """Whether the stage's marker says it finished with this very command."""
    try:
        with open(marker_path(output_dir, name), encoding="utf-8") as f:
            return json.load(f).get("command") == command
    except (OSError, ValueError):
        return False


def run_stage(name, folder, command, index, count):
    """Run one stage afresh; returns its exit status.  Ctrl-C reaches the stage too (same process
    group): it is waited for, then the interrupt is re-raised saying where a rerun resumes."""
    logger.info("stage %d/%d %s: %s", index, count, name, " ".join(command))
    overwrite = ["--overwrite"] if os.path.exists(folder) else []
    proc = subprocess.Popen([sys.executable, *command, *overwrite])
    try:
        status = proc.wait()
        return status if status >= 0 else 128 - status  # killed by a signal: the shell's 128 + N
    except KeyboardInterrupt:
        proc.wait()
        raise KeyboardInterrupt(f"stage {name} did not finish; rerun the same command to resume from it") from None


def prepare(args):
    """Run the stages not done yet; returns the exit status (0, or the first failed stage's)."""
    todo = stages(args)
    os.makedirs(os.path.join(args.output_dir, "stages"), exist_ok=True)
    redo_rest = False
    t0 = time.time()
    for index, (name, folder, command) in enumerate(todo, 1):
        if not redo_rest and is_done(args.output_dir, name, command):
            logger.info("stage %d/%d %s: done earlier (%s), skipped", index, len(todo), name,
                        marker_path(args.output_dir, name))
            continue
        redo_rest = True
        if os.path.exists(marker_path(args.output_dir, name)):
            os.remove(marker_path(args.output_dir, name))  # its output is about to be replaced
        started = time.time()
        status = run_stage(name, folder, command, index, len(todo))
        if status != 0:
            logger.error("stage %s failed (exit %d); the stages before it are kept: rerun to resume", name, status)
            return status
        fileio.write_json(marker_path(args.output_dir, name),
                          {"command": command, "seconds": round(time.time() - started, 1)})
    logger.info("prepared in %.0fs: %s", time.time() - t0, os.path.join(args.output_dir, "binarized"))
    return 0


def build_parser():
    parser = ArgumentParser(description="Dumps to binarized shards, resumable (see module docstring).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer", required=True, help="hub name (rinna/japanese-gpt2-medium) or directory")
    parser.add_argument("--jawiki", nargs="+", help="CirrusSearch content dump(s), *.json.gz")
    parser.add_argument("--cc100", nargs="+", help="CC-100 ja.txt.xz (or .txt)")
    parser.add_argument("--dev_docs", type=int, default=0, help="documents each corpus holds out to dev_data/")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="processes per stage (default 0: build_corpus the usable cores minus one, "
                             "binarize all cores)")
    parser.add_argument("--shard_size", type=int, default=20_000_000, help="tokens per shard (binarize)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(argv):
    args = build_parser().parse_args(argv)
    if not (args.jawiki or args.cc100):
        raise UsageError("nothing to prepare: give --jawiki, --cc100 or both")
    return prepare(args)


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
