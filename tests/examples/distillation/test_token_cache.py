"""token_cache.py: write_cache and MappedSequences give back exactly the sequences written, dtype included."""

import numpy as np
import pytest

from token_cache import OFFSETS, TOKENS, MappedSequences, write_cache


def random_sequences(dtype, high, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, n).astype(dtype) for n in lengths]


def assert_round_trip(folder, sequences):
    mapped = MappedSequences(folder)
    assert len(mapped) == len(sequences)
    assert mapped.lengths().tolist() == [len(s) for s in sequences]
    for i, seq in enumerate(sequences):
        assert mapped[i].dtype == seq.dtype
        np.testing.assert_array_equal(mapped[i], seq)
    return mapped


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65_536), (np.int32, 151_000)])
def test_round_trip_keeps_ids_and_dtype(tmp_path, dtype, high):
    sequences = random_sequences(dtype, high, [12, 1, 40, 0, 25])
    sequences[2][:3] = [0, high - 1, high // 2]  # the extremes of the range
    write_cache(tmp_path, sequences)
    mapped = assert_round_trip(tmp_path, sequences)
    assert mapped.tokens.dtype == dtype and isinstance(mapped.tokens, np.memmap)
    assert not mapped[0].flags.writeable
    np.testing.assert_array_equal(mapped.tokens, np.concatenate(sequences))


def test_ids_above_uint16_survive(tmp_path):
    sequences = [np.array([1, 65_535, 65_536, 99_486, 151_642, 2], dtype=np.int32)]
    write_cache(tmp_path, sequences)
    assert MappedSequences(tmp_path)[0].tolist() == [1, 65_535, 65_536, 99_486, 151_642, 2]


def test_mixed_dtypes_widen_to_hold_every_id(tmp_path):
    sequences = random_sequences(np.uint16, 65_536, [10, 20]) + random_sequences(np.int32, 151_000, [15], seed=1)
    write_cache(tmp_path, sequences)
    mapped = MappedSequences(tmp_path)
    assert mapped.tokens.dtype == np.int32
    for i, seq in enumerate(sequences):
        np.testing.assert_array_equal(mapped[i], seq)


def test_offsets_are_the_running_lengths(tmp_path):
    sequences = random_sequences(np.int32, 151_000, [3, 0, 7, 5])
    write_cache(tmp_path, sequences)
    offsets = np.load(tmp_path / OFFSETS)
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 3, 3, 10, 15]
    assert len(np.load(tmp_path / TOKENS)) == 15
    assert MappedSequences(tmp_path)[1].tolist() == []


def test_empty_list(tmp_path):
    write_cache(tmp_path / "cache", [])
    mapped = MappedSequences(tmp_path / "cache")
    assert len(mapped) == 0
    assert mapped.lengths().tolist() == []
    assert np.load(tmp_path / "cache" / OFFSETS).tolist() == [0]
    assert len(mapped.tokens) == 0


def test_extras_are_cached_beside_the_sequences(tmp_path):
    sequences = [np.array([1, 9, 2], dtype=np.uint16), np.array([1, 4, 5, 6, 2], dtype=np.uint16)]
    side = [np.array([7, 8], dtype=np.int32), np.array([-1], dtype=np.int32)]
    write_cache(tmp_path, sequences, extras={"teacher_ids": side})
    mapped = MappedSequences(tmp_path, extra="teacher_ids")
    assert [mapped[i].tolist() for i in range(len(mapped))] == [[7, 8], [-1]]
    assert mapped[0].dtype == np.int32
    assert [s.tolist() for s in MappedSequences(tmp_path)] == [s.tolist() for s in sequences]
