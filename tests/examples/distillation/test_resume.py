"""Exact resume after SIGKILL, crash-safe checkpoints, torchrun restarts, bad input, non-finite steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from distil_ja.outputs import MARKER
from distil_ja.cli import EXIT_DATA, EXIT_TRAINING, EXIT_USAGE
from helpers import REPO, TRAIN_PY, free_port, gpt2_config, random_sequences, train_args, write_shard

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dropout_setup(tiny_setup, tmp_path_factory):
    """The tiny setup with a dropout student (so RNG state matters) and length grouping."""
    folder = tmp_path_factory.mktemp("dropout")
    config = gpt2_config(n_layer=1, n_embd=32)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    (folder / "student.json").write_text(json.dumps(config.to_dict()))
    return {**tiny_setup, "student_config": folder / "student.json"}


def resume_args(setup, dump, *extra):
    return train_args(setup, dump, "--max_steps", "8", "--checkpoint_interval", "2", "--log_interval", "1",
                      "--batch_size", "3", "--gradient_accumulation_steps", "2", "--group_by_size",
                      "--eval_data", str(setup["data"]), "--eval_interval", "3", *extra)


def run(args, fault=None, torchrun=None, timeout=300):
    env = {**ENV, **({"DISTIL_FAULT": fault} if fault else {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(TRAIN_PY), *args], capture_output=True, text=True, env=env, timeout=timeout)


def metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def assert_identical_runs(a, b):
    assert metrics(a) == metrics(b)
    evaluations = json.loads((a / "eval_results.json").read_text())
    assert [e["step"] for e in evaluations["history"]] == [3, 6, 8]
    assert evaluations == json.loads((b / "eval_results.json").read_text())
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(dropout_setup, tmp_path_factory):
    """The reference run, in this process on one thread: the same float sums as the one-thread subprocesses
    (ENV) that the tests kill and resume."""
    dump = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the autouse one_thread
    try:
        train.run(resume_args(dropout_setup, dump))
    finally:
        torch.set_num_threads(threads)
    assert [m["step"] for m in metrics(dump)] == list(range(1, 9))
    return dump


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(dropout_setup, uninterrupted, tmp_path):
    dump = tmp_path / "run"
    killed = run(resume_args(dropout_setup, dump), fault="after_step:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(metrics(dump)) == 5  # steps 1-5 were logged; step 5 is after the last checkpoint (4)
    resumed = run(resume_args(dropout_setup, dump, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stderr and "step 4" in resumed.stderr
    assert_identical_runs(uninterrupted, dump)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(dropout_setup, uninterrupted, tmp_path):
    dump = tmp_path / "run"
    killed = run(resume_args(dropout_setup, dump), fault="checkpoint_write:6")
    assert killed.returncode == -9
    assert (dump / "checkpoint_step00000006.tmp").is_dir()
    assert not (dump / "checkpoint_step00000006").exists()
    resumed = run(resume_args(dropout_setup, dump, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint_step00000004: step 4" in resumed.stderr
    assert_identical_runs(uninterrupted, dump)


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(dropout_setup, uninterrupted, tmp_path, capsys):
    dump = tmp_path / "run"
    shutil.copytree(uninterrupted, dump)
    for step in (8, 6):
        shutil.rmtree(dump / f"checkpoint_step0000000{step}")
    shutil.copytree(dump / "checkpoint_step00000004", dump / "checkpoint_step00000006")
    state = dump / "checkpoint_step00000006" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    (dump / "model.safetensors").unlink()
    assert train.main(resume_args(dropout_setup, dump, "--resume")) == 0  # in this process, one thread
    err = capsys.readouterr().err
    assert "checkpoint_step00000006 is unreadable" in err
    assert "Resumed from" in err and "checkpoint_step00000004: step 4" in err
    assert_identical_runs(uninterrupted, dump)


def test_resume_extends_a_finished_run_and_keeps_k_checkpoints(dropout_setup, uninterrupted, tmp_path, capsys):
    dump = tmp_path / "run"
    shutil.copytree(uninterrupted, dump)
    assert train.main(resume_args(dropout_setup, dump, "--resume", "--max_steps", "10", "--keep_checkpoints", "2")) == 0
    assert "Resuming with --max_steps changed from 8 to 10" in capsys.readouterr().err
    assert [m["step"] for m in metrics(dump)] == list(range(1, 11))
    assert sorted(p.name for p in dump.glob("checkpoint_step*")) == ["checkpoint_step00000008", "checkpoint_step00000010"]


def test_resume_with_other_settings_is_refused(dropout_setup, uninterrupted, tmp_path, capsys):
    dump = tmp_path / "run"
    shutil.copytree(uninterrupted, dump)
    before = sorted(p.name for p in dump.rglob("*"))
    assert train.main(resume_args(dropout_setup, dump, "--resume", "--learning_rate", "0.01")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot resume with changed settings (--learning_rate was 0.001, now 0.01)" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in dump.rglob("*")) == before


@pytest.fixture(scope="module")
def two_process_reference(dropout_setup, tmp_path_factory):
    dump = tmp_path_factory.mktemp("two_process") / "run"
    reference = run(resume_args(dropout_setup, dump), torchrun=["--nproc_per_node", "2", "--master_port", free_port()])
    assert reference.returncode == 0, reference.stderr[-2000:]
    return dump


@pytest.mark.slow
def test_two_process_sigkill_then_resume_is_bitwise_identical(dropout_setup, two_process_reference, tmp_path):
    torchrun = ["--nproc_per_node", "2", "--master_port", free_port()]
    killed = run(resume_args(dropout_setup, tmp_path / "run"), fault="after_step:5:1", torchrun=torchrun)
    assert killed.returncode != 0
    resumed = run(resume_args(dropout_setup, tmp_path / "run", "--resume"), torchrun=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical_runs(two_process_reference, tmp_path / "run")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_finishes_identically(dropout_setup, two_process_reference, tmp_path):
    torchrun = ["--nproc_per_node", "2", "--master_port", free_port()]
    restarted = run(resume_args(dropout_setup, tmp_path / "run"), fault="after_step:5:1",
                    torchrun=[*torchrun, "--max-restarts", "1"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "torchrun restarted this worker: resuming" in restarted.stderr
    assert_identical_runs(two_process_reference, tmp_path / "run")


def test_nonfinite_steps_are_skipped_and_logged(tiny_setup, tmp_path, monkeypatch, caplog):
    from distiller import Distiller

    real = Distiller.loss_sums

    def nan_on_step_3(self, token_ids, lengths):
        sums = real(self, token_ids, lengths)
        return {k: v * float("nan") for k, v in sums.items()} if self.n_steps == 2 else sums

    monkeypatch.setattr(Distiller, "loss_sums", nan_on_step_3)
    dump = tmp_path / "run"
    with caplog.at_level("INFO"):
        train.run(train_args(tiny_setup, dump, "--log_interval", "1"))
    assert "Step 3: non-finite gradients" in caplog.text and "update skipped" in caplog.text
    logged = metrics(dump)
    assert [m["step"] for m in logged] == [1, 2, 4, 5, 6]
    assert logged[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_file(str(dump / "model.safetensors")).values())


def test_repeated_nonfinite_steps_stop_the_run(tiny_setup, tmp_path, monkeypatch):
    from distiller import Distiller

    real = Distiller.loss_sums

    def nan_from_step_4(self, token_ids, lengths):
        sums = real(self, token_ids, lengths)
        return {k: v * float("nan") for k, v in sums.items()} if self.n_steps >= 3 else sums

    monkeypatch.setattr(Distiller, "loss_sums", nan_from_step_4)
    dump = tmp_path / "run"
    code = train.main(train_args(tiny_setup, dump, "--max_steps", "20", "--checkpoint_interval", "3",
                                 "--max_nonfinite", "2"))
    assert code == EXIT_TRAINING
    assert [p.name for p in dump.glob("checkpoint_step*")] == ["checkpoint_step00000003"]
    assert not (dump / "model.safetensors").exists()


def _bad_inputs(setup, tmp):
    """(name, argument edits, expected message, exit code) for each kind of bad input."""
    from transformers import GPT2LMHeadModel

    good = random_sequences(8)
    truncated = tmp / "truncated.pickle"
    write_shard(truncated, good)
    truncated.write_bytes(truncated.read_bytes()[:300])
    corrupt = tmp / "corrupt.pickle"
    corrupt.write_bytes(b"\x80\x04garbage")
    big_vocab = write_shard(tmp / "big_ids.pickle", random_sequences(8, vocab_size=5000))
    short = write_shard(tmp / "short.pickle", random_sequences(8, min_len=3, max_len=8))
    small_vocab = tmp / "small_vocab.json"
    small_vocab.write_text(json.dumps(gpt2_config(n_layer=1, vocab_size=50).to_dict()))
    wrong_bos = gpt2_config(n_layer=1)
    wrong_bos.bos_token_id = 0
    (tmp / "wrong_bos.json").write_text(json.dumps(wrong_bos.to_dict()))
    (tmp / "broken.json").write_text("{ not json")
    other_teacher = tmp / "teacher_vocab_180"  # above the tokenizer's 160, below the student's 192
    GPT2LMHeadModel(gpt2_config(vocab_size=180)).save_pretrained(other_teacher)
    manifest_dir = tmp / "manifest_dir"
    manifest_dir.mkdir()
    write_shard(manifest_dir / "00000.pickle", good)
    (manifest_dir / "manifest.json").write_text(json.dumps({"format": "distil-ja/binarized/v1",
        "tokenizer": {"vocab_size": 32000, "special_ids": {"unk": 0, "bos": 1, "eos": 2, "pad": 3}},
        "shards": [{"file": "00000.pickle"}]}))
    other_model = tmp / "other_model_dir"
    other_model.mkdir()
    write_shard(other_model / "00000.pickle", good)
    from distil_ja.tokenization import load_tokenizer

    (other_model / "manifest.json").write_text(json.dumps({"format": "distil-ja/binarized/v1",
        "tokenizer": {"vocab_size": len(load_tokenizer(str(setup["tokenizer"]))), "spiece_sha256": "0" * 64},
        "shards": [{"file": "00000.pickle"}]}))
    return [
        ("other sentencepiece", {"--data_file": str(other_model)}, "binarized with another sentencepiece model",
         EXIT_USAGE),
        ("missing shard", {"--data_file": str(tmp / "nope.pickle")}, "nope.pickle: shard not found", EXIT_DATA),
        ("corrupt shard", {"--data_file": str(corrupt)}, "corrupt.pickle: corrupt or truncated", EXIT_DATA),
        ("truncated shard", {"--data_file": str(truncated)}, "truncated.pickle: corrupt or truncated", EXIT_DATA),
        ("token id", {"--data_file": str(big_vocab)}, "beyond the model vocabulary", EXIT_DATA),
        ("empty after filter", {"--data_file": str(short)}, "no sequence is left after filtering", EXIT_DATA),
        ("student vocab", {"--student_config": str(small_vocab)}, "student vocab_size 50 < tokenizer's", EXIT_USAGE),
        ("teacher vocab", {"--teacher_name": str(other_teacher)}, "student vocab_size 192 > teacher's 180", EXIT_USAGE),
        ("special ids", {"--student_config": str(tmp / "wrong_bos.json")}, "bos_token_id=0 but the tokenizer's is 1", EXIT_USAGE),
        ("manifest", {"--data_file": str(manifest_dir)}, "binarized with vocab_size 32000", EXIT_USAGE),
        ("config", {"--student_config": str(tmp / "broken.json")}, "unreadable student config", EXIT_USAGE),
    ]


BAD_INPUTS = ("other sentencepiece", "missing shard", "corrupt shard", "truncated shard", "token id",
              "empty after filter", "student vocab", "teacher vocab", "special ids", "manifest", "config")


@pytest.fixture(scope="module")
def bad_inputs(tiny_setup, tmp_path_factory):
    """_bad_inputs, made once for the module: {name: (argument edits, expected message, exit code)}."""
    cases = _bad_inputs(tiny_setup, tmp_path_factory.mktemp("bad_inputs"))
    return {name: (edits, message, code) for name, edits, message, code in cases}


def test_every_bad_input_has_a_case(bad_inputs):
    assert sorted(bad_inputs) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gives_one_clear_line_and_leaves_dump_path_untouched(tiny_setup, bad_inputs, tmp_path, capsys, name):
    """train.main in this process (the subprocess path of the same one-line refusal: test_train.py): each
    bad input exits with its status and one `error:` line, before --force touches the earlier run."""
    edits, message, code = bad_inputs[name]
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "earlier_run.txt").write_text("must survive")
    (dump / MARKER).write_text("")  # an earlier output of the toolkit: --force may replace it, once all is checked
    args = train_args(tiny_setup, dump, "--force")
    for flag, value in edits.items():
        args[args.index(flag) + 1] = value
    assert train.main(args) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1], err[-1500:]
    assert "Traceback" not in err
    assert sorted(p.name for p in dump.iterdir()) == sorted([MARKER, "earlier_run.txt"])


@pytest.mark.slow
def test_a_data_error_stops_every_rank_without_a_hang(tiny_setup, tmp_path):
    bad = write_shard(tmp_path / "big_ids.pickle", random_sequences(8, vocab_size=5000))
    args = train_args(tiny_setup, tmp_path / "run")
    args[args.index("--data_file") + 1] = str(bad)
    result = run(args, torchrun=["--nproc_per_node", "2", "--master_port", free_port()], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("beyond the model vocabulary") >= 2  # rank 0 found it, rank 1 was told
    assert not (tmp_path / "run").exists()
