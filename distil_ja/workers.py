"""Worker processes for the data commands: how many by default, and how to start them."""
import multiprocessing
import os
import threading


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroup cpusets, SLURM), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def start_method(override_env: str) -> str:
    """fork (fast start) while this process has no other threads yet, else spawn; the
    environment variable override_env (fork, spawn, forkserver) overrides."""
    method = os.environ.get(override_env)
    if method:
        return method
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"
