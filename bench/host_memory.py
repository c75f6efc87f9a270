"""Per-rank host memory of train.py under torchrun, at two corpus sizes.

    python bench/host_memory.py [--sizes 20000 200000] [--nproc 2]

Each size is a shard of random sequences (64-256 tokens); a tiny student trains on it for a
few steps on the CPU (gloo). A sampler thread reads /proc/PID/status of every rank: RssAnon is
the process's private memory (what grows if each rank holds its own copy of the corpus);
RssFile counts mapped file pages (the token cache), which the page cache shares between ranks.
Rank 0 reads the shards once to build the cache, so its peak grows with the corpus by design;
the other ranks, and rank 0 once training runs, must stay flat.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(REPO))


def write_corpus(path: Path, n_sequences: int, vocab: int) -> int:
    rng = np.random.default_rng(0)
    sequences = [np.concatenate(([1], rng.integers(7, vocab, n - 2), [2])).astype(np.uint16)
                 for n in rng.integers(64, 257, n_sequences)]
    with open(path, "wb") as f:
        pickle.dump(sequences, f)
    return sum(len(s) for s in sequences)


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields


def rank_of(pid: int, marker: str) -> int | None:
    try:
        if marker not in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore"):
            return None
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def sample(marker: str, peaks: dict, training: dict, stop: threading.Event, log_file: Path):
    """Peak RssAnon/RssFile per rank, overall and while steps run (after the cache is mapped)."""
    while not stop.is_set():
        started = log_file.exists() and "Steps" in log_file.read_text(errors="ignore")
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            rank = rank_of(pid, marker)
            if rank is None:
                continue
            try:
                now = status_kib(pid)
            except OSError:
                continue
            for target in (peaks, training) if started else (peaks,):
                slot = target.setdefault(rank, {"RssAnon": 0, "RssFile": 0})
                for key in slot:
                    slot[key] = max(slot[key], now.get(key, 0))
        time.sleep(0.05)


def measure(n_sequences: int, nproc: int, folder: Path, tokenizer: Path, config: Path, port: int) -> dict:
    shard = folder / f"corpus_{n_sequences}.pickle"
    tokens = write_corpus(shard, n_sequences, vocab=1000)
    dump = folder / f"run_{n_sequences}"
    log_file = folder / f"log_{n_sequences}.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(REPO / "examples/distillation/train.py"), "--n_gpu", "0", "--dump_path", str(dump),
           "--data_file", str(shard), "--student_config", str(config), "--tokenizer_name", str(tokenizer),
           "--alpha_ce", "0", "--alpha_clm", "1", "--alpha_cos", "0", "--max_steps", "30", "--batch_size", "8",
           "--gradient_accumulation_steps", "1", "--log_interval", "10", "--checkpoint_interval", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'examples/distillation'}"}
    peaks, training, stop = {}, {}, threading.Event()
    sampler = threading.Thread(target=sample, args=(str(dump), peaks, training, stop, log_file))
    sampler.start()
    with open(log_file, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    stop.set()
    sampler.join()
    if result.returncode != 0:
        sys.exit(f"train.py failed ({result.returncode}); see {log_file}")
    return {"sequences": n_sequences, "tokens": tokens, "shard_mib": shard.stat().st_size / 2**20,
            "peak": peaks, "training": training}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 200000], help="Sequences in each corpus.")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from transformers import GPT2Config

    from data_prep.make_tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = Path(train_tokenizer([str(REPO / "data_prep/sample/ja_train.txt")], 1000, str(folder / "tok")))
        config = folder / "student.json"
        config.write_text(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024, n_positions=256,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=3).to_json_string())
        rows = [measure(n, args.nproc, folder, tokenizer, config, 29650 + i) for i, n in enumerate(args.sizes)]

    print(f"\n{'sequences':>10} {'tokens':>11} {'shard MiB':>9} {'rank':>4} {'peak anon MiB':>13} "
          f"{'training anon MiB':>17} {'training file MiB':>17}")
    for row in rows:
        for rank in sorted(row["peak"]):
            t = row["training"].get(rank, {"RssAnon": 0, "RssFile": 0})
            print(f"{row['sequences']:>10} {row['tokens']:>11} {row['shard_mib']:>9.1f} {rank:>4} "
                  f"{row['peak'][rank]['RssAnon'] / 1024:>13.1f} {t['RssAnon'] / 1024:>17.1f} "
                  f"{t['RssFile'] / 1024:>17.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
