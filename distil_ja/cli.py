"""What every command does with an error: one line on stderr and an exit status from one table.

| status | meaning                                                        | raised as        |
| ------ | -------------------------------------------------------------- | ---------------- |
| 0      | done                                                           |                  |
| 1      | bad data (missing, corrupt or unusable input files)            | DataError        |
| 1      | no space left for the output (disk full, quota)                | OSError ENOSPC   |
| 2      | bad arguments or models (flags, configs, tokenizers, weights)  | UsageError       |
| 3      | training stopped (e.g. repeated non-finite losses)             | TrainingError    |
| 4      | a worker process died (killed, out of memory)                  | WorkerError      |
| 130    | interrupted (Ctrl-C)                                           | KeyboardInterrupt|
| 143    | terminated (SIGTERM: a scheduler's time limit, torchrun)       | Terminated       |

Library code raises these classes; only `run_command` turns them into an exit status and the
one line `error: MESSAGE` on stderr, so a function called from a test or another command never
exits the process.
"""

import argparse
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_TRAINING, EXIT_WORKER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 4, 130, 143

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


class DataError(Exception):
    """Unusable data: the message names the file and the problem (exit 1)."""


class UsageError(Exception):
    """Bad arguments, or a model, tokenizer or environment that contradicts them (exit 2)."""


class TrainingError(Exception):
    """Training cannot go on; the last checkpoint is kept (exit 3)."""


class WorkerError(Exception):
    """A worker process ended without its result (killed, out of memory, crashed): the output is
    incomplete, and rerunning, with fewer workers or more memory, may succeed (exit 4)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (run_command installs the handler): the same clean-up as Ctrl-C
    (every `except KeyboardInterrupt` applies), its own status 143 = 128 + 15, and one line saying so."""


def _terminate(signum, frame):
    raise Terminated(f"terminated ({signal.Signals(signum).name})")


@contextlib.contextmanager
def signals_deferred():
    """SIGTERM and Ctrl-C arriving inside the block take effect when it ends, as they would have then.

    For a write that must not be cut half way: torch.save interrupted inside its zip writer raises a
    second error from its clean-up, so the run would end with a traceback instead of its exit status
    and line. Only the main thread handles signals; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), caught[0])


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # OSErrors that mean "the output does not fit": exit 1

EXIT_CODES = ((DataError, EXIT_DATA), (UsageError, EXIT_USAGE), (TrainingError, EXIT_TRAINING),
              (WorkerError, EXIT_WORKER))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError: through run_command they are one line `error: ...`
    with status 2 like every other usage error, and main(argv) called from a test or another
    command returns 2 instead of raising SystemExit. --help still prints and exits 0."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none.

    Library exceptions (transformers, safetensors, pickle) often carry several lines of advice;
    one line is what a user reads.
    """
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def exit_code(err: BaseException) -> int | None:
    """The table's status for err, or None for an exception the table does not know (a bug)."""
    if isinstance(err, Terminated):
        return EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return None


class StderrHandler(logging.StreamHandler):
    """A handler that writes to sys.stderr as it is when a line is logged, not as it was when the handler
    was made: a command called in-process (a test's captured stderr, a notebook's redirect) after another
    one never logs into a stream that is gone."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Plain logging for a single-process command (train.py tags lines with the rank itself)."""
    logging.basicConfig(format=LOG_FORMAT, level=level, handlers=[StderrHandler()])


def run_command(main, argv=None) -> int:
    """Call main(argv); print a known error as one line `error: ...` on stderr and return its status.

    Unknown exceptions propagate with their traceback: they are bugs, and hiding them would hide
    where they happened. main may return an int status of its own (None counts as 0).
    Every command is `def main(argv=None) -> int: return run_command(run, argv)`, and
    `sys.exit(main())` under `if __name__ == "__main__"`.
    """
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main(argv)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        print(f"error: {disk_full_message(err)}", file=sys.stderr, flush=True)
        return EXIT_DATA
    except (DataError, UsageError, TrainingError, WorkerError, KeyboardInterrupt) as err:
        print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return exit_code(err)
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return status or EXIT_OK


def disk_full_message(err: OSError) -> str:
    """A full disk or quota, wherever it struck: the file and the room left where it was written.

    Exit 1 like bad data: nothing is wrong with the arguments, the output does not fit. Writes are
    atomic (fileio), so what was complete before is still complete.
    """
    where = Path(err.filename) if err.filename else None
    free = ""
    if where is not None:
        folder = next((p for p in (where, *where.parents) if p.exists()), None)
        if folder is not None:
            free = f" ({format_bytes(shutil.disk_usage(folder).free)} free there)"
    return f"no space left to write {where or 'an output file'}{free}: {err.strerror or err}; free some space and rerun"


def format_bytes(n: int) -> str:
    """Sizes in the messages: 512 KiB, 3.2 MiB, 1.5 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.0f} KiB"


def error_message(err: BaseException) -> str:
    """The line run_command prints. A command that must say what an interrupt left behind
    (an incomplete output) re-raises KeyboardInterrupt with that as its message."""
    if isinstance(err, Terminated):
        return first_line(err)
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted: {first_line(err)}" if str(err).strip() else "interrupted"
    return first_line(err)

