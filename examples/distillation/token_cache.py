"""A memory-mapped copy of the training sequences, shared by every rank and DataLoader worker.

Rank 0 reads the pickled shards once and writes the filtered sequences as one flat token
array plus offsets (`tokens.npy`, `offsets.npy`); every process then maps them read-only, so
the corpus sits once in the page cache instead of once per process, and forked workers copy
nothing on write.

Extras (distil_ja.shards: per-sequence side arrays, e.g. a cross-tokenizer corpus's teacher ids)
are cached the same way, `<name>.npy` and `<name>_offsets.npy` each, before the main offsets.
"""

from pathlib import Path

import numpy as np

from distil_ja import fileio

TOKENS, OFFSETS = "tokens.npy", "offsets.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with fileio.atomic_open(path, "wb") as f:
        np.save(f, array)


def write_cache(folder: Path, sequences: list[np.ndarray], extras: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arrays in (extras or {}).items():
        _write_ragged(folder, arrays, f"{name}.npy", f"{name}_offsets.npy")
    _write_ragged(folder, sequences, TOKENS, OFFSETS)  # written last: its presence marks a complete cache


def _write_ragged(folder: Path, sequences: list[np.ndarray], tokens_name: str, offsets_name: str) -> None:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.result_type(*{s.dtype for s in sequences}) if sequences else np.uint16
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    for seq, start in zip(sequences, offsets[:-1]):
        tokens[start : start + len(seq)] = seq
    _save_atomic(folder / tokens_name, tokens)
    _save_atomic(folder / offsets_name, offsets)


def is_complete(folder: Path) -> bool:
    """A cache that write_cache finished (offsets.npy is written last)."""
    return (Path(folder) / OFFSETS).is_file() and (Path(folder) / TOKENS).is_file()


class MappedSequences:
    """A read-only list-like view of the cached sequences: item i is a 1-D numpy array."""

    def __init__(self, folder: Path, extra: str | None = None):
        """The sequences, or (extra) the side arrays of that name (write_cache's extras)."""
        tokens, offsets = (TOKENS, OFFSETS) if extra is None else (f"{extra}.npy", f"{extra}_offsets.npy")
        self.tokens = np.load(Path(folder) / tokens, mmap_mode="r")
        self.offsets = np.load(Path(folder) / offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
