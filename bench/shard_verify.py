#!/usr/bin/env python
"""What train.py's --verify full costs: reading shards with and without their sha256, and hashing a dump.

Side by side in one run, on shards of the real format (distil_ja.shards.write_shard: pickled uint16
sequences of rinna-like lengths, 20M tokens a shard at full size):

- read_shard with the sha256 check (--verify full) and without it (--verify size), best of --repeat;
- teacher_logits.verify_files over a dump-sized file (the sha256 alone: what --verify full adds to an
  offline run);

then the projection to a corpus of --corpus_tokens tokens (15e9: jawiki + CC-100) for the shards
(2 bytes a token) and a top-64 dump (256 bytes a token). One process, one core: the figures are per
core; rank 0 pays them once per run (a resume reuses its token cache).

    OMP_NUM_THREADS=1 python bench/shard_verify.py [--shard_tokens 20000000] [--json out.json]
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script: make the repo root and examples/distillation importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                    str(Path(__file__).resolve().parents[1] / "examples" / "distillation")]

from distil_ja import shards  # noqa: E402
from distil_ja.cli import ArgumentParser, run_command  # noqa: E402

TOKEN_BYTES = 2  # uint16 shards (vocabulary < 65,536)
DUMP_BYTES_PER_TOKEN = 64 * (2 + 2)  # top 64: uint16 ids + float16 log-probabilities


def synthetic_shard(tokens: int, seed: int = 0) -> list[np.ndarray]:
    """<s> ... </s> sequences of 32-1024 tokens (rinna's documents are mostly paragraphs)."""
    rng = np.random.default_rng(seed)
    seqs, n = [], 0
    while n < tokens:
        length = int(min(rng.integers(32, 1025), tokens - n)) if tokens - n >= 2 else 2
        seqs.append(rng.integers(7, 32000, length).astype(np.uint16))
        n += length
    return seqs


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(shard_tokens: int, dump_mb: int, repeat: int, folder: Path) -> dict:
    import teacher_logits

    path = folder / "00000.pickle"
    entry = {"file": path.name, **shards.write_shard(path, synthetic_shard(shard_tokens))}
    mb = entry["bytes"] / 2**20
    full = best_of(repeat, lambda: shards.read_shard(path, entry, verify=True))
    size = best_of(repeat, lambda: shards.read_shard(path, entry, verify=False))
    dump = folder / "shard-00000.logprobs.npy"
    with open(dump, "wb") as f:
        block = np.random.default_rng(1).bytes(1 << 20)
        for _ in range(dump_mb):
            f.write(block)
    digest = hashlib.sha256()
    with open(dump, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    manifest = {"shards": [{"logprobs": {"file": dump.name, "bytes": dump_mb << 20, "sha256": digest.hexdigest()}}]}
    dump_s = best_of(repeat, lambda: teacher_logits.verify_files(folder, manifest, full=True, progress=False))
    return {"shard_mb": mb, "shard_tokens": shard_tokens, "read_full_s": full, "read_size_s": size,
            "read_full_mb_s": mb / full, "read_size_mb_s": mb / size, "hash_share": 1 - size / full,
            "dump_mb": dump_mb, "dump_hash_s": dump_s, "dump_hash_mb_s": dump_mb / dump_s}


def projection(m: dict, corpus_tokens: float) -> dict:
    shard_bytes = corpus_tokens * TOKEN_BYTES / 2**20
    dump_bytes = corpus_tokens * DUMP_BYTES_PER_TOKEN / 2**20
    return {"corpus_tokens": corpus_tokens,
            "shards_read_full_min": shard_bytes / m["read_full_mb_s"] / 60,
            "shards_read_size_min": shard_bytes / m["read_size_mb_s"] / 60,
            "dump_top64_hash_min": dump_bytes / m["dump_hash_mb_s"] / 60}


def table(m: dict, p: dict) -> str:
    return "\n".join([
        "| what | MB/s (one core) | time |",
        "| --- | ---: | ---: |",
        f"| read a {m['shard_mb']:.0f} MB shard, --verify full | {m['read_full_mb_s']:,.0f} | {m['read_full_s']:.2f} s |",
        f"| read it, --verify size | {m['read_size_mb_s']:,.0f} | {m['read_size_s']:.2f} s |",
        f"| sha256 of a {m['dump_mb']} MB dump file | {m['dump_hash_mb_s']:,.0f} | {m['dump_hash_s']:.2f} s |",
        "",
        f"sha256's share of reading a shard: {m['hash_share']:.0%}. Projected for {p['corpus_tokens']:.3g} tokens: "
        f"shards {p['shards_read_full_min']:.1f} min (full) vs {p['shards_read_size_min']:.1f} min (size); "
        f"a top-64 dump ({p['corpus_tokens'] * DUMP_BYTES_PER_TOKEN / 1e12:.1f} TB) {p['dump_top64_hash_min']:.0f} min "
        "of hashing (full) vs none (size).",
    ])


def main(argv=None) -> int:
    def run(argv):
        parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--shard_tokens", type=int, default=20_000_000, help="binarize.py's default shard size")
        parser.add_argument("--dump_mb", type=int, default=512)
        parser.add_argument("--repeat", type=int, default=3)
        parser.add_argument("--corpus_tokens", type=float, default=15e9)
        parser.add_argument("--json", default=None)
        args = parser.parse_args(argv)
        with tempfile.TemporaryDirectory() as tmp:
            m = measure(args.shard_tokens, args.dump_mb, args.repeat, Path(tmp))
        p = projection(m, args.corpus_tokens)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(table(m, p))
        if args.json:
            Path(args.json).write_text(json.dumps({**m, **p}, indent=2) + "\n")

    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
