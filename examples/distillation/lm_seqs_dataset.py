"""Token sequences for causal-LM distillation.

Input is the sequences of binarized shards (distil_ja.shards: what data_prep/binarize.py
writes, and what the upstream example's binarized_data.py wrote), each one `<s> ... </s>`
sequence; here they are cut to the model context, filtered and padded into batches.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger("distillation")

MIN_SEQ_LEN = 12  # sequences of 11 tokens or fewer carry too little context to learn from
MAX_UNK_FRACTION = 0.5


@dataclass(frozen=True)
class SpecialIds:
    bos: int = 1
    eos: int = 2
    pad: int = 3
    unk: int = 0


def split_long(seq: np.ndarray, max_len: int, ids: SpecialIds) -> list[np.ndarray]:
    """Cut a sequence longer than max_len into chunks, each wrapped in <s> ... </s>."""
    if len(seq) <= max_len:
        return [seq]
    body = seq[1 if seq[0] == ids.bos else 0 : -1 if seq[-1] == ids.eos else None]
    step = max_len - 2
    return [
        np.concatenate(([ids.bos], body[i : i + step], [ids.eos])).astype(seq.dtype)
        for i in range(0, len(body), step)
    ]


class LmSeqsDataset(Dataset):
    """Holds sequences that fit the model context; items are int64 arrays."""

    def __init__(self, sequences: list[np.ndarray], max_len: int, ids: SpecialIds = SpecialIds()):
        self.ids = ids
        n_in = len(sequences)
        split = [chunk for seq in sequences for chunk in split_long(seq, max_len, ids)]
        long_kept = [s for s in split if len(s) >= MIN_SEQ_LEN]
        kept = [s for s in long_kept if np.count_nonzero(s == ids.unk) <= MAX_UNK_FRACTION * len(s)]
        logger.info(
            "Dataset: %d sequences in, %d after splitting to max_len %d, %d too short (< %d tokens) "
            "and %d mostly <unk> dropped, %d kept",
            n_in, len(split), max_len, len(split) - len(long_kept), MIN_SEQ_LEN,
            len(long_kept) - len(kept), len(kept),
        )
        self.sequences = kept
        self.lengths = np.array([len(s) for s in kept], dtype=np.int64)

    @classmethod
    def from_cache(cls, folder: Path, ids: SpecialIds = SpecialIds()) -> "LmSeqsDataset":
        """The sequences a token_cache holds (already split and filtered), memory-mapped."""
        from token_cache import MappedSequences

        dataset = cls.__new__(cls)
        dataset.ids = ids
        dataset.sequences = MappedSequences(folder)
        dataset.lengths = dataset.sequences.lengths()
        return dataset

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        return self.sequences[index]

    def batch_sequences(self, batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest sequence: (token_ids (B, S) int64, lengths (B,) int64)."""
        lengths = torch.tensor([len(s) for s in batch], dtype=torch.long)
        token_ids = torch.full((len(batch), int(lengths.max())), self.ids.pad, dtype=torch.long)
        for row, seq in enumerate(batch):
            token_ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        return token_ids, lengths
