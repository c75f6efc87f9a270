"""distil_ja/shards.py: the token-shard format, read back with plain pickle/json and hashed with hashlib."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from distil_ja import shards
from distil_ja.cli import DataError


def seqs(n, seed=0, dtype=np.uint16, offset=0):
    rng = np.random.default_rng(seed)
    return [np.arange(offset + i, offset + i + int(rng.integers(2, 9)), dtype=dtype) for i in range(n)]


def test_write_shard_is_a_plain_pickle_with_the_returned_hash(tmp_path):
    data = seqs(5) + [np.array([1, 70000, 2], dtype=np.int32)]
    info = shards.write_shard(tmp_path / "00000.pickle", data)
    raw = open(tmp_path / "00000.pickle", "rb").read()
    back = pickle.loads(raw)
    assert len(back) == len(data)
    for a, b in zip(back, data):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert info == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert os.listdir(tmp_path) == ["00000.pickle"]


def test_write_manifest_always_records_this_format(tmp_path):
    written = shards.write_manifest(tmp_path, {"format": "something/else", "shards": []})
    on_disk = json.load(open(tmp_path / "manifest.json", encoding="utf-8"))
    assert on_disk == written == {"format": "distil-ja/binarized/v1", "shards": []}
    assert list(on_disk)[0] == "format"


def write_dir(folder, shard_lists):
    folder.mkdir()
    entries = []
    for i, data in enumerate(shard_lists):
        name = f"{i:05d}.pickle"
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
        entries.append({"file": name, "sequences": len(data), "tokens": sum(len(x) for x in data)})
    with open(folder / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({"format": "distil-ja/binarized/v1", "shards": entries}, f)
    return entries


@pytest.mark.parametrize("case", ["missing", "not_json", "not_utf8", "foreign_format", "no_format", "a_list",
                                  "no_shard_names"])
def test_load_manifest_refuses(tmp_path, case):
    folder = tmp_path / "bin"
    folder.mkdir()
    path = folder / "manifest.json"
    content = {"not_json": b"{not json", "not_utf8": b'{"format": "\xff"}',
               "foreign_format": json.dumps({"format": "other/v9", "shards": []}).encode(),
               "no_format": json.dumps({"shards": []}).encode(), "a_list": b"[1, 2]",
               "no_shard_names": json.dumps({"format": shards.FORMAT, "shards": [{"name": "x"}]}).encode()}
    if case != "missing":
        path.write_bytes(content[case])
    with pytest.raises(DataError) as info:
        shards.load_manifest(folder)
    assert str(folder) in str(info.value)
    if case != "missing":
        assert str(path) in str(info.value)  # names the file itself


def test_load_manifest_accepts_its_own_format(tmp_path):
    entries = write_dir(tmp_path / "bin", [seqs(2)])
    assert shards.load_manifest(tmp_path / "bin")["shards"] == entries


@pytest.mark.parametrize("content", [
    [np.array([1.0, 2.0])],                    # floats
    [np.array([True, False])],                 # booleans
    [np.array([[1, 2], [3, 4]])],              # 2-D
    [[1, 2, 3]],                               # a list, not an array
    (np.array([1, 2]),),                       # a tuple, not a list
    {"ids": np.array([1, 2])},                 # not a list at all
])
def test_read_shard_refuses_what_is_not_a_list_of_integer_arrays(tmp_path, content):
    path = tmp_path / "bad.pickle"
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError, match="bad.pickle"):
        shards.read_shard(path)


def test_read_shard_refuses_missing_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        shards.read_shard(tmp_path / "missing.pickle")
    raw = pickle.dumps(seqs(20))
    (tmp_path / "cut.pickle").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.pickle"):
        shards.read_shard(tmp_path / "cut.pickle")


@pytest.mark.parametrize("key", ["sequences", "tokens"])
def test_read_shard_checks_the_counts_of_its_manifest_entry(tmp_path, key):
    data = seqs(4)
    path = tmp_path / "s.pickle"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    entry = {"file": "s.pickle", "sequences": 4, "tokens": sum(len(x) for x in data)}
    assert len(shards.read_shard(path, entry)) == 4
    entry[key] += 1  # the shard was replaced or damaged after binarize wrote the manifest
    with pytest.raises(DataError, match=f"s.pickle: .* {key}, its manifest says"):
        shards.read_shard(path, expected_entry=entry)


def test_load_sequences_keeps_the_order_of_directories_and_loose_shards(tmp_path):
    first, second, loose = seqs(3, seed=1, offset=0), seqs(2, seed=2, offset=100), seqs(4, seed=3, offset=200)
    write_dir(tmp_path / "bin", [first, second])
    with open(tmp_path / "loose.pickle", "wb") as f:
        pickle.dump(loose, f)
    got, manifest = shards.load_sequences([str(tmp_path / "loose.pickle"), str(tmp_path / "bin")])
    expected = loose + first + second
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert manifest["format"] == shards.FORMAT and len(manifest["shards"]) == 2
    got, manifest = shards.load_sequences([str(tmp_path / "bin"), str(tmp_path / "loose.pickle")])
    assert all(np.array_equal(a, b) for a, b in zip(got, first + second + loose)) and len(got) == 9
    with pytest.raises(DataError, match="no data files"):
        shards.load_sequences([])


def test_load_sequences_refuses_a_directory_without_manifest(tmp_path):
    (tmp_path / "bin").mkdir()
    with open(tmp_path / "bin" / "00000.pickle", "wb") as f:
        pickle.dump(seqs(2), f)
    with pytest.raises(DataError, match="incomplete"):
        shards.load_sequences([str(tmp_path / "bin")])


@pytest.mark.parametrize("vocab_size, dtype", [(1, np.uint16), (32000, np.uint16), (65535, np.uint16),
                                               (65536, np.int32), (65537, np.int32), (250_000, np.int32)])
def test_dtype_for_vocab_boundaries(vocab_size, dtype):
    got = shards.dtype_for_vocab(vocab_size)
    assert got == np.dtype(dtype)
    assert np.iinfo(got).max >= vocab_size - 1  # every id of the vocabulary fits


def test_is_binarized(tmp_path):
    write_dir(tmp_path / "bin", [seqs(1)])
    (tmp_path / "text").mkdir()
    assert shards.is_binarized(tmp_path / "bin") and shards.is_binarized(tmp_path / "x.pickle")
    assert shards.is_binarized(tmp_path / "x.pkl")
    assert not shards.is_binarized(tmp_path / "text") and not shards.is_binarized(tmp_path / "a.txt")


def test_read_shard_checks_the_bytes_and_sha256_of_its_manifest_entry(tmp_path):
    """Issue 22: a manifest whose sha256 was edited, and a shard whose ids were replaced with its counts
    kept, both trained with exit 0 before."""
    data = seqs(4)
    path = tmp_path / "s.pickle"
    entry = {"file": "s.pickle", "sequences": 4, "tokens": sum(len(x) for x in data),
             **shards.write_shard(path, data)}
    assert len(shards.read_shard(path, entry)) == 4
    with pytest.raises(DataError, match=r"s.pickle: sha256 .*, its manifest says 000000000000"):
        shards.read_shard(path, {**entry, "sha256": "0" * 64})
    replaced = [np.full_like(x, 500) for x in data]  # same counts, same byte size, other tokens
    shards.write_shard(path, replaced)
    assert path.stat().st_size == entry["bytes"]
    with pytest.raises(DataError, match="s.pickle: sha256 .*changed since binarize.py wrote it"):
        shards.read_shard(path, entry)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="bytes, its manifest says"):
        shards.read_shard(path, entry)


# ---- extras: per-sequence side arrays beside a shard ---------------------------------------


def _with_extras(tmp_path):
    seqs = [np.array([1, 5, 2], dtype=np.uint16), np.array([1, 6, 7, 2], dtype=np.uint16)]
    side = [np.array([0, 3, -1], dtype=np.int32), np.array([1, 2, -1, 4], dtype=np.int32)]
    entry = {"file": "00000.pickle", "sequences": 2, "tokens": 7, **shards.write_shard(tmp_path / "00000.pickle", seqs)}
    entry["extras"] = shards.write_extras(tmp_path, "00000.pickle", {"alignment": side})
    shards.write_manifest(tmp_path, {"shards": [entry]})
    return seqs, side


def test_extras_read_back_in_sequence_order(tmp_path):
    seqs, side = _with_extras(tmp_path)
    assert (tmp_path / "00000.alignment.pickle").is_file()
    got, _, extras = shards.load_sequences([tmp_path], extras=("alignment",))
    assert [s.tolist() for s in got] == [s.tolist() for s in seqs]
    assert [a.tolist() for a in extras["alignment"]] == [a.tolist() for a in side]
    assert len(shards.load_sequences([tmp_path])) == 2  # without extras: the old (sequences, manifest)


def test_extras_missing_or_changed_are_refused(tmp_path):
    _with_extras(tmp_path)
    with pytest.raises(DataError, match="no 'loss_mask' beside it"):
        shards.load_sequences([tmp_path], extras=("loss_mask",))
    path = tmp_path / "00000.alignment.pickle"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="00000.alignment.pickle: sha256"):
        shards.load_sequences([tmp_path], extras=("alignment",))
