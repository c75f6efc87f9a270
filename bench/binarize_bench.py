#!/usr/bin/env python
"""Benchmark data_prep/binarize.py against the upstream approach, and its peak memory.

Upstream (huggingface distillation scripts/binarized_data.py) calls a transformers tokenizer
once per line in one process.  Here the baseline does exactly that (with the same explicit
lowercasing and <s> ... </s> per document, so both produce the same ids, which is checked),
on the same text as our binarize.py run, in the same invocation.  Peak RSS of binarize.py
(parent + worker processes, summed, sampled from /proc every 20 ms) is measured at two corpus
sizes to show it does not grow with the corpus.

    python bench/binarize_bench.py --tokenizer TOKDIR --input CORPUS/doc_data ... \
        --work_dir /tmp/bench/run --small_mb 8 --num_workers 2

The small corpus is every k-th document of the inputs (same mix of sources), 'all' is all of
them, 'all_xN' all of them N times (memory only: same document mix as 'all').  Prints a markdown summary; --json writes the raw figures.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja.shards import load_manifest, load_sequences  # noqa: E402
from distil_ja.tokenization import iter_documents, load_tokenizer, normalize_text  # noqa: E402


def write_docs(docs, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            text = "\n".join(doc) + "\n\n"
            n_bytes += len(text.encode("utf-8"))
            f.write(text)
    return n_bytes


def make_corpora(inputs, work_dir, small_mb, repeat):
    """small: every k-th document of the inputs; all: the inputs; repeated: the inputs `repeat`
    times (same document mix as 'all', so peak memory can be compared at equal document sizes)."""
    full = os.path.join(work_dir, "all", "0.txt")
    total = write_docs(iter_documents(inputs), full)
    k = max(1, round(total / (small_mb * 1e6)))
    small = os.path.join(work_dir, "small", "0.txt")
    small_bytes = write_docs((d for i, d in enumerate(iter_documents(full)) if i % k == 0), small)
    corpora = {"small": (os.path.dirname(small), small_bytes), "all": (os.path.dirname(full), total)}
    if repeat > 1:
        rep = os.path.join(work_dir, f"all_x{repeat}", "0.txt")
        rep_bytes = write_docs((d for _ in range(repeat) for d in iter_documents(full)), rep)
        corpora[f"all_x{repeat}"] = (os.path.dirname(rep), rep_bytes)
    return corpora


def upstream_baseline(tokenizer, text_dir):
    """One process, the transformers tokenizer called line by line (upstream's approach)."""
    tok = load_tokenizer(tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    t0 = time.perf_counter()
    seqs = []
    for doc in iter_documents(text_dir):
        ids = [bos]
        for line in doc:
            ids.extend(tok.encode(normalize_text(line), add_special_tokens=False))
        ids.append(eos)
        seqs.append(np.array(ids, dtype=np.uint16))
    elapsed = time.perf_counter() - t0
    return seqs, elapsed


def _tree_rss_kb(root):
    """Summed RSS (kB) of root and its descendants, from /proc."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_binarize(tokenizer, text_dir, out_dir, num_workers, extra=()):
    """Run data_prep/binarize.py in a subprocess; wall time and peak summed RSS of its tree."""
    cmd = [sys.executable, "data_prep/binarize.py", "--input", text_dir, "--tokenizer", tokenizer,
           "--output_dir", out_dir, "--num_workers", str(num_workers), "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kb(proc.pid))
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"binarize failed: {err.strip()}")
    return {"command": " ".join(cmd), "wall_s": elapsed, "peak_rss_mb": peak / 1024,
            "manifest": load_manifest(out_dir)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--work_dir", default="/tmp/binarize_bench")
    p.add_argument("--small_mb", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=3, help="also binarize the inputs repeated N times (memory check)")
    p.add_argument("--num_workers", type=int, default=os.cpu_count())
    p.add_argument("--shard_size", type=int, default=1_000_000,
                   help="tokens per shard; below both corpus sizes so memory is seen at steady state")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if os.path.exists(args.work_dir):
        shutil.rmtree(args.work_dir)
    corpora = make_corpora(args.input, args.work_dir, args.small_mb, args.repeat)
    results = {"num_workers": args.num_workers, "tokenizer": args.tokenizer, "shard_size": args.shard_size,
               "corpora": {}}
    for name, (text_dir, n_bytes) in corpora.items():
        r = run_binarize(args.tokenizer, text_dir, os.path.join(args.work_dir, f"bin_{name}"), args.num_workers,
                         ["--shard_size", str(args.shard_size)])
        tokens = r["manifest"]["totals"]["tokens"]
        results["corpora"][name] = {
            "text_mb": n_bytes / 1e6, "documents": r["manifest"]["totals"]["documents"], "tokens": tokens,
            "unk_tokens": r["manifest"]["totals"]["unk_tokens"], "wall_s": r["wall_s"],
            "tokens_per_s": tokens / r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "command": r["command"],
        }
    # the upstream approach on the same two corpora; its ids are compared with ours
    for name, (text_dir, _) in corpora.items():
        if name.startswith("all_x"):
            continue  # same text as 'all', repeated: only our speed and memory
        base_seqs, base_s = upstream_baseline(args.tokenizer, text_dir)
        out_dir = os.path.join(args.work_dir, f"bin_{name}")
        ours, _ = load_sequences([out_dir])
        assert len(ours) == len(base_seqs)
        differing = sum(not np.array_equal(a, b) for a, b in zip(ours, base_seqs))
        base_tokens = int(sum(len(s) for s in base_seqs))
        r = results["corpora"][name]
        r.update({"upstream_wall_s": base_s, "upstream_tokens": base_tokens,
                  "upstream_tokens_per_s": base_tokens / base_s, "documents_differing": differing,
                  "speedup": r["tokens_per_s"] / (base_tokens / base_s)})
    print(f"| corpus | text MB | documents | tokens | upstream tok/s | binarize.py tok/s ({args.num_workers} workers) "
          f"| speed-up | binarize.py peak RSS (parent+workers) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results["corpora"].items():
        up = f"{r['upstream_tokens_per_s']:,.0f}" if "speedup" in r else "-"
        sp = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        print(f"| {name} | {r['text_mb']:.1f} | {r['documents']:,} | {r['tokens']:,} | {up} | "
              f"{r['tokens_per_s']:,.0f} | {sp} | {r['peak_rss_mb']:.0f} MB |")
    for name, r in results["corpora"].items():
        line = f"{name}: binarize wall {r['wall_s']:.1f}s (process start included)"
        if "speedup" in r:
            line += (f", upstream {r['upstream_wall_s']:.1f}s (tokenizer load excluded); {r['documents_differing']} "
                     f"of {r['documents']} documents differ from the upstream ids")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
