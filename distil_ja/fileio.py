"""Crash-safe writes: a reader sees the old file or the complete new one, never a torn one.

Each write goes to `NAME.tmp` beside the target, is flushed and fsynced, then renamed over the
target (atomic on POSIX), and the folder is fsynced so the rename itself survives a power cut.
"""

import contextlib
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **kwargs):
    """Open a temporary file for writing; on a clean exit it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj) -> None:
    """Indented UTF-8 JSON (non-ASCII kept readable); values JSON does not know are written as str."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
