"""Crash-safe training checkpoints.

A checkpoint is a directory `checkpoint_stepNNNNNNNN/` holding `training_state.pt` (weights,
optimizer, scheduler, scaler, counters; written by rank 0, and by the first process of a node
whose dump path is its own: node_local.py) and `rank{R}.pt` (each rank's RNG states and
unreduced log sums). Every file is written into `checkpoint_stepNNNNNNNN.tmp/`,
fsynced, and the directory is renamed only when complete, so a crash mid-write leaves the
previous checkpoint as the newest complete one.
"""

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distil_ja import fileio
from distil_ja.cli import DataError, format_bytes, signals_deferred
from utils import first_error

logger = logging.getLogger("distillation")

CHECKPOINT_RE = re.compile(r"^checkpoint_step(\d{8})$")
STATE_FILE = "training_state.pt"


def checkpoint_dir(dump_path: Path, step: int) -> Path:
    return Path(dump_path) / f"checkpoint_step{step:08d}"


def list_checkpoints(dump_path: Path) -> list[Path]:
    """Complete checkpoints, newest first (a `.tmp` folder is a write that did not finish)."""
    found = [p for p in Path(dump_path).glob("checkpoint_step*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


class _WriteErrors:
    """A file wrapper that keeps the OSError of a failed write: torch's zip writer reports it only as a
    RuntimeError ("unexpected pos ..."), and the disk-full line needs the OSError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fsynced_save(obj, path: Path) -> None:
    """torch.save to path, atomically and fsynced; SIGTERM or Ctrl-C wait for the write (signals_deferred)."""
    with signals_deferred(), fileio.atomic_open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError as err:
            if out.error is None:
                raise
            raise out.error from err


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(dump_path: Path, step: int, training_state: dict | None, rank_state: dict, rank: int, keep: int,
         fault=None) -> Path:
    """Collective: every rank calls it; the writer of each folder passes training_state (rank 0, and
    the first process of a node with a folder of its own), the others None. The writer creates, fills,
    renames and prunes the checkpoint folders of its dump path.

    A write that fails on any rank (a full disk, say) removes the half-written folder and raises the
    same DataError on every rank, naming the folder and the space it needs; the newest complete
    checkpoint stays the newest.
    """
    final = checkpoint_dir(dump_path, step)
    tmp = final.with_name(final.name + ".tmp")
    writer = training_state is not None

    def stage(action):  # action on this rank, then every rank learns of any rank's failure
        error = None
        try:
            action()
        except OSError as err:
            error = DataError(_write_failure(final, err, training_state, rank_state))
        error = first_error(error)  # a collective: it is also the barrier between the stages
        if error is not None:
            if writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error

    def start():
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in an earlier attempt
            tmp.mkdir(parents=True)

    def finish():
        if not writer:
            return
        if fault is not None:
            fault("checkpoint_write", step)
        _fsynced_save(training_state, tmp / STATE_FILE)  # fsyncs the file and tmp/ itself
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fileio.fsync_dir(final.parent)

    stage(start)
    stage(lambda: _fsynced_save(rank_state, tmp / f"rank{rank}.pt"))
    stage(finish)
    if writer:
        for old in list_checkpoints(dump_path)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("Saved checkpoint %s", final)
    _barrier()
    return final


def _write_failure(final: Path, err: OSError, training_state: dict | None, rank_state: dict) -> str:
    """One line: what could not be written, why, and how much room a checkpoint takes."""
    need = _tensor_bytes(training_state) + _tensor_bytes(rank_state)
    free = shutil.disk_usage(final.parent).free
    return (f"cannot write checkpoint {final} ({err.strerror or err}: {err.filename or final}): it needs about "
            f"{format_bytes(need)}, {format_bytes(free)} are free there; the newest complete checkpoint is kept")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _try_load(path: Path, rank: int):
    try:
        training_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        rank_state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        return training_state, rank_state
    except Exception as err:  # truncated, corrupt, missing file: fall back to an older checkpoint
        logger.error("Checkpoint %s is unreadable (%s: %s); trying the previous one", path, type(err).__name__, err)
        return None


def load_latest(dump_path: Path, rank: int, device: torch.device):
    """(path, training_state, rank_state) of the newest checkpoint every rank can read, or None.

    Collective. The ranks try the same steps in the same order, newest first: with a folder per node
    (node_local.py), a crash can leave a step complete on one node and not on another.
    """
    steps = {int(CHECKPOINT_RE.match(p.name).group(1)) for p in list_checkpoints(dump_path)}
    if dist.is_initialized():
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, steps)
        steps = set().union(*every_rank)
    for step in sorted(steps, reverse=True):
        path = checkpoint_dir(dump_path, step)
        loaded = None
        if path.is_dir():
            loaded = _try_load(path, rank)
        else:
            logger.warning("Checkpoint %s is not in this node's folder; trying the previous one", path)
        ok = torch.tensor([1 if loaded is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 1:
            return path, *loaded
    return None
