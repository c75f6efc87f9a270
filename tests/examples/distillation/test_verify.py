"""Issue 22, item 2: train.py checks each shard's and each teacher-logit file's sha256 against its manifest,
once, where rank 0 builds the token cache; a resume reuses that cache and reads no shard again."""

import json
import shutil

import pytest

import train
from conftest import TOKENIZER_TEXT
from distil_ja import shards
from helpers import train_args


@pytest.fixture(scope="module")
def binarized(tiny_setup, tmp_path_factory):
    """binarize.py output of the tiny tokenizer's own text (no <unk>)."""
    from data_prep import binarize

    folder = tmp_path_factory.mktemp("verify")
    text = folder / "text.txt"
    text.write_text("\n".join(line + "\n" for line in TOKENIZER_TEXT.splitlines() * 10), encoding="utf-8")
    assert binarize.main(["--input", str(text), "--tokenizer", str(tiny_setup["tokenizer"]), "--output_dir",
                          str(folder / "bin"), "--quiet", "--num_workers", "1", "--shard_size", "200"]) == 0
    return folder / "bin"


def edited_copy(binarized, tmp_path, how):
    data = tmp_path / "bin"
    shutil.copytree(binarized, data)
    manifest = json.loads((data / shards.MANIFEST).read_text())
    entry = manifest["shards"][1]
    if how == "manifest":
        entry["sha256"] = "f" * 64
        (data / shards.MANIFEST).write_text(json.dumps(manifest))
    else:  # every token of the shard replaced by id 50, counts and size kept
        seqs = shards.read_shard(data / entry["file"])
        shards.write_shard(data / entry["file"], [s * 0 + 50 for s in seqs])
    return data, entry["file"]


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines), lines
    return lines[-1]


@pytest.mark.parametrize("how", ["manifest", "tokens"])
def test_a_shard_that_is_not_the_one_binarized_is_refused(how, binarized, tiny_setup, tmp_path, capsys):
    data, name = edited_copy(binarized, tmp_path, how)
    args = train_args(tiny_setup, tmp_path / "run", "--data_file", str(data), "--max_steps", "2")
    assert train.main(args) == 1
    line = error_line(capsys)
    assert name in line and "sha256" in line and "binarize again" in line, line
    assert not (tmp_path / "run").exists()
    assert train.main([*args, "--verify", "size"]) == 0  # sizes only: the edit passes (the user asked)


def test_a_resume_reuses_the_token_cache(binarized, tiny_setup, tmp_path, monkeypatch, caplog):
    dump = tmp_path / "run"
    args = train_args(tiny_setup, dump, "--data_file", str(binarized), "--max_steps", "2", "--checkpoint_interval",
                      "1")
    assert train.main(args) == 0

    def no_reading(*args, **kwargs):
        raise AssertionError("a resume read the shards again")

    monkeypatch.setattr(shards, "read_shard", no_reading)
    with caplog.at_level("INFO"):
        assert train.main([*args[:-4], "--max_steps", "4", "--resume"]) == 0
    assert any("token cache" in r.getMessage() and "reused" in r.getMessage() for r in caplog.records)
    assert [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_a_teacher_logit_file_that_changed_is_refused(offline_setup, offline_dump, tmp_path, capsys):
    from test_train_teacher_logits import offline_args

    dump = tmp_path / "top8"
    shutil.copytree(offline_dump, dump)
    logprobs = sorted(dump.glob("shard-*.logprobs.npy"))[0]
    raw = bytearray(logprobs.read_bytes())
    raw[-1] ^= 0xFF  # one bit pattern of one row: same size, same dtype and shape in the header
    logprobs.write_bytes(bytes(raw))
    args = offline_args(offline_setup, dump, tmp_path / "run", "--max_steps", "2")
    assert train.main(args) == 1
    line = error_line(capsys)
    assert logprobs.name in line and "sha256" in line and "dump again" in line, line
    assert train.main([*args, "--verify", "size"]) == 0
