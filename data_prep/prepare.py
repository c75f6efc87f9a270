#!/usr/bin/env python
"""The whole data preparation in one command, resumable: dumps -> cleaned text -> binarized shards.

    python data_prep/prepare.py --output_dir data/prep --tokenizer rinna/japanese-gpt2-medium \
        --jawiki jawiki-20240101-cirrussearch-content.json.gz --cc100 ja.txt.xz --dev_docs 2000

Stages, run as subprocesses (their progress bars, with bytes and ETA, and log lines go to the
terminal):
    jawiki    build_corpus.py --source jawiki-cirrus    -> OUT/corpus/jawiki/
    cc100     build_corpus.py --source cc100            -> OUT/corpus/cc100/
    binarize  --binarize_jobs binarize.py side by side,  -> OUT/binarized/part-0/, part-1/, ...
              each on a consecutive share of both doc_data/ folders (one binarize parent reads
              and assembles shards on one core: on a large node it, not the workers, is the limit)
Either dump may be left out (at least one is needed).  Train with
`--data_file OUT/binarized/part-*` (the parts in order hold the documents in input order).

Resuming: a stage that exits 0 gets a marker, OUT/stages/NAME.json (its command lines), written
last and atomically.  A rerun skips every stage whose marker holds the same commands; the first
stage it runs (no marker, or other settings) is started afresh (its folder, which this pipeline
created and marked, emptied first: distil_ja.outputs' rule), and so is every stage after it, since they read its output.  So
after Ctrl-C, a killed job or a failed stage, the same command resumes at the stage that did not
finish.

Exit status (distil_ja/cli.py): that of the first stage that failed (its one `error:` line is
above; the stages before it stay done), 2 for bad flags, 130 interrupted.
"""
import collections
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja import fileio, outputs, workers
from distil_ja.cli import EXIT_INTERRUPTED, ArgumentParser, UsageError, run_command, setup_logging
from distil_ja.tokenization import expand_paths

logger = logging.getLogger("prepare")

HERE = os.path.dirname(os.path.abspath(__file__))


Stage = collections.namedtuple("Stage", "name folder commands")
"""A stage: its name, the folder it fills (the pipeline's own: removed before the stage runs) and a
function giving its command lines (run at once; called when the stage is reached, as binarize's
depend on the files the stages before it wrote)."""


def stages(args):
    """The stages to run, in order."""
    out = args.output_dir
    found, doc_dirs = [], []
    for name, source, inputs in (("jawiki", "jawiki-cirrus", args.jawiki), ("cc100", "cc100", args.cc100)):
        if not inputs:
            continue
        folder = os.path.join(out, "corpus", name)
        command = [os.path.join(HERE, "build_corpus.py"), "--source", source, "--input",
                   *map(os.path.abspath, inputs), "--output_dir", folder, "--dev_docs", str(args.dev_docs),
                   "--num_workers", str(args.num_workers)] + (["--quiet"] if args.quiet else [])
        found.append(Stage(name, folder, functools.partial(lambda c: [c], command)))
        doc_dirs.append(os.path.join(folder, "doc_data"))
    folder = os.path.join(out, "binarized")
    found.append(Stage("binarize", folder, functools.partial(binarize_commands, args, doc_dirs, folder)))
    return found


def binarize_commands(args, doc_dirs, folder):
    """--binarize_jobs binarize.py commands over consecutive groups of the doc_data files (about
    equal bytes each), into folder/part-0, part-1, ...: one binarize parent reads and assembles
    shards on one core, so several run side by side on a large node.  The first shows the bar."""
    files = expand_paths(doc_dirs)
    jobs = max(1, min(args.binarize_jobs or default_binarize_jobs(), len(files)))
    workers_each = args.num_workers or max(1, workers.usable_cores() // jobs - 1)
    sizes = [os.path.getsize(f) for f in files]
    total, groups, done = sum(sizes), [[] for _ in range(jobs)], 0
    for path, size in zip(files, sizes):
        groups[min(jobs - 1, int((done + size / 2) * jobs / max(total, 1)))].append(path)  # by its middle byte
        done += size
    tokenizer = os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer) else args.tokenizer
    return [[os.path.join(HERE, "binarize.py"), "--input", *group, "--tokenizer", tokenizer, "--output_dir",
             os.path.join(folder, f"part-{i}"), "--shard_size", str(args.shard_size),
             "--num_workers", str(workers_each)] + (["--quiet"] if args.quiet or i else [])
            + (["--allow_bad_text"] if args.allow_bad_text else [])
            for i, group in enumerate(g for g in groups if g)]


def default_binarize_jobs():
    """One binarize job per 4 usable cores (a parent and 3 workers each), at least 1."""
    return max(1, workers.usable_cores() // 4)


def marker_path(output_dir, name):
    return os.path.join(output_dir, "stages", f"{name}.json")


def is_done(output_dir, name, commands):
    """Whether the stage's marker says it finished with these very commands."""
    try:
        with open(marker_path(output_dir, name), encoding="utf-8") as f:
            return json.load(f).get("commands") == commands
    except (OSError, ValueError):
        return False


def run_stage(stage, commands, index, count):
    """Run one stage afresh (its folder removed first), its commands side by side; returns the first
    failed command's exit status or 0.  Ctrl-C reaches the commands too (same process group): they
    are waited for, and their status (130) is the stage's."""
    if outputs.will_replace(stage.folder, True, "a rerun of prepare.py", "stage folder"):  # the deletion rule
        outputs.empty(stage.folder)
    outputs.claim(stage.folder, "prepare.py")
    for command in commands:
        logger.info("stage %d/%d %s: %s", index, count, stage.name, " ".join(command))
    procs = [subprocess.Popen([sys.executable, *command]) for command in commands]
    try:
        statuses = [proc.wait() for proc in procs]
    except KeyboardInterrupt:  # the stage's commands got it too and print the one error line
        statuses = [proc.wait() for proc in procs]
        return next((s for s in statuses if s), EXIT_INTERRUPTED)
    failed = [s if s >= 0 else 128 - s for s in statuses if s != 0]  # killed by a signal: the shell's 128 + N
    return failed[0] if failed else 0


def prepare(args):
    """Run the stages not done yet; returns the exit status (0, or the first failed stage's)."""
    todo = stages(args)
    outputs.check_folder(args.output_dir, "--output_dir")
    outputs.claim(args.output_dir, "prepare.py")
    os.makedirs(os.path.join(args.output_dir, "stages"), exist_ok=True)
    redo_rest = False
    t0 = time.time()
    for index, stage in enumerate(todo, 1):
        commands = stage.commands()
        if not redo_rest and is_done(args.output_dir, stage.name, commands):
            logger.info("stage %d/%d %s: done earlier (%s), skipped", index, len(todo), stage.name,
                        marker_path(args.output_dir, stage.name))
            continue
        redo_rest = True
        if os.path.exists(marker_path(args.output_dir, stage.name)):
            os.remove(marker_path(args.output_dir, stage.name))  # its output is about to be replaced
        started = time.time()
        status = run_stage(stage, commands, index, len(todo))
        if status != 0:
            logger.error("stage %s did not finish (exit %d); the stages before it are kept: rerun the same "
                         "command to resume from it", stage.name, status)
            return status
        fileio.write_json(marker_path(args.output_dir, stage.name),
                          {"commands": commands, "seconds": round(time.time() - started, 1)})
    parts = sorted(p for p in os.listdir(todo[-1].folder) if p.startswith("part-"))
    logger.info("prepared in %.0fs; train with --data_file %s", time.time() - t0,
                " ".join(os.path.join(todo[-1].folder, p) for p in parts))
    return 0


def build_parser():
    parser = ArgumentParser(description="Dumps to binarized shards, resumable (see module docstring).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer", required=True, help="hub name (rinna/japanese-gpt2-medium) or directory")
    parser.add_argument("--jawiki", nargs="+", help="CirrusSearch content dump(s), *.json.gz")
    parser.add_argument("--cc100", nargs="+", help="CC-100 ja.txt.xz (or .txt)")
    parser.add_argument("--dev_docs", type=int, default=0, help="documents each corpus holds out to dev_data/")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="worker processes per command (default 0: build_corpus the usable cores minus "
                             "one; each binarize job its share of them minus one)")
    parser.add_argument("--shard_size", type=int, default=20_000_000, help="tokens per shard (binarize)")
    parser.add_argument("--binarize_jobs", type=int, default=0,
                        help="binarize processes side by side, each on a share of the text (default 0: one per "
                             "4 usable cores, at least 1)")
    parser.add_argument("--allow_bad_text", action="store_true", help="binarize: see binarize.py --help")
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
