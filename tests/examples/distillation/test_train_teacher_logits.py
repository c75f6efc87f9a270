"""train.py --teacher_logits: its flags, what it hands the Distiller, the one-line refusal of every dump that
does not match the run, and (with the distiller's top-k KD) exact resume."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import teacher_logits
import train
from distil_ja import shards
from config import parse_config
from distil_ja.cli import EXIT_DATA, EXIT_USAGE, UsageError
from helpers import (REPO, TRAIN_PY, assert_taid_t_follows_the_logged_kd, dump_args, dump_script, gpt2_config,
                     random_sequences, train_args, write_shard)
from losses import TaidSchedule

DUMP = dump_script()


def offline_args(setup, dump, dump_path, *extra):
    """train_args with --teacher_logits instead of --teacher_name and --tokenizer_name (the dump's is used)."""
    args = train_args(setup, dump_path, "--alpha_cos", "0", *extra)
    for flag in ("--teacher_name", "--tokenizer_name"):
        i = args.index(flag)
        del args[i : i + 2]
    return [*args, "--teacher_logits", str(dump)]


@pytest.fixture
def distillers(monkeypatch):
    """train.Distiller replaced by a stand-in that records what train.py hands it and trains nothing."""
    made = []

    class RecordingDistiller:
        def __init__(self, params, runtime, dataset, student, teacher, eval_sequences, eval_tasks=None, cross=None):
            self.params, self.dataset, self.teacher = params, dataset, teacher
            self.log = types.SimpleNamespace(clear=lambda: None)
            made.append(self)

        def resume(self):
            return False

        def train(self):
            pass

    monkeypatch.setattr(train, "Distiller", RecordingDistiller)
    return made


def refusal(capsys, args, status, message):
    assert train.main(args) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--teacher_name", "T", "--alpha_cos", "0"], "--teacher_logits and --teacher_name exclude each other"),
    ([], "--alpha_cos needs the teacher model, which --teacher_logits replaces: set it to 0"),
    (["--alpha_mse", "1", "--alpha_cos", "0"], "--alpha_mse needs the teacher model"),
])
def test_flags_that_need_the_teacher_model_are_refused(extra, message):
    with pytest.raises(UsageError, match=message):
        parse_config(["--data_file", "D", "--student_config", "S", "--teacher_logits", "DIR", *extra])


def test_no_tokenizer_flag_is_needed_with_teacher_logits():
    params = parse_config(["--data_file", "D", "--student_config", "S", "--teacher_logits", "DIR", "--alpha_cos", "0"])
    assert params.teacher_logits == "DIR" and params.teacher_name is None and params.tokenizer_name is None


def test_the_distiller_gets_no_teacher_and_batches_of_4_tuples(offline_setup, offline_dump, distillers, tmp_path):
    dump_path = tmp_path / "run"
    train.run(offline_args(offline_setup, offline_dump, dump_path))
    (distiller,) = distillers
    assert distiller.teacher is None and distiller.params.teacher_logits == str(offline_dump)
    dataset = distiller.dataset
    rows = teacher_logits.TopKLogits(offline_dump)
    assert len(dataset) == len(rows) and np.array_equal(dataset.lengths, rows.lengths())
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset.batch_sequences)  # as the Distiller batches
    token_ids, lengths, topk_ids, topk_logprobs = next(iter(loader))
    assert topk_ids.shape == topk_logprobs.shape == (*token_ids.shape, 8)
    for row in range(4):
        n = int(lengths[row])
        assert token_ids[row, :n].tolist() == dataset.sequences[row].tolist()
        assert topk_ids[row, :n].tolist() == rows[row][0].tolist()
    assert json.loads((dump_path / train.TEACHER_LOGITS).read_text()) == rows.manifest
    assert teacher_logits.sequences_sha256(dataset.sequences) == rows.manifest["sequences_sha256"]
    spiece = (dump_path / "spiece.model").read_bytes()  # the tokenizer saved with the student: the dump's
    assert spiece == (offline_dump / teacher_logits.TOKENIZER / "spiece.model").read_bytes()


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from data_prep.make_tokenizer import train_tokenizer

    from conftest import TOKENIZER_TEXT

    folder = tmp_path_factory.mktemp("other_tokenizer")  # the same characters, each line reversed: other pieces
    (folder / "text.txt").write_text("\n".join(line[::-1] for line in TOKENIZER_TEXT.splitlines()) * 3, encoding="utf-8")
    train_tokenizer([str(folder / "text.txt")], 160, str(folder / "tok"))
    return folder / "tok"


@pytest.mark.parametrize("mismatch, status, message", [
    ("temperature", EXIT_USAGE, "--temperature 2, but"),
    ("tokenizer", EXIT_USAGE, "was dumped with another tokenizer than"),
    ("max_len", EXIT_USAGE, "the student's context (16) is shorter than the max_len 32"),
    ("shards", EXIT_DATA, "not the same data"),
    ("same lengths", EXIT_DATA, "not the same data"),
    ("missing shard", EXIT_DATA, "missing or unreadable shard"),
])
def test_a_dump_that_does_not_match_is_refused_in_one_line(offline_setup, offline_dump, other_tokenizer, distillers,
                                                           capsys, tmp_path, mismatch, status, message):
    dump, setup, extra = offline_dump, dict(offline_setup), []
    if mismatch == "temperature":
        extra = ["--temperature", "2"]
    elif mismatch == "tokenizer":
        extra = ["--tokenizer_name", str(other_tokenizer)]
    elif mismatch == "max_len":
        setup["student_config"] = tmp_path / "short.json"
        setup["student_config"].write_text(json.dumps(gpt2_config(n_layer=1, n_positions=16).to_dict()))
    elif mismatch == "shards":
        setup["data"] = write_shard(tmp_path / "other.pickle",
                                    random_sequences(40, max_len=90, vocab_size=setup["vocab"], seed=2))
    elif mismatch == "same lengths":  # other tokens, every length kept: only sequences_sha256 tells them apart
        sequences = shards.load_sequences([str(setup["data"])])[0]
        other = [np.concatenate(([s[0]], 7 + (s[1:-1] - 6) % (setup["vocab"] - 7), [s[-1]])).astype(s.dtype)
                 for s in sequences]
        assert [len(s) for s in other] == [len(s) for s in sequences]
        setup["data"] = write_shard(tmp_path / "same_lengths.pickle", other)
    elif mismatch == "missing shard":
        dump = tmp_path / "dump"
        shutil.copytree(offline_dump, dump)
        (dump / "shard-00000.logprobs.npy").unlink()
    refusal(capsys, offline_args(setup, dump, tmp_path / "run", *extra), status, message)
    assert not distillers and not (tmp_path / "run").exists()  # refused before anything was written


def test_resume_with_the_dump_of_another_teacher_is_refused(offline_setup, offline_dump, distillers, capsys, tmp_path):
    from transformers import GPT2LMHeadModel

    dump = tmp_path / "dump"
    shutil.copytree(offline_dump, dump)
    args = offline_args(offline_setup, dump, tmp_path / "run")
    train.run(args)
    train.run([*args, "--resume"])  # the same dump: resumes
    torch.manual_seed(1)
    GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32)).save_pretrained(tmp_path / "other_teacher")
    assert DUMP.main(dump_args({**offline_setup, "teacher": tmp_path / "other_teacher"}, dump, "--force")) == 0
    refusal(capsys, [*args, "--resume"], EXIT_USAGE, "is no longer the dump this run started from (teacher")
    assert len(distillers) == 2


@pytest.mark.slow
def test_an_offline_teacher_trains_and_resumes_exactly(offline_setup, offline_dump, tmp_path):
    config = gpt2_config(n_layer=1, n_embd=32)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1  # so that RNG state matters
    (tmp_path / "student.json").write_text(json.dumps(config.to_dict()))
    setup = {**offline_setup, "student_config": tmp_path / "student.json"}
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}

    def args(dump_path, *extra):
        return offline_args(setup, offline_dump, dump_path, "--max_steps", "6", "--checkpoint_interval", "2",
                            "--log_interval", "1", "--batch_size", "3", "--gradient_accumulation_steps", "2",
                            "--group_by_size", *extra)

    def run(dump_path, *extra, fault=None):
        return subprocess.run([sys.executable, str(TRAIN_PY), *args(dump_path, *extra)], capture_output=True,
                              text=True, timeout=300, env={**env, **({"DISTIL_FAULT": fault} if fault else {})})

    def metrics(dump_path):
        return [json.loads(line) for line in (dump_path / "metrics.jsonl").read_text().splitlines()]

    assert train.main(args(tmp_path / "reference")) == 0  # in this process, one thread: the subprocesses' floats
    assert [m["step"] for m in metrics(tmp_path / "reference")] == list(range(1, 7))
    assert all("ce" in m and np.isfinite(m["ce"]) for m in metrics(tmp_path / "reference"))  # the top-k KD term
    killed = run(tmp_path / "run", fault="after_step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stderr
    assert metrics(tmp_path / "reference") == metrics(tmp_path / "run")
    a, b = load_file(str(tmp_path / "reference" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_taid_and_akl_train_from_an_offline_teacher(offline_setup, offline_dump, tmp_path):
    """The adaptive objectives on the top-k buckets: taid's t follows the KD term the run logged, akl trains."""
    taid = tmp_path / "taid"
    train.run(offline_args(offline_setup, offline_dump, taid, "--kd_loss", "taid", "--taid_t_end", "0.6",
                           "--taid_alpha", "0.3", "--taid_beta", "0.5", "--max_steps", "6", "--log_interval", "1"))
    assert_taid_t_follows_the_logged_kd(taid, TaidSchedule(0.4, 0.6, 0.3, 0.5), 6)
    akl = tmp_path / "akl"
    train.run(offline_args(offline_setup, offline_dump, akl, "--kd_loss", "akl", "--max_steps", "3", "--log_interval", "1"))
    logged = [json.loads(line) for line in (akl / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(np.isfinite(m["ce"]) and m["ce"] > 0 for m in logged)
