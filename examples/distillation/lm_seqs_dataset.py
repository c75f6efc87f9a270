"""Token sequences for causal-LM distillation.

Input is the sequences of binarized shards (distil_ja.shards: what data_prep/binarize.py
writes, and what the upstream example's binarized_data.py wrote), each one `<s> ... </s>`
sequence; here they are cut to the model context, filtered and padded into batches.
"""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distil_ja.cli import DataError

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
    """Holds sequences that fit the model context; items are integer arrays, or with an offline
    teacher (teacher_topk) (sequence, top-k ids, top-k log-probs) tuples."""

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
        self.teacher_topk = None

    @classmethod
    def from_cache(cls, folder: Path, ids: SpecialIds = SpecialIds(), teacher_topk=None) -> "LmSeqsDataset":
        """The sequences a token_cache holds (already split and filtered), memory-mapped; with an
        offline teacher (teacher_logits.TopKLogits of the same sequences), its rows too."""
        from token_cache import MappedSequences

        dataset = cls.__new__(cls)
        dataset.ids = ids
        dataset.sequences = MappedSequences(folder)
        dataset.lengths = dataset.sequences.lengths()
        dataset.teacher_topk = teacher_topk
        if teacher_topk is not None and not np.array_equal(teacher_topk.lengths(), dataset.lengths):
            raise DataError(f"{teacher_topk.folder}: its rows do not line up with the training sequences")
        return dataset

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        if self.teacher_topk is None:
            return self.sequences[index]
        return (self.sequences[index], *self.teacher_topk[index])

    def batch_sequences(self, batch: list, multiple: int = 1) -> tuple[torch.Tensor, ...]:
        """Pad to the longest sequence, its length rounded up to a multiple of `multiple` (but never beyond
        the dataset's longest sequence, so never beyond the model context): fewer distinct shapes, so
        compiled graphs are reused. Returns (token_ids (B, S) int64, lengths (B,) int64), and with an
        offline teacher also (topk_ids (B, S, k) int64, topk_logprobs (B, S, k) float32), padded with 0
        (padded positions are beyond `lengths`: masked)."""
        if self.teacher_topk is None:
            return self.pad_tokens(batch, multiple)
        sequences, topk_ids, topk_logprobs = zip(*batch)
        token_ids, lengths = self.pad_tokens(sequences, multiple)
        shape = (*token_ids.shape, self.teacher_topk.top_k)
        ids, logprobs = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.float32)
        for row, (row_ids, row_logprobs) in enumerate(zip(topk_ids, topk_logprobs)):
            ids[row, : len(row_ids)] = torch.from_numpy(row_ids.astype(np.int64))
            logprobs[row, : len(row_logprobs)] = torch.from_numpy(row_logprobs.astype(np.float32))
        return token_ids, lengths, ids, logprobs

    def pad_tokens(self, batch, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in batch], dtype=torch.long)
        longest = int(lengths.max())
        width = max(longest, min(-(-longest // multiple) * multiple, self.longest))
        token_ids = torch.full((len(batch), width), self.ids.pad, dtype=torch.long)
        for row, seq in enumerate(batch):
            token_ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        return token_ids, lengths

    @functools.cached_property
    def longest(self) -> int:
        """The longest sequence of the dataset (every sequence fits the model context)."""
        return int(self.lengths.max()) if len(self.lengths) else 0
