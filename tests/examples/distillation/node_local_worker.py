"""Run by test_node_local.py under torchrun (2 processes, gloo): claim dump paths as different topologies would.

    torchrun --nproc_per_node 2 node_local_worker.py FOLDER

The two processes play each layout by the Runtime they pass (one node of two processes, or two
nodes of one) and the dump path each names; process R writes FOLDER/rank{R}.json: per layout,
whether it writes its folder, or the error it got.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import node_local
from distil_ja.cli import DataError, UsageError
from utils import init_distributed

# layout: (local rank of process 0 and 1, whether each process names a folder of its own)
LAYOUTS = {
    "one_node_shared": ((0, 1), False),
    "one_node_split": ((0, 1), True),
    "two_nodes_shared": ((0, 0), False),
    "two_nodes_own": ((0, 0), True),
}


def main():
    folder = Path(sys.argv[1])
    runtime = init_distributed(0)
    rank = runtime.global_rank
    results = {}
    for name, (local_ranks, own) in LAYOUTS.items():
        played = replace(runtime, local_rank=local_ranks[rank], local_world_size=2 if local_ranks[1] else 1)
        dump = folder / name / (f"node{rank}" if own else "shared")
        try:
            results[name] = node_local.claim_dump_path(dump, played)
        except UsageError as err:
            results[name] = f"UsageError: {err}"
    for name, lengths in (("same_data", [5, 7]), ("other_data", [5, 7 + rank])):
        try:
            node_local.check_same_sequences(np.array(lengths, dtype=np.int64), runtime)
            results[name] = "ok"
        except DataError as err:
            results[name] = f"DataError: {err}"
    (folder / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # else a process that ends first can abort the other's gloo thread


if __name__ == "__main__":
    sys.exit(main())
