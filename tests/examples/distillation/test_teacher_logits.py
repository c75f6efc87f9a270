"""teacher_logits.py and scripts/dump_teacher_logits.py: the rows are the teacher's top k at every position
of train.py's sequences, the same under torchrun, tied to what made them, and read back as 4-tuple batches."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import teacher_logits
from distil_ja.cli import EXIT_DATA, EXIT_USAGE, DataError
from distil_ja.shards import load_sequences
from distil_ja.tokenization import load_tokenizer
from helpers import DUMP_PY, REPO, dump_args, dump_script, free_port, random_sequences, write_shard
from lm_seqs_dataset import LmSeqsDataset
from vocab import special_ids_of

DUMP = dump_script()
MAX_LEN = 32  # dump_args: under the tiny teacher's 64 positions, so the longer sequences are cut into chunks
TOP_K = 8


def training_sequences(setup):
    """The sequences train.py trains on with max_len MAX_LEN, built as train.py builds them."""
    ids = special_ids_of(load_tokenizer(str(setup["tokenizer"])))
    return LmSeqsDataset(load_sequences([str(setup["data"])])[0], MAX_LEN, ids).sequences


@pytest.fixture(scope="module")
def teacher(offline_setup):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(offline_setup["teacher"]).eval()


def teacher_logprobs(teacher, vocab, sequence, temperature):
    """The teacher's log-probabilities over the tokenizer's ids, for one sequence alone (no batch, no padding)."""
    with torch.no_grad():
        logits = teacher(torch.from_numpy(sequence.astype(np.int64))[None]).logits[0, :, :vocab]
    return torch.log_softmax(logits / temperature, dim=-1)


def test_rows_are_the_teachers_top_k_at_every_position(offline_setup, teacher, tmp_path):
    folder = tmp_path / "dump"
    assert DUMP.main(dump_args(offline_setup, folder, "--temperature", "2", "--logprobs_dtype", "float32")) == 0
    expected = training_sequences(offline_setup)
    assert max(len(s) for s in load_sequences([str(offline_setup["data"])])[0]) > MAX_LEN  # some were cut
    rows = teacher_logits.TopKLogits(folder)
    stored = LmSeqsDataset.from_cache(folder / teacher_logits.SEQUENCES).sequences
    assert len(rows) == len(stored) == len(expected) and rows.manifest["tokens"] == sum(map(len, expected))
    assert (rows.top_k, rows.temperature, rows.vocab_size) == (TOP_K, 2.0, offline_setup["vocab"])
    for i, sequence in enumerate(expected):
        np.testing.assert_array_equal(stored[i], sequence)  # train.py's sequences, chunking included
        ids, logprobs = rows[i]
        assert ids.shape == logprobs.shape == (len(sequence), TOP_K) and logprobs.dtype == np.float32
        reference = teacher_logprobs(teacher, offline_setup["vocab"], sequence, temperature=2.0)
        ids = torch.from_numpy(ids.astype(np.int64))
        logprobs = torch.from_numpy(np.array(logprobs))
        torch.testing.assert_close(logprobs, reference.gather(1, ids), atol=1e-5, rtol=0)
        assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()  # most probable first
        kth = reference.topk(TOP_K, dim=-1).values[:, -1:]
        assert (reference.gather(1, ids) >= kth - 1e-5).all()  # a top k (ties aside)
        assert all(len(set(row.tolist())) == TOP_K for row in ids)


def test_without_n_gpu_a_machine_with_no_gpu_dumps_on_the_cpu(offline_setup, offline_dump, tmp_path, monkeypatch):
    """--n_gpu's default is where the user is: here, no GPU, so the CPU, the same rows as --n_gpu 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = dump_args(offline_setup, tmp_path / "dump")
    del args[args.index("--n_gpu"):args.index("--n_gpu") + 2]
    assert dump_script().main(args) == 0
    for name in ("shard-00000.ids.npy", "shard-00000.logprobs.npy"):
        assert np.array_equal(np.load(tmp_path / "dump" / name), np.load(offline_dump / name))


def test_float16_rows_are_rounded_down(offline_dump, offline_setup, teacher):
    manifest = teacher_logits.load_manifest(offline_dump)
    assert (manifest["ids_dtype"], manifest["logprobs_dtype"], manifest["logprobs_rounding"]) == ("uint16", "float16", "down")
    assert manifest["bytes_per_token"] == pytest.approx(TOP_K * (2 + 2), abs=0.2)  # the .npy headers aside
    ids, logprobs = teacher_logits.TopKLogits(offline_dump)[0]
    reference = teacher_logprobs(teacher, offline_setup["vocab"], training_sequences(offline_setup)[0], 1.0)
    exact = reference.gather(1, torch.from_numpy(ids.astype(np.int64))).numpy()
    stored = logprobs.astype(np.float32)
    assert (stored <= exact + 1e-6).all() and (exact - stored <= 2**-10 * np.abs(exact) + 1e-6).all()

    values = np.random.default_rng(0).uniform(-30, 0, 10_000).astype(np.float32)
    half = teacher_logits.stored_logprobs(values, "float16")
    assert half.dtype == np.float16 and (half.astype(np.float32) <= values).all()
    assert (np.nextafter(half, np.float16(np.inf)).astype(np.float32) >= values).all()  # the nearest below
    assert (np.exp(half.astype(np.float64)).sum() <= np.exp(values.astype(np.float64)).sum())


def test_manifest_ties_the_rows_to_sequences_tokenizer_and_teacher(offline_dump, offline_setup, teacher):
    import hashlib

    manifest = teacher_logits.load_manifest(offline_dump)
    expected = training_sequences(offline_setup)
    assert manifest["sequences"] == len(expected) and manifest["tokens"] == sum(map(len, expected))
    assert manifest["sequences_sha256"] == teacher_logits.sequences_sha256(expected)
    assert manifest["sequences_sha256"] == teacher_logits.sequences_sha256([s.astype(np.int32) for s in expected])
    assert (manifest["top_k"], manifest["temperature"], manifest["max_len"]) == (TOP_K, 1.0, MAX_LEN)
    tokenizer = load_tokenizer(str(offline_setup["tokenizer"]))
    assert manifest["tokenizer"] == teacher_logits.tokenizer_identity(tokenizer, str(offline_setup["tokenizer"]),
                                                                      special_ids_of(tokenizer))
    assert manifest["tokenizer"]["spiece_sha256"] and manifest["tokenizer"]["vocab_size"] == offline_setup["vocab"]
    recorded = manifest["teacher"]
    assert (recorded["model_type"], recorded["vocab_size"], recorded["context"]) == ("gpt2", 192, 64)
    assert recorded["weights_sha256"] == teacher_logits.weights_sha256(teacher)
    assert manifest["precision"] == "fp32" and manifest["data"]["data_file"] == [str(offline_setup["data"])]
    (shard,) = manifest["shards"]
    assert (shard["first_sequence"], shard["sequences"], shard["tokens"]) == (0, len(expected), manifest["tokens"])
    assert shard["ids"]["sha256"] == hashlib.sha256((offline_dump / shard["ids"]["file"]).read_bytes()).hexdigest()
    saved = load_tokenizer(str(offline_dump / teacher_logits.TOKENIZER))  # train.py's default tokenizer
    assert teacher_logits.tokenizer_identity(saved, str(offline_dump / teacher_logits.TOKENIZER),
                                             special_ids_of(saved))["spiece_sha256"] == manifest["tokenizer"]["spiece_sha256"]


def test_batches_are_4_tuples_lined_up_with_the_sequences(offline_dump):
    ids = special_ids_of(load_tokenizer(str(offline_dump / teacher_logits.TOKENIZER)))
    rows = teacher_logits.TopKLogits(offline_dump)
    dataset = LmSeqsDataset.from_cache(offline_dump / teacher_logits.SEQUENCES, ids, rows)
    picked = [5, 0, len(dataset) - 1]
    token_ids, lengths, topk_ids, topk_logprobs = dataset.batch_sequences([dataset[i] for i in picked])
    assert token_ids.dtype == lengths.dtype == topk_ids.dtype == torch.int64 and topk_logprobs.dtype == torch.float32
    assert topk_ids.shape == topk_logprobs.shape == (*token_ids.shape, TOP_K)
    for row, i in enumerate(picked):
        n = int(lengths[row])
        assert n == len(dataset.sequences[i]) and token_ids[row, :n].tolist() == dataset.sequences[i].tolist()
        assert (token_ids[row, n:] == ids.pad).all()
        assert topk_ids[row, :n].tolist() == rows[i][0].tolist()
        assert torch.equal(topk_logprobs[row, :n], torch.from_numpy(rows[i][1].astype(np.float32)))
        assert (topk_ids[row, n:] == 0).all() and (topk_logprobs[row, n:] == 0).all()  # padding
    assert len(LmSeqsDataset.from_cache(offline_dump / teacher_logits.SEQUENCES, ids).batch_sequences([dataset.sequences[0]])) == 2


def test_rank_slices_are_whole_windows_that_cover_every_sequence():
    lengths = np.random.default_rng(0).integers(12, 64, 1000)
    offsets = teacher_logits.offsets_of(lengths)
    for world_size in (1, 2, 3, 8):
        slices = [teacher_logits.rank_slice(offsets, 4, world_size, rank) for rank in range(world_size)]
        assert slices[0][0] == 0 and slices[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, disjoint
        assert all(start % (4 * teacher_logits.SORT_WINDOW) == 0 for start, _ in slices)
        tokens = [offsets[end] - offsets[start] for start, end in slices]
        assert max(tokens) - min(tokens) <= 2 * 4 * teacher_logits.SORT_WINDOW * 64
    batches = teacher_logits.window_batches(lengths, 64, 128, 4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(64, 128))
    assert all(lengths[a].min() >= lengths[b].max() for a, b in zip(batches, batches[1:]))  # longest first


@pytest.mark.parametrize("extra, setup_change, status, message", [
    ([], "non-empty output", EXIT_USAGE, "is not empty (1 entry (precious.txt)); it was not written by this toolkit"),
    (["--top_k", "1000"], None, EXIT_USAGE, "--top_k 1000 exceeds the"),
    (["--within_pieces"], None, EXIT_USAGE, "--within_pieces: the teacher's tokenizer is the student's"),
    (["--char_classes"], None, EXIT_USAGE, "--char_classes: the teacher's tokenizer is the student's"),
    (["--max_len", "100"], None, EXIT_USAGE, "--max_len 100 exceeds the teacher's context (64)"),
    (["--temperature", "0"], None, EXIT_USAGE, "--temperature must be > 0"),
    ([], "ids beyond the tokenizer", EXIT_DATA, "beyond the tokenizer's"),
])
def test_the_dump_refuses_in_one_line(offline_setup, tmp_path, capsys, extra, setup_change, status, message):
    setup = dict(offline_setup)
    if setup_change == "non-empty output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "precious.txt").write_text("keep me")
    elif setup_change == "ids beyond the tokenizer":
        setup["data"] = write_shard(tmp_path / "wide.pickle", random_sequences(8, vocab_size=192, seed=3))
    assert DUMP.main(dump_args(setup, tmp_path / "out", *extra)) == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / teacher_logits.MANIFEST).exists()


@pytest.mark.parametrize("damage, message", [
    ("no manifest", "has no manifest.json"),
    ("missing shard", "missing or unreadable shard"),
    ("truncated shard", "missing or unreadable shard"),
    ("other shard", "the manifest says"),
    ("other dtype", "float32, the manifest says"),
    ("gap", "leave a gap"),
])
def test_a_damaged_dump_is_refused(offline_dump, tmp_path, damage, message):
    folder = tmp_path / "dump"
    shutil.copytree(offline_dump, folder)
    manifest = teacher_logits.load_manifest(folder)
    ids_file = folder / manifest["shards"][0]["ids"]["file"]
    if damage == "no manifest":
        (folder / teacher_logits.MANIFEST).unlink()
    elif damage == "missing shard":
        ids_file.unlink()
    elif damage == "truncated shard":
        ids_file.write_bytes(ids_file.read_bytes()[:-100])
    elif damage == "other shard":
        np.save(ids_file, np.zeros((3, TOP_K), dtype=np.uint16))
    elif damage == "other dtype":  # the same rows and shape, stored as float32 instead of the manifest's float16
        logprobs_file = folder / manifest["shards"][0]["logprobs"]["file"]
        np.save(logprobs_file, np.load(logprobs_file).astype(np.float32))
    elif damage == "gap":
        manifest["shards"][0]["first_sequence"] = 1
        (folder / teacher_logits.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        teacher_logits.TopKLogits(folder)


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(offline_setup, offline_dump, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(DUMP_PY), *dump_args(offline_setup, tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = teacher_logits.TopKLogits(offline_dump), teacher_logits.TopKLogits(tmp_path / "two")
    assert [s["rank"] for s in two.manifest["shards"]] == [0, 1] and two.manifest["world_size"] == 2
    assert all(s["sequences"] > 0 for s in two.manifest["shards"])
    varying = {"dump_id", "world_size", "shards", "seconds", "tokens_per_s", "bytes_per_token"}
    assert {k: v for k, v in one.manifest.items() if k not in varying} == \
           {k: v for k, v in two.manifest.items() if k not in varying}
    assert len(one) == len(two)
    for i in range(len(one)):
        for a, b in zip(one[i], two[i]):
            np.testing.assert_array_equal(a, b)  # bit for bit: the same batches, whatever the world size
