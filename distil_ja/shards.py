"""The binarized token-shard format: what data_prep/binarize.py writes and every reader reads.

A binarized directory holds

    NNNNN.pickle   a pickled Python list of 1-D numpy integer arrays, one `<s> ... </s>` sequence
                   each (uint16 when the vocabulary has fewer than 65,536 ids, else int32): the
                   upstream example's binarized_data.py format, so its shards load here too;
    manifest.json  written last and atomically, so a directory without one is incomplete:
                   {"format": FORMAT, "tokenizer": {...}, "unit", "dtype", "shards": [{"file",
                   "sequences", "tokens", "sha256", ...}], "totals": {...}} (see binarize.py).

--data_file / --data values name such directories or single .pickle shards (no manifest: no
tokenizer check). Every reading error is a DataError naming the file.

Extras: per-sequence side arrays that some corpora carry beside the ids (the teacher's ids and
the alignment of a cross-tokenizer corpus; the loss mask of a chat corpus). Each is a sibling
file `NNNNN.<name>.pickle` in the same format (a pickled list of 1-D integer arrays, one per
sequence of the shard, in order), named in the shard's manifest entry under "extras":
{name: {"file", "bytes", "sha256"}}, and checked like the shard itself. Upstream readers see the
ids alone.
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np

from distil_ja import fileio
from distil_ja.cli import DataError

FORMAT = "distil-ja/binarized/v1"
MANIFEST = "manifest.json"
SHARD_SUFFIXES = (".pickle", ".pkl")
PICKLE_PROTOCOL = 4  # fixed, so shard bytes do not depend on the Python version


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 below 65,536 ids, else int32: upstream binarized_data.py's rule, kept so a vocabulary
    of exactly 65,536 ids (max id 65,535, which would fit uint16) gives the dtype upstream gives."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def is_binarized(path) -> bool:
    """A binarized directory (it has a manifest) or a shard file."""
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or path.name.endswith(SHARD_SUFFIXES)


# ---- writing ----------------------------------------------------------------------------


class _HashingWriter:
    """A file wrapper that hashes and counts what goes through it (pickle streams into it)."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_shard(path, sequences: list[np.ndarray]) -> dict:
    """Write one shard atomically; returns {"bytes", "sha256"} for the manifest."""
    with fileio.atomic_open(path, "wb") as f:
        out = _HashingWriter(f)
        pickle.dump(sequences, out, protocol=PICKLE_PROTOCOL)  # streamed: no second copy in memory
    return {"bytes": out.size, "sha256": out.sha256.hexdigest()}


def write_extras(directory, shard_file: str, extras: dict[str, list[np.ndarray]]) -> dict:
    """Write each extra of one shard beside it; returns the manifest entry's "extras" value."""
    stem = shard_file.rsplit(".", 1)[0]
    written = {}
    for name, arrays in extras.items():
        file = f"{stem}.{name}.pickle"
        written[name] = {"file": file, **write_shard(Path(directory) / file, arrays)}
    return written


def write_manifest(directory, manifest: dict) -> dict:
    """The manifest, last: its presence marks a complete directory. Returns what was written."""
    return fileio.write_manifest(Path(directory) / MANIFEST, FORMAT, manifest)


# ---- reading ----------------------------------------------------------------------------


def load_manifest(directory) -> dict:
    """The manifest of a binarized directory (DataError when missing, unreadable or foreign)."""
    path = Path(directory) / MANIFEST
    manifest = fileio.read_manifest(path, FORMAT, "binarize.py")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                               for s in shards):
        raise DataError(f"{path}: no list of shards with a 'file' name each")
    return manifest


def read_shard(path, expected_entry: dict | None = None, verify: bool = True) -> list[np.ndarray]:
    """The sequences of one shard, checked: a list of 1-D integer arrays and, given the manifest's
    entry, the bytes, sha256 (unless not verify: train.py --verify size), sequence and token counts it records.

    The sha256 is computed over the bytes as they are read for unpickling (one read, no second
    pass; bench/shard_verify.py measures it), so a shard edited or damaged since binarize.py wrote
    it is refused, naming the shard, before a token of it is trained on.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found")
    with open(path, "rb") as f:
        raw = f.read()
    if expected_entry is not None:
        check_bytes(path, raw, expected_entry, verify)
    try:
        data = pickle.loads(raw)
    except Exception as err:  # a truncated or foreign file can raise almost anything
        raise DataError(f"{path}: corrupt or truncated shard ({type(err).__name__}: {err})") from err
    del raw
    if not isinstance(data, list) or not all(
            isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind in "iu" for x in data):
        raise DataError(f"{path}: expected a pickled list of 1-D integer numpy arrays")
    if expected_entry is not None:
        found = {"sequences": len(data), "tokens": sum(len(x) for x in data)}
        for key, value in found.items():
            if key in expected_entry and expected_entry[key] != value:
                raise DataError(f"{path}: {value} {key}, its manifest says {expected_entry[key]} "
                                "(replaced or damaged)")
    return data


def read_extras(directory, entry: dict, names, verify: bool = True) -> dict[str, list[np.ndarray]]:
    """The named extras of one shard (its manifest entry), each checked: bytes, sha256, one array per
    sequence. A missing one is a DataError saying the corpus was binarized without it."""
    found = entry.get("extras", {})
    out = {}
    for name in names:
        if name not in found:
            raise DataError(f"{Path(directory) / entry['file']}: no {name!r} beside it (binarized without it)")
        arrays = read_shard(Path(directory) / found[name]["file"], found[name], verify)
        if "sequences" in entry and len(arrays) != entry["sequences"]:
            raise DataError(f"{Path(directory) / found[name]['file']}: {len(arrays)} arrays for "
                            f"{entry['sequences']} sequences")
        out[name] = arrays
    return out


def check_bytes(path: Path, raw: bytes, entry: dict, verify: bool = True) -> None:
    """The shard's size and (verify) sha256 against its manifest entry (DataError naming the shard)."""
    if "bytes" in entry and entry["bytes"] != len(raw):
        raise DataError(f"{path}: {len(raw):,} bytes, its manifest says {entry['bytes']:,} (replaced, truncated or "
                        "damaged since binarize.py wrote it): binarize again")
    if verify and "sha256" in entry:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"]:
            raise DataError(f"{path}: sha256 {digest[:12]}..., its manifest says {str(entry['sha256'])[:12]}... "
                            "(changed since binarize.py wrote it): binarize again")


def shard_paths(data_files) -> tuple[list[tuple[Path, dict | None]], dict | None]:
    """Expand data arguments: ([(shard path, its manifest entry or None)], the last manifest or None)."""
    shards, manifest = [], None
    for name in data_files:
        path = Path(name)
        if path.is_dir():
            manifest = load_manifest(path)
            shards += [(path / entry["file"], entry) for entry in manifest["shards"]]
        else:
            shards.append((path, None))
    if not shards:
        raise DataError("no data files given")
    return shards, manifest


def carried_extras(data_files) -> set[str]:
    """The extras every shard of the named directories carries (none for a bare shard file)."""
    shards, _ = shard_paths(data_files)
    names = [set((entry or {}).get("extras", {})) for _, entry in shards]
    return set.intersection(*names) if names else set()


def load_sequences(data_files, verify: bool = True, extras=()) -> tuple[list[np.ndarray], dict | None]:
    """Every sequence of the named directories and shards, in order, and the manifest (if any);
    each shard checked against its manifest entry (read_shard).

    With `extras` (names), returns (sequences, manifest, {name: arrays in the same order}); every
    shard must then come from a binarized directory that has them.
    """
    shards, manifest = shard_paths(data_files)
    sequences, side = [], {name: [] for name in extras}
    for path, entry in shards:
        sequences += read_shard(path, entry, verify)
        if extras:
            if entry is None:
                raise DataError(f"{path}: a shard without its directory's manifest carries no {', '.join(extras)}")
            for name, arrays in read_extras(path.parent, entry, extras, verify).items():
                side[name] += arrays
    if extras:
        return sequences, manifest, side
    return sequences, manifest
