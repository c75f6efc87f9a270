"""LmSeqsDataset's split/filter rules, padding, shard loading, and the grouped batch sampler."""

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from grouped_batch_sampler import GroupedBatchSampler, length_groups
from distil_ja.cli import DataError
from distil_ja.shards import FORMAT, load_sequences
from lm_seqs_dataset import MIN_SEQ_LEN, LmSeqsDataset, SpecialIds, split_long

IDS = SpecialIds()


def seq(*body, bos=True, eos=True):
    return np.array(([1] if bos else []) + list(body) + ([2] if eos else []), dtype=np.uint16)


def test_split_long_wraps_every_chunk_and_keeps_every_token():
    body = list(range(10, 40))
    chunks = split_long(seq(*body), max_len=12, ids=IDS)
    assert all(len(c) <= 12 and c[0] == 1 and c[-1] == 2 for c in chunks)
    assert [t for c in chunks for t in c[1:-1]] == body
    assert all(c.dtype == np.uint16 for c in chunks)


def test_split_long_leaves_fitting_sequences_alone():
    s = seq(*range(10, 20))
    assert split_long(s, max_len=12, ids=IDS)[0] is s


def test_short_and_mostly_unknown_sequences_are_dropped(caplog):
    short = seq(*range(10, 10 + MIN_SEQ_LEN - 3))  # MIN_SEQ_LEN - 1 tokens
    just_long_enough = seq(*range(10, 10 + MIN_SEQ_LEN - 2))
    unknown = seq(*([0] * 10), 11, 12)  # 10 of 14 tokens are <unk>
    half_unknown = seq(*([0] * 7), *range(10, 15))  # 7 of 14: kept
    with caplog.at_level("INFO"):
        ds = LmSeqsDataset([short, just_long_enough, unknown, half_unknown], max_len=64, ids=IDS)
    assert [len(s) for s in ds.sequences] == [MIN_SEQ_LEN, 14]
    assert ds.sequences[1] is half_unknown
    assert "1 too short" in caplog.text and "1 mostly <unk> dropped" in caplog.text


def test_long_sequences_become_several_items():
    ds = LmSeqsDataset([seq(*range(7, 7 + 100))], max_len=32, ids=IDS)
    assert len(ds) == 4  # 100 tokens in chunks of 30
    assert ds.lengths.tolist() == [32, 32, 32, 12]


def test_batch_sequences_pads_with_pad_id():
    ds = LmSeqsDataset([], max_len=64, ids=IDS)
    ids, lengths = ds.batch_sequences([seq(*range(10, 14)), seq(*range(10, 20))])
    assert lengths.tolist() == [6, 12]
    assert ids.dtype == torch.long and ids.shape == (2, 12)
    assert ids[0, 6:].tolist() == [3] * 6
    assert ids[1].tolist() == [1, *range(10, 20), 2]


def test_load_sequences_from_binarize_directory(tmp_path):
    shards = [[seq(*range(10, 30))], [seq(*range(10, 25)), seq(*range(10, 40))]]
    for i, shard in enumerate(shards):
        with open(tmp_path / f"{i:05d}.pickle", "wb") as f:
            pickle.dump(shard, f)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "shards": [{"file": "00000.pickle"}, {"file": "00001.pickle"}]}))
    sequences, manifest = load_sequences([str(tmp_path)])
    assert [len(s) for s in sequences] == [22, 17, 32]
    assert manifest["shards"][1]["file"] == "00001.pickle"
    both, manifest = load_sequences([str(tmp_path / "00001.pickle"), str(tmp_path / "00000.pickle")])
    assert [len(s) for s in both] == [17, 32, 22] and manifest is None


@pytest.mark.parametrize("content, message", [
    (None, "shard not found"),
    (b"not a pickle", "corrupt or truncated"),
    (pickle.dumps([[1, 2, 3]]), "list of 1-D integer numpy arrays"),
])
def test_bad_shards_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pickle"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_sequences([str(path)])
    assert str(path) in str(err.value)


def test_truncated_shard(tmp_path):
    data = pickle.dumps([seq(*range(10, 30)) for _ in range(50)])
    path = tmp_path / "cut.pickle"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_sequences([str(path)])


def test_directory_without_manifest(tmp_path):
    with pytest.raises(DataError, match="has no manifest.json"):
        load_sequences([str(tmp_path)])


def test_length_groups_are_ordered_by_length():
    lengths = np.random.default_rng(0).integers(12, 1000, 500)
    groups = length_groups(lengths, n_groups=8)
    order = np.argsort(lengths, kind="stable")
    assert np.all(np.diff(groups[order]) >= 0)
    assert len(set(groups.tolist())) == 8


def test_grouped_batches_cover_every_index_once_with_similar_lengths():
    lengths = np.random.default_rng(1).integers(12, 1000, 203)
    groups = length_groups(lengths)
    sampler = DistributedSampler(range(len(lengths)), num_replicas=1, rank=0, shuffle=True, seed=3)
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size=8)
    batches = list(batch_sampler)
    assert len(batches) == len(batch_sampler) == 26
    assert sorted(i for b in batches for i in b) == list(range(203))
    full_single_group = [b for b in batches if len(b) == 8 and len(set(groups[b])) == 1]
    assert len(full_single_group) >= 14  # one per group of ~13, at least
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in full_single_group])
    assert spread < 200  # random batches of 8 from 12..1000 spread ~770


def test_grouped_batches_have_equal_counts_on_every_rank():
    lengths = np.random.default_rng(2).integers(12, 500, 101)
    groups = length_groups(lengths)
    counts = set()
    for rank in range(4):
        sampler = DistributedSampler(range(101), num_replicas=4, rank=rank, shuffle=True, seed=0)
        counts.add(len(list(GroupedBatchSampler(sampler, groups, batch_size=3))))
    assert counts == {9}


def test_token_cache_maps_the_same_sequences(tmp_path):
    from token_cache import write_cache

    sequences = [seq(*range(10, 10 + n)) for n in (15, 40, 12, 25)]
    dataset = LmSeqsDataset(sequences, max_len=32, ids=IDS)
    write_cache(tmp_path / "cache", dataset.sequences)
    mapped = LmSeqsDataset.from_cache(tmp_path / "cache", IDS)
    assert len(mapped) == len(dataset) == 5  # the 42-token sequence became two chunks
    assert mapped.lengths.tolist() == dataset.lengths.tolist()
    for a, b in zip(mapped.sequences, dataset.sequences):
        assert a.dtype == np.uint16 and np.array_equal(a, b)
    assert isinstance(mapped.sequences.tokens, np.memmap)
    batch = [mapped[i] for i in (1, 3)]
    for x, y in zip(mapped.batch_sequences(batch), dataset.batch_sequences([dataset[1], dataset[3]])):
        assert torch.equal(x, y)


# ---- a teacher of another tokenizer: cut at aligned positions, batches with flattened alignment ----
# Text "abcdef". Student: <s> [a] [bc] [d] [ef] </s>, ending at offsets 0 1 3 4 6; teacher: <tb> [ab] [c]
# [de] [f] <te> (ids 50..55), ending at 0 2 3 5 6. Aligned: <s>-<tb>, [bc]-[c], [ef]-[f].
from lm_seqs_dataset import Aligned, split_aligned  # noqa: E402

STUDENT = seq(10, 11, 12, 13)
TEACHER = np.array([50, 51, 52, 53, 54, 55], dtype=np.int32)
ALIGNMENT = np.array([0, -1, 2, -1, 4, -1], dtype=np.int32)


def test_split_aligned_cuts_only_where_both_sides_end_together():
    pieces, dropped = split_aligned(STUDENT, Aligned(TEACHER, ALIGNMENT), max_len=4, teacher_max_len=10, ids=IDS)
    assert dropped == 0
    assert [p[0].tolist() for p in pieces] == [[1, 10, 11, 2], [1, 12, 13, 2]]
    assert [p[1].teacher_ids.tolist() for p in pieces] == [[50, 51, 52, 55], [50, 53, 54, 55]]
    assert [p[1].alignment.tolist() for p in pieces] == [[0, -1, 2, -1], [0, -1, 2, -1]]


def test_split_aligned_without_a_teacher_bos_and_with_the_teacher_limit():
    teacher, alignment = TEACHER[1:], np.array([-1, -1, 1, -1, 3, -1], dtype=np.int32)
    pieces, dropped = split_aligned(STUDENT, Aligned(teacher, alignment), max_len=10, teacher_max_len=3, ids=IDS)
    assert dropped == 0
    assert [p[1].teacher_ids.tolist() for p in pieces] == [[51, 52, 55], [53, 54, 55]]
    assert [p[1].alignment.tolist() for p in pieces] == [[-1, -1, 1, -1], [-1, -1, 1, -1]]
    pieces, dropped = split_aligned(STUDENT, Aligned(teacher, alignment), max_len=3, teacher_max_len=10, ids=IDS)
    assert pieces == [] and dropped == 4  # no aligned position within 1 body token: nothing is cut mid-text


def test_split_aligned_keeps_depths_and_gives_the_piece_after_a_cut_the_heads_row():
    # [a] ends 1 character into [ab] (the <tb> row before it), [d] 1 into [de] (the [c] row before it)
    depth = np.array([0, 1, 0, 1, 0, 0], dtype=np.uint8)
    side = Aligned(TEACHER, np.array([0, 0, 2, 2, 4, -1], dtype=np.int32), depth)
    assert side.ends.tolist() == [True, False, True, False, True, False]
    pieces, dropped = split_aligned(STUDENT, side, max_len=4, teacher_max_len=10, ids=IDS)
    assert dropped == 0 and [p[0].tolist() for p in pieces] == [[1, 10, 11, 2], [1, 12, 13, 2]]
    # after the cut at [bc]-[c], [d]'s row is the one ending at the cut: the new <tb>'s
    assert [p[1].alignment.tolist() for p in pieces] == [[0, 0, 2, -1], [0, 0, 2, -1]]
    assert [p[1].depth.tolist() for p in pieces] == [[0, 1, 0, 0], [0, 1, 0, 0]]
    no_bos = Aligned(TEACHER[1:], np.array([-1, -1, 1, 1, 3, -1], dtype=np.int32), np.array([0, 0, 0, 1, 0, 0], np.uint8))
    pieces, _ = split_aligned(STUDENT, no_bos, max_len=4, teacher_max_len=10, ids=IDS)
    assert [p[1].alignment.tolist() for p in pieces] == [[-1, -1, 1, -1], [-1, -1, 1, -1]]  # no row before [d]
    assert [p[1].depth.tolist() for p in pieces] == [[0, 0, 0, 0], [0, 0, 0, 0]]
    whole, _ = split_aligned(STUDENT, side, max_len=10, teacher_max_len=10, ids=IDS)
    assert whole[0][1] is side


def pairs_side(n_pairs, first_id=60):
    """A student of 2 n tokens under a teacher whose every piece is two student pieces (with <tb>, <te>)."""
    student = seq(*range(10, 10 + 2 * n_pairs))
    teacher = np.arange(first_id, first_id + n_pairs + 2, dtype=np.int32)
    alignment = np.array([0] + [k // 2 if k % 2 == 0 else -1 for k in range(1, 2 * n_pairs + 1)] + [-1], dtype=np.int32)
    return student, Aligned(teacher, alignment)


def test_aligned_batches_point_at_flattened_teacher_positions(tmp_path):
    (s6, a6), (s7, a7) = pairs_side(6), pairs_side(7, first_id=80)
    ds = LmSeqsDataset([s6, s7], max_len=64, ids=IDS, aligned=[a6, a7])
    assert len(ds) == 2 and ds.aligned[0] is a6
    token_ids, lengths, teacher_ids, alignment, depth, attach, after = ds.batch_sequences([ds[0], ds[1]])
    assert teacher_ids.shape == (2, 9) and lengths.tolist() == [14, 16]
    assert attach.shape == (2, 0) and (after == -1).all()  # no attached positions without a cut table
    assert depth.shape == alignment.shape and not depth.any()  # binarized before depths: every position at 0
    assert teacher_ids[0, :8].tolist() == list(range(60, 68)) and teacher_ids[0, 8] == 0
    assert alignment[0, :4].tolist() == [0, -1, 1, -1] and alignment[1, :4].tolist() == [9, -1, 10, -1]
    flat = teacher_ids.reshape(-1)
    assert flat[alignment[1, 14]] == 87  # the last content piece of each side: the teacher's last before <te>
    assert (alignment[0, 13:] == -1).all()  # </s> and padding

    from token_cache import write_cache
    write_cache(tmp_path / "cache", ds.sequences, ds.cache_extras())
    mapped = LmSeqsDataset.from_cache(tmp_path / "cache", IDS)
    for x, y in zip(mapped.batch_sequences([mapped[1], mapped[0]]), ds.batch_sequences([ds[1], ds[0]])):
        assert torch.equal(x, y)


def test_positions_inside_a_piece_that_begins_with_a_piece_get_an_attached_teacher_position():
    """pad_aligned with a cut table: the piece s is appended after the row before the piece, once per
    such student position, and `after` points at it; the other columns are as without."""
    from distil_ja.alignment import exact_depths

    # [a] ends 1 character into [ab] (row 0 before it), [d] 1 into [de] (row 2 before it); [a] is piece 56
    # of the teacher, [d] is none
    side = Aligned(TEACHER, np.array([0, 0, 2, 2, 4, -1], dtype=np.int32), np.array([0, 1, 0, 1, 0, 0], np.uint8))
    cut = np.full((3, 60), -1, dtype=np.int64)
    cut[1, 51] = 56  # the first character of [ab] is the piece [a]
    other = Aligned(TEACHER[:4], np.array([0, 0, 2, 2, -1], dtype=np.int32), np.array([0, 1, 0, 1, 0], np.uint8))
    teacher_ids, alignment, depth, attach, after = LmSeqsDataset.pad_aligned(
        [side.teacher_ids, other.teacher_ids], [side.alignment, other.alignment], [side.depth, other.depth], (2, 6),
        (cut, exact_depths(cut)))
    assert teacher_ids.tolist() == [[50, 51, 52, 53, 54, 55, 56], [50, 51, 52, 53, 0, 0, 56]]
    assert attach.tolist() == [[0], [0]]  # read after row 0, the <tb> before [ab]
    assert after.tolist() == [[-1, 6, -1, -1, -1, -1], [-1, 13, -1, -1, -1, -1]]
    assert alignment.tolist() == [[0, 0, 2, 2, 4, -1], [7, 7, 9, 9, -1, -1]]  # rows of 7 columns, flattened
    # 2 characters into [de], whose first character is a piece of its own: no exact target there, nothing attached
    cut[1, 53], cut[2, 53] = 57, 58
    deeper = LmSeqsDataset.pad_aligned([TEACHER], [np.array([0, 0, 2, 2, 4, -1], dtype=np.int32)],
                                       [np.array([0, 1, 0, 2, 0, 0], np.uint8)], (1, 6), (cut, exact_depths(cut)))
    assert deeper[0].tolist() == [TEACHER.tolist() + [56]] and deeper[4].tolist() == [[-1, 6, -1, -1, -1, -1]]
    plain = LmSeqsDataset.pad_aligned([side.teacher_ids], [side.alignment], [side.depth], (1, 6))
    assert plain[0].tolist() == [TEACHER.tolist()] and plain[3].shape == (1, 0) and (plain[4] == -1).all()
