#!/usr/bin/env python
"""Benchmark data_prep/build_corpus.py: 1 and 2 workers beside the decompression floor and the
single-process code it replaced, in one run; then project the whole preparation onto a node.

    python bench/corpus_bench.py --work_dir /tmp/corpus_bench            # shared corpora, ~24 MB each
    python bench/corpus_bench.py --work_dir /tmp/corpus_bench --quick    # tiny synthetic input (tests)

Inputs of realistic shape, made once in --work_dir (kept for reruns):
    cc100   paragraphs (one per line) in documents of 1-6 paragraphs, a blank line between
            documents, as one .xz block (CC-100's ja.txt.xz) and as 4 MiB blocks (`xz -T0`'s layout);
    jawiki  a CirrusSearch-style .json.gz: an index line, then {"title", "text", "namespace"} per
            article, whose text is ~14 paragraphs joined by spaces (how CirrusSearch flattens them).
The paragraphs come from --corpus_dir (the shared Japanese corpora: JaQuAD Wikipedia, Wikinews,
Aozora Bunko), or, with --quick or without that folder, from a small generator here.

Every command runs as a subprocess; wall time and CPU time (user + system of the process and its
workers) are measured for each.  On shared cores wall time depends on the other users' load (logged
before and after); CPU seconds per MB do much less, and the projection uses those.

The old code is data_prep/build_corpus.py at OLD_COMMIT (`git show`), run on the same files; its
output is checked to be byte-identical to the new one's.
"""
import argparse
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja.outputs import MARKER  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "38f8d4b"  # the last single-process build_corpus.py
SHARED = os.path.join(os.path.dirname(REPO), "shared", "corpora")  # the project's shared/, beside the checkout
SHARED_FILES = ("jawiki_jaquad_train.txt.xz", "jawikinews.txt.xz", "aozora_modern_50MB.txt.xz")
BLOCK = 4 << 20

# binarize's measured rate (bench/RESULTS.md "binarize": 1,448,356 tokens/s with 2 workers on 2 shared
# cores, 11,842,673 tokens from 68.2 MB of text).
BINARIZE_TOKENS_PER_CORE_S = 1_448_356 / 2
TOKENS_PER_MB = 11_842_673 / 68.2


# ---------------------------------------------------------------------------------------- inputs


def synthetic_paragraphs(n, seed=0):
    rng = random.Random(seed)
    words = "東京 大阪 学校 先生 電車 公園 図書館 音楽 映画 料理 天気 友達 会社 研究 歴史 文化 言語 世界 経済 科学 技術".split()
    ends = ["です。", "でした。", "と言われている。", "がある。", "（参考）。", "「はい。」と答えた。"]
    out = []
    for _ in range(n):
        sentences = ["".join(rng.choice(words) + rng.choice("はがをにでとの") for _ in range(rng.randint(3, 9)))
                     + rng.choice(ends) for _ in range(rng.randint(1, 6))]
        out.append("".join(sentences))
    return out


def shared_paragraphs(corpus_dir, mb):
    """Non-empty lines of the shared corpora, in turn from each file, up to mb MB."""
    readers = [lzma.open(os.path.join(corpus_dir, name), "rt", encoding="utf-8") for name in SHARED_FILES]
    out, size = [], 0
    try:
        while readers and size < mb * 1e6:
            for r in list(readers):
                line = r.readline()
                if not line:
                    readers.remove(r)
                    continue
                line = line.strip()
                if line:
                    out.append(line)
                    size += len(line.encode("utf-8"))
    finally:
        for r in readers:
            r.close()
    return out


def cc100_text(paragraphs, seed=1):
    rng = random.Random(seed)
    docs, i = [], 0
    while i < len(paragraphs):
        k = rng.randint(1, 6)
        docs.append("\n".join(paragraphs[i:i + k]))
        i += k
    return ("\n\n".join(docs) + "\n").encode("utf-8")


def cirrus_json(paragraphs, seed=2):
    rng = random.Random(seed)
    lines, i, n = [], 0, 0
    while i < len(paragraphs):
        k = rng.randint(4, 24)
        lines.append(json.dumps({"index": {"_type": "page", "_id": str(n)}}))
        lines.append(json.dumps({"title": f"記事{n}", "text": " ".join(paragraphs[i:i + k]), "namespace": 0},
                                ensure_ascii=False))
        i += k
        n += 1
    return ("\n".join(lines) + "\n").encode("utf-8")


def make_inputs(work_dir, quick, corpus_dir, mb):
    """{name: (path, source, raw bytes)}, made once (a .done marker says the files are complete)."""
    folder = os.path.join(work_dir, "inputs")
    marker = os.path.join(folder, ".done")
    names = {"cc100": "cc100.txt.xz", "cc100_blocks": "cc100_blocks.txt.xz", "jawiki": "jawiki.json.gz"}
    if not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        if quick or not os.path.isdir(corpus_dir):
            paragraphs = synthetic_paragraphs(600 if quick else int(mb * 2000))
        else:
            paragraphs = shared_paragraphs(corpus_dir, mb)
        cc, cirrus = cc100_text(paragraphs), cirrus_json(paragraphs)
        block = 64 << 10 if quick else BLOCK
        with open(os.path.join(folder, names["cc100"]), "wb") as f:
            f.write(lzma.compress(cc))
        with open(os.path.join(folder, names["cc100_blocks"]), "wb") as f:  # streams of one block each
            f.write(b"".join(lzma.compress(cc[i:i + block]) for i in range(0, len(cc), block)))
        with gzip.open(os.path.join(folder, names["jawiki"]), "wb") as f:
            f.write(cirrus)
        json.dump({"cc100": len(cc), "cc100_blocks": len(cc), "jawiki": len(cirrus)}, open(marker, "w"))
    sizes = json.load(open(marker))
    sources = {"cc100": "cc100", "cc100_blocks": "cc100", "jawiki": "jawiki-cirrus"}
    return {k: (os.path.join(folder, names[k]), sources[k], sizes[k]) for k in names}


# ---------------------------------------------------------------------------------------- runs


def timed(cmd, env=None, stdout=subprocess.DEVNULL):
    """(wall s, CPU s of the process tree, stderr) of a command that must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stderr


def old_script(work_dir):
    """The single-process build_corpus.py of OLD_COMMIT, written beside the inputs."""
    path = os.path.join(work_dir, f"build_corpus_{OLD_COMMIT}.py")
    if not os.path.exists(path):
        text = subprocess.run(["git", "-C", REPO, "show", f"{OLD_COMMIT}:data_prep/build_corpus.py"],
                              capture_output=True, text=True, check=True).stdout
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def tree_digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name in ("stats.json", MARKER):  # the old code writes no deletion-rule marker
                continue
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


CPU_LINE = re.compile(r"cpu: parent \(reader, writer\) ([\d.]+)s, of which the reader thread ([\d.]+)s; "
                      r"workers ([\d.]+)s")


def build_cmd(script, source, path, out):
    return [sys.executable, script, "--source", source, "--input", path, "--output_dir", out, "--quiet",
            "--overwrite"]


def floor_cmd(path, threads=1):
    if path.endswith(".gz"):
        return ["gzip", "-dc", path] if shutil.which("gzip") else None
    return ["xz", "-dc", f"-T{threads}", path] if shutil.which("xz") else None


def startup_cpu(work_dir, workers, env):
    """(parent, workers) CPU seconds of a run on one tiny document: imports and process start, which the
    projection takes off before scaling a run's CPU time to the real corpus."""
    path = os.path.join(work_dir, "tiny.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("一つの文書です。\n")
    cmd = build_cmd(os.path.join(REPO, "data_prep", "build_corpus.py"), "text", path,
                    os.path.join(work_dir, "out", "tiny")) + ["--num_workers", str(workers)]
    m = CPU_LINE.search(timed(cmd, env)[2])
    return float(m.group(1)), float(m.group(3))


def run_all(inputs, work_dir, workers):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    new = os.path.join(REPO, "data_prep", "build_corpus.py")
    old = old_script(work_dir)
    rows = [{"input": "tiny", "run": f"start-up, {n} worker{'s' * (n > 1)}", "raw_mb": 0.0, "wall_s": 0.0,
             "cpu_s": sum(cpu), "mb_per_s": 0.0, "mb_per_cpu_s": 0.0, "parent_cpu_s": cpu[0], "worker_cpu_s": cpu[1]}
            for n in workers for cpu in [startup_cpu(work_dir, n, env)]]
    for name, (path, source, raw) in inputs.items():
        variants = []
        if name != "cc100_blocks":
            variants.append(("floor: " + " ".join(floor_cmd(path)[:2]), floor_cmd(path), None))
            variants.append((f"old ({OLD_COMMIT}, 1 process)", build_cmd(old, source, path, "old"), "old"))
        else:
            variants.append(("floor: xz -dc -T2", floor_cmd(path, 2), None))
        for n in workers:
            variants.append((f"new, {n} worker{'s' * (n > 1)}",
                             build_cmd(new, source, path, f"new{n}") + ["--num_workers", str(n)], f"new{n}"))
        digests = {}
        for label, cmd, out in variants:
            if cmd is None:
                continue
            if out:
                cmd[cmd.index("--output_dir") + 1] = out = os.path.join(work_dir, "out", name, out)
            wall, cpu, err = timed(cmd, env)
            row = {"input": name, "run": label, "raw_mb": raw / 1e6, "wall_s": wall, "cpu_s": cpu,
                   "mb_per_s": raw / 1e6 / wall, "mb_per_cpu_s": raw / 1e6 / max(cpu, 1e-9)}
            m = CPU_LINE.search(err)
            if m:
                row["parent_cpu_s"], row["reader_cpu_s"], row["worker_cpu_s"] = map(float, m.groups())
            if out:
                digests[label] = tree_digest(out)
            rows.append(row)
        same = len(set(digests.values())) == 1
        for row in rows:
            if row["input"] == name and row["run"] in digests:
                row["same_output"] = same
    return rows


# a binarize run whose parent and worker CPU times are told apart: the script run as __main__ in a
# process that then prints its own and its (finished) workers' CPU seconds
SPLIT_CPU = """
import resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"split-cpu {s.ru_utime + s.ru_stime:.3f} {c.ru_utime + c.ru_stime:.3f}", file=sys.stderr)
"""


def run_binarize(work_dir, tokenizer, workers, env):
    """Rows for binarize.py (workers processes) on the new build's cc100 + jawiki text, and on one
    tiny document (its start-up)."""
    script = os.path.join(REPO, "data_prep", "binarize.py")
    n = max(workers)
    doc_dirs = [os.path.join(work_dir, "out", name, f"new{n}", "doc_data") for name in ("jawiki", "cc100")]
    tiny = os.path.join(work_dir, "tiny_doc")
    os.makedirs(tiny, exist_ok=True)
    with open(os.path.join(tiny, "0.txt"), "w", encoding="utf-8") as f:
        f.write("一つの文書です。\n\n")
    rows = []
    for label, inputs in (("start-up", [tiny]), (f"{n} workers", doc_dirs)):
        raw = sum(os.path.getsize(os.path.join(d, f)) for d in inputs for f in os.listdir(d) if f != MARKER)
        cmd = [sys.executable, "-c", SPLIT_CPU, script, "--input", *inputs, "--tokenizer", tokenizer, "--output_dir",
               os.path.join(work_dir, "out", "binarized", label.split()[0]), "--num_workers", str(n), "--quiet",
               "--overwrite", "--allow_bad_text"]
        wall, cpu, err = timed(cmd, env)
        parent, children = map(float, re.search(r"split-cpu ([\d.]+) ([\d.]+)", err).groups())
        tokens = int(re.search(r"(\d+) tokens \(", err).group(1))
        rows.append({"input": "binarize", "run": f"binarize, {label}", "raw_mb": raw / 1e6, "wall_s": wall,
                     "cpu_s": cpu, "mb_per_s": raw / 1e6 / wall, "mb_per_cpu_s": raw / 1e6 / max(cpu, 1e-9),
                     "parent_cpu_s": parent, "reader_cpu_s": 0.0, "worker_cpu_s": children, "tokens": tokens})
    return rows


# ---------------------------------------------------------------------------------------- projection


def projection(rows, args):
    """Wall time of each stage on a node of args.cores cores, from CPU seconds per MB.

    A stage takes the longest of: its parent's busier thread (the reader: decompression and cutting;
    the main thread: handing chunks to the workers and writing), its workers' CPU spread over cores - 1,
    and the decompression floor; start-up CPU (a run on one tiny document) is taken off first.
    Binarize from RESULTS.md's rate per core.
    """
    def rate(name, run):
        return next(r for r in rows if r["input"] == name and r["run"] == run)

    n = max(w for w in args.workers)
    label = f"new, {n} worker{'s' * (n > 1)}"
    stages = []
    for stage, name, mb in (("jawiki build_corpus", "jawiki", args.jawiki_json_gb * 1e3),
                            ("cc100 build_corpus (one xz block)", "cc100", args.cc100_text_gb * 1e3),
                            ("cc100 build_corpus (multi-block xz)", "cc100_blocks", args.cc100_text_gb * 1e3)):
        r, start = rate(name, label), rate("tiny", label.replace("new", "start-up"))
        # the parent's two threads overlap (decompression releases the GIL): the busier one bounds it
        main_thread = r["parent_cpu_s"] - r["reader_cpu_s"] - start["parent_cpu_s"]
        parent_s = max(r["reader_cpu_s"], main_thread, 0) / r["raw_mb"] * mb
        worker_s = max(r["worker_cpu_s"] - start["worker_cpu_s"], 0) / r["raw_mb"] * mb / (args.cores - 1)
        floor = next(x for x in rows if x["input"] == name and x["run"].startswith("floor"))
        floor_s = floor["cpu_s"] / floor["raw_mb"] * mb / (args.floor_threads if name == "cc100_blocks" else 1)
        bound = max(("parent (reader/writer)", parent_s), ("workers", worker_s), ("decompression floor", floor_s),
                    key=lambda x: x[1])
        stages.append({"stage": stage, "input_mb": mb, "parent_s": parent_s, "workers_s": worker_s,
                       "floor_s": floor_s, "wall_s": bound[1], "bound_by": bound[0]})
    text_mb = args.cc100_text_gb * 1e3 * args.cc100_kept + args.jawiki_text_gb * 1e3
    measured = [r for r in rows if r["input"] == "binarize"]
    if measured:  # parents side by side (prepare.py --binarize_jobs), workers on the other cores
        start, r = measured
        jobs = max(1, args.cores // 4)
        parent_s = (r["parent_cpu_s"] - start["parent_cpu_s"]) / r["raw_mb"] * text_mb / jobs
        worker_s = (r["worker_cpu_s"] - start["worker_cpu_s"]) / r["raw_mb"] * text_mb / (args.cores - jobs)
        bound = max((f"binarize parents ({jobs} jobs)", parent_s), ("tokenizing workers", worker_s),
                    key=lambda x: x[1])
        stages.append({"stage": f"binarize ({jobs} jobs side by side)", "input_mb": text_mb, "parent_s": parent_s,
                       "workers_s": worker_s, "wall_s": bound[1], "bound_by": bound[0]})
        one_parent = parent_s * jobs
        stages[-1]["one_job_s"] = max(one_parent, (r["worker_cpu_s"] - start["worker_cpu_s"]) / r["raw_mb"]
                                      * text_mb / (args.cores - 1))
    else:
        binarize_s = text_mb * TOKENS_PER_MB / (BINARIZE_TOKENS_PER_CORE_S * args.cores)
        stages.append({"stage": "binarize (jawiki + cc100 text)", "input_mb": text_mb, "wall_s": binarize_s,
                       "bound_by": f"tokenizing workers ({BINARIZE_TOKENS_PER_CORE_S:,.0f} tok/s/core, RESULTS.md; "
                                   "its parent not measured: pass --tokenizer)"})
    return stages


def report(rows, stages, args, loads):
    print(f"load average before {loads[0]}, after {loads[1]}; {os.cpu_count()} cores here")
    print("\n| input | run | raw MB | wall s | MB/s | CPU s | MB per CPU-s | parent (reader thread) / workers CPU s "
          "| same output |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if r["input"] == "tiny":
            print(f"| tiny | {r['run']} | – | – | – | {r['cpu_s']:.2f} | – | {r['parent_cpu_s']:.2f} / "
                  f"{r['worker_cpu_s']:.2f} | – |")
            continue
        split = (f"{r['parent_cpu_s']:.2f} ({r['reader_cpu_s']:.2f}) / {r['worker_cpu_s']:.2f}"
                 if "parent_cpu_s" in r else "–")
        same = {True: "yes", False: "**no**"}.get(r.get("same_output"), "–")
        print(f"| {r['input']} | {r['run']} | {r['raw_mb']:.1f} | {r['wall_s']:.2f} | {r['mb_per_s']:.1f} | "
              f"{r['cpu_s']:.2f} | {r['mb_per_cpu_s']:.1f} | {split} | {same} |")
    print(f"\nProjection, {args.cores} cores (jawiki JSON {args.jawiki_json_gb} GB, CC-100 text {args.cc100_text_gb} "
          f"GB, binarize input {stages[-1]['input_mb'] / 1e3:.1f} GB):")
    print("\n| stage | input GB | parent s | workers s | floor s | wall min | bound by |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in stages:
        cells = [f"{s[k]:.0f}" if k in s else "–" for k in ("parent_s", "workers_s", "floor_s")]
        print(f"| {s['stage']} | {s['input_mb'] / 1e3:.1f} | {' | '.join(cells)} | {s['wall_s'] / 60:.1f} | "
              f"{s['bound_by']} |")
    if "one_job_s" in stages[3]:
        print(f"\n(binarize as one job, one parent: {stages[3]['one_job_s'] / 60:.1f} min)")
    for layout, cc in (("one xz block", stages[1]), ("multi-block xz", stages[2])):
        total = stages[0]["wall_s"] + cc["wall_s"] + stages[3]["wall_s"]
        print(f"\ntotal with CC-100 as {layout}: {total / 60:.1f} min "
              f"({'under' if total <= 3600 else 'over'} the hour by {abs(3600 - total) / 60:.1f} min)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--quick", action="store_true", help="tiny synthetic input (seconds; for tests)")
    p.add_argument("--corpus_dir", default=SHARED)
    p.add_argument("--mb", type=float, default=24.0, help="MB of paragraphs per input")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cores", type=int, default=16, help="cores of the node projected onto")
    p.add_argument("--floor_threads", type=int, default=8,
                   help="threads `xz -dc -T` gets for a multi-block file on that node (projection)")
    p.add_argument("--cc100_text_gb", type=float, default=70.0)
    p.add_argument("--cc100_kept", type=float, default=0.97, help="share of CC-100's text that survives cleaning")
    p.add_argument("--jawiki_json_gb", type=float, default=16.0,
                   help="uncompressed CirrusSearch content dump (~4 GB gz); its text is cleaned whole")
    p.add_argument("--jawiki_text_gb", type=float, default=4.0, help="jawiki text after cleaning (binarize input)")
    p.add_argument("--tokenizer", help="also measure binarize.py (parent and workers apart) with this tokenizer")
    p.add_argument("--json", help="write the rows and the projection here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    inputs = make_inputs(args.work_dir, args.quick, args.corpus_dir, args.mb)
    before = os.getloadavg()
    rows = run_all(inputs, args.work_dir, args.workers)
    if args.tokenizer:
        rows += run_binarize(args.work_dir, args.tokenizer, args.workers,
                             dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    loads = (tuple(round(x, 2) for x in before), tuple(round(x, 2) for x in os.getloadavg()))
    stages = projection(rows, args)
    report(rows, stages, args, loads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "projection": stages, "load": loads, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
