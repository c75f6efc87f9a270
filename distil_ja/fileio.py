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


# ---- manifests: a JSON file that names the format of the folder it describes ----------------


def write_manifest(path, fmt: str, manifest: dict) -> dict:
    """`manifest` with "format": fmt first (whatever it held), written atomically; returns what was written.

    Written last, its presence marks a complete folder; the module that writes the folder's files
    alone says which format they are in.
    """
    written = {"format": fmt, **{key: value for key, value in manifest.items() if key != "format"}}
    write_json(path, written)
    return written


def read_manifest(path, fmt: str, what: str) -> dict:
    """The manifest at `path` in format `fmt`; DataError when missing, unreadable or of another format.

    `what` names the command whose output the folder should be (for the message of a missing one).
    """
    from distil_ja.cli import DataError, first_line

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.parent} has no {path.name}: not a {what} output, or an incomplete one")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({first_line(err)})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format {found!r}, expected {fmt!r}")
    return manifest
