"""Batches of sequences of similar length, so little of each batch is padding."""

import itertools

import numpy as np
from torch.utils.data import Sampler


def length_groups(lengths: np.ndarray, n_groups: int = 16) -> np.ndarray:
    """Group id per sequence: length quantiles, so groups hold similar numbers of sequences."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, n_groups + 1)[1:-1]))
    return np.searchsorted(edges, lengths, side="right")


class GroupedBatchSampler(Sampler):
    """Takes indices from `sampler` and yields batches whose members share a length group.

    A batch is yielded as soon as one group holds batch_size indices; the
    remainder is emitted at the end, ordered by group. The number of batches is
    always ceil(len(sampler) / batch_size), so every distributed rank (each with
    an equally long DistributedSampler) sees the same number of batches.
    """

    def __init__(self, sampler, group_ids: np.ndarray, batch_size: int):
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size

    def __iter__(self):
        buffers: dict[int, list[int]] = {}
        for index in self.sampler:
            buffer = buffers.setdefault(int(self.group_ids[index]), [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer[:]
                buffer.clear()
        leftover = [i for group in sorted(buffers) for i in buffers[group]]
        for start in range(0, len(leftover), self.batch_size):
            yield leftover[start : start + self.batch_size]

    def __len__(self):
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size


class SkippingBatchSampler(Sampler):
    """Yields the batches of `batch_sampler` after the first `skip`: resuming mid-epoch.

    Skipping works on index lists, so the skipped batches are never loaded or collated.
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.batch_sampler) - self.skip)
