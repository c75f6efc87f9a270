"""Dump paths on several nodes: one shared folder, or a folder per node.

The rule (docs/scaling.md, "Several nodes"):
- Every node sees rank 0's folder (a shared file system, the same --dump_path): rank 0 writes
  everything, as on one node; every process adds its own `rank{R}.pt` to each checkpoint.
- A node that does not see rank 0's folder (its own disk, or its own --dump_path): that node's first
  process writes the node's copy of what its processes read back, that is parameters.json (and
  teacher_logits.json), the token cache and each checkpoint's training_state.pt (the student is the
  same on every rank under DDP), beside the node's own `rank{R}.pt`. --resume and torchrun's
  --max-restarts then work on every node.
  What people read (the final student, tokenizer, metrics.jsonl, tensorboard, eval_results.json,
  git_log.json) is written once, in rank 0's folder.
- The processes of one node share one folder; anything else is refused in one line.

Which case holds is found out, not configured: rank 0 leaves a marker in its folder, and a process
that does not find it there looks for its node's first process's marker instead. A marker that
a second writer overwrote (a shared folder that a node failed to see in time) is refused too, before
anything is deleted.
"""

import hashlib
import logging
import os
import socket
import time
from pathlib import Path

import torch

from distil_ja.cli import DataError, UsageError
from utils import Runtime, raise_first_error

logger = logging.getLogger("distillation")

MARKER = ".dump-path-writer"  # removed again once every process has looked


def claim_dump_path(dump_path: Path, runtime: Runtime) -> bool:
    """Create the dump path(s); whether this process writes its dump path's shared files.

    Collective: every process calls it. Raises the same UsageError on every process when the
    processes of a node do not share one folder.
    """
    if not runtime.is_distributed:
        dump_path.mkdir(parents=True, exist_ok=True)
        return True
    run_id = [f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}" if runtime.is_master else None]
    torch.distributed.broadcast_object_list(run_id, src=0)
    run_id = run_id[0]
    node_leader = runtime.global_rank - runtime.local_rank  # torchrun numbers each node's processes in a row
    if runtime.is_master:
        _mark(dump_path, run_id, 0)
    torch.distributed.barrier()
    if _marked_by(dump_path, run_id) != 0 and runtime.local_rank == 0:
        _mark(dump_path, run_id, runtime.global_rank)  # this node has a folder of its own
    torch.distributed.barrier()
    writer = _marked_by(dump_path, run_id)
    error = None
    if writer not in (0, node_leader):
        leader = f"its node's first process (rank {node_leader})"
        found = (f"no folder prepared by rank 0 or by {leader}" if writer is None
                 else f"the folder of rank {writer}, prepared neither by rank 0 nor by {leader}")
        error = UsageError(f"--dump_path {dump_path}: rank {runtime.global_rank} finds {found}; the processes of a "
                           "node must share one folder: the same on every node, or one per node (docs/scaling.md)")
    raise_first_error(error)  # also the barrier before a writer removes its marker
    if writer == runtime.global_rank != 0:
        logger.warning("%s is this node's own folder (rank 0's is not visible here): rank %d writes the node's "
                       "copy of parameters.json, the token cache and the checkpoints", dump_path, writer)
    return writer == runtime.global_rank


def forget_marker(dump_path: Path) -> None:
    (dump_path / MARKER).unlink(missing_ok=True)


def _mark(dump_path: Path, run_id: str, rank: int) -> None:
    dump_path.mkdir(parents=True, exist_ok=True)
    (dump_path / MARKER).write_text(f"{run_id} {rank}\n")


def _marked_by(dump_path: Path, run_id: str) -> int | None:
    """The rank whose marker of this run the folder holds, or None."""
    try:
        found_id, rank = (dump_path / MARKER).read_text().split()
    except (OSError, ValueError):
        return None
    return int(rank) if found_id == run_id else None


def check_same_sequences(lengths, runtime: Runtime) -> None:
    """Refuse node copies of the token cache that differ from rank 0's (each node read --data_file itself).

    Collective. Compares the sequence lengths, which any other corpus or filtering changes.
    """
    if not runtime.is_distributed:
        return
    ours = (len(lengths), hashlib.sha256(lengths.tobytes()).hexdigest())
    fingerprints = [None] * runtime.world_size
    torch.distributed.all_gather_object(fingerprints, ours)
    for rank, theirs in enumerate(fingerprints):
        if theirs != fingerprints[0]:
            raise DataError(f"the token cache of rank {rank} ({theirs[0]} sequences) differs from rank 0's "
                            f"({fingerprints[0][0]} sequences): every node must read the same --data_file")
