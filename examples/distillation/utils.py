"""Process-level helpers: logging, seeding, the distributed setup, run records."""

import fcntl
import logging
import os
import random
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil_ja import fileio
from distil_ja.cli import StderrHandler, UsageError

logger = logging.getLogger("distillation")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: torchrun's ranks and the device (from init_distributed)."""

    world_size: int = 1
    global_rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int | None = None  # processes on this node (None: all of them)
    writes_node_copy: bool = False  # this node's dump path is not rank 0's, and this process writes it

    @property
    def is_master(self) -> bool:
        return self.global_rank == 0

    @property
    def procs_per_node(self) -> int:
        return self.local_world_size or self.world_size

    @property
    def writes_training_state(self) -> bool:
        """Whether this process writes the dump path's shared files: parameters.json, the token cache and
        each checkpoint's training_state.pt. Rank 0 does, and on a node that does not see rank 0's dump
        path (a node-local disk), that node's first process (train.claim_dump_path)."""
        return self.is_master or self.writes_node_copy

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_logging(rank: int = 0) -> None:
    """Log lines of the `distillation` logger to stderr, tagged with the rank; only warnings off rank 0."""
    for handler in [h for h in logger.handlers if getattr(h, "is_distillation_handler", False)]:
        logger.removeHandler(handler)
    handler = StderrHandler()
    handler.is_distillation_handler = True
    handler.setFormatter(logging.Formatter(f"%(asctime)s - rank {rank} - %(levelname)s - %(message)s",
                                           datefmt="%m/%d/%Y %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    silence_attention_mask_advice()


def silence_attention_mask_advice() -> None:
    """Drop transformers' advice to pass an attention mask.

    Padding is on the right and attention causal, so the models run without a mask on purpose
    (see Distiller.loss_sums and perplexity.perplexity), and generate.py passes one: the advice,
    which transformers gives from its modeling and its generation code, does not apply.
    """
    for name in ("transformers.modeling_utils", "transformers.generation.utils"):
        advising = logging.getLogger(name)
        if _no_attention_mask_advice not in advising.filters:
            advising.addFilter(_no_attention_mask_advice)


def _no_attention_mask_advice(record: logging.LogRecord) -> bool:
    return "attention_mask" not in record.getMessage()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def init_distributed(n_gpu: int) -> Runtime:
    """Read torchrun's environment, check it against --n_gpu, pick the device, join the process group.

    `--n_gpu N` is the number of GPUs (processes) per node; `--n_gpu 0` runs on the CPU,
    with gloo between processes when torchrun starts several.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if n_gpu > 0:
        if not torch.cuda.is_available():
            raise UsageError(f"--n_gpu {n_gpu} but CUDA is not available; use --n_gpu 0 for the CPU")
        if n_gpu != local_world_size:
            raise UsageError(
                f"--n_gpu {n_gpu} but {local_world_size} process(es) were started on this node; "
                f"launch with `torchrun --nproc_per_node {n_gpu} ...`"
            )
        if n_gpu > torch.cuda.device_count():
            raise UsageError(f"--n_gpu {n_gpu} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    runtime = Runtime(world_size, global_rank, local_rank, device, local_world_size)

    if runtime.is_distributed:
        # torchrun keeps one TCP store across worker restarts (--max-restarts): a key prefix per
        # attempt stops restarted workers from reading the dead attempt's addresses and hanging.
        store, rank, world_size = next(torch.distributed.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.PrefixStore(
            f"distillation/attempt_{attempt}", store), rank=rank, world_size=world_size)
        logger.info("Process group (%s): rank %d of %d on %s", backend, global_rank, world_size, socket.gethostname())
    return runtime


def git_log(folder: Path) -> None:
    """Write git_log.json: which code trained the run (its checkout, origin, commit, branch, and
    whether it had uncommitted changes), or nulls when it does not run from a git checkout."""
    info = {"repo_path": None, "repo_remote": None, "repo_sha": None, "repo_branch": None, "dirty": None}
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        info["repo_path"] = repo.working_tree_dir
        info["repo_remote"] = next((r.url for r in repo.remotes if r.name == "origin"), None)
        info["repo_sha"] = repo.head.object.hexsha
        info["repo_branch"] = None if repo.head.is_detached else repo.active_branch.name
        info["dirty"] = repo.is_dirty()
    except Exception as err:  # not a checkout, no git binary, empty repo...
        logger.info("No git information recorded (%s)", type(err).__name__)
    fileio.write_json(Path(folder) / "git_log.json", info)


def first_error(error: Exception | None) -> Exception | None:
    """The first error of any rank, on every rank (collective inside a process group).

    A rank that raises alone leaves the others waiting in their next collective call; exchanging
    the errors first lets every rank stop with the same one-line message.
    """
    if not torch.distributed.is_initialized():
        return error
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def raise_first_error(error: Exception | None) -> None:
    error = first_error(error)
    if error is not None:
        raise error


class DumpPathLock:
    """An exclusive lock on a dump path, one lock file per rank (`.lock-rankR`), held while the run lives.

    flock locks belong to the open file: the kernel drops them when the process dies, however it
    dies, so a crashed run never leaves a stale lock. The holder's pid and host are written into
    the file, for the line that refuses a second run.
    """

    def __init__(self, dump_path, rank: int):
        self.path = Path(dump_path) / f".lock-rank{rank}"
        self.file = None

    def check(self) -> None:
        """UsageError if another process holds the lock (taken and dropped to find out)."""
        if self.path.exists():
            with open(self.path, "a+") as f:
                self._lock(f)
                fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self) -> None:
        """Take the lock until release() (or this process ends), or UsageError naming its holder."""
        self.file = open(self.path, "a+")
        try:
            self._lock(self.file)
        except UsageError:
            self.file.close()
            raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        """Drop the lock now (an error leaves its frame, hence this object, alive in the traceback)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def _lock(self, f) -> None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UsageError(f"{self.path.parent} is in use by {holder}: another run writes there "
                             "(wait for it or stop it, or choose another --dump_path)") from None


def inject_fault(point: str, step: int) -> None:
    """Test hook: DISTIL_FAULT="<point>:<step>[:<rank>]" SIGKILLs this process at that point.

    Points: "after_step" (after the step's checkpoint, if any) and "checkpoint_write" (rank 0,
    with the checkpoint half written). Only the first attempt is killed: a process that torchrun
    restarted (TORCHELASTIC_RESTART_COUNT > 0) runs on.
    """
    spec = os.environ.get("DISTIL_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want_point, want_step, *want_rank = spec.split(":")
    rank = int(os.environ.get("RANK", 0))
    if want_point == point and int(want_step) == step and (not want_rank or int(want_rank[0]) == rank):
        logger.warning("DISTIL_FAULT: killing rank %d at %s of step %d", rank, point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def attempt(action) -> UsageError | None:
    """The UsageError that action() raised, or None: collect it for raise_first_error."""
    try:
        action()
    except UsageError as err:
        return err
    return None
