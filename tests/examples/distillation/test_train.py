"""train.py end to end on the CPU: outputs, argument checks, accumulation and torchrun equivalence."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from helpers import REPO, TRAIN_PY, assert_same_weights, read_scalars, torchrun_train, train_args, weights
from distil_ja.cli import EXIT_DATA, EXIT_USAGE


def run_train(args, **kwargs):
    """train.py in a subprocess, as a user runs it (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}"}
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def main_here(args, capsys):
    """train.main in this process: (exit status, stderr). The refusals are the same as in a subprocess
    (run_command prints them, and an unexpected exception fails the test), without one interpreter
    start and torch import per case; the subprocess path is checked once, in
    test_existing_dump_path_is_refused_and_kept."""
    code = train.main(args)
    return code, capsys.readouterr().err


def assert_one_error_line(err, message):
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1], err[-1500:]


def test_single_process_run_writes_every_record(tiny_setup, tiny_run):
    dump = tiny_run
    names = {p.name for p in dump.iterdir()}
    assert {"config.json", "model.safetensors", "parameters.json", "git_log.json", "log",
            "metrics.jsonl", "checkpoint_step00000003", "checkpoint_step00000006"} <= names
    params = json.loads((dump / "parameters.json").read_text())
    assert params["max_steps"] == 6 and params["alpha_cos"] == 0.1
    git_log = json.loads((dump / "git_log.json").read_text())
    assert set(git_log) == {"repo_path", "repo_remote", "repo_sha", "repo_branch", "dirty"}
    assert git_log["repo_path"] == str(REPO) and len(git_log["repo_sha"]) == 40  # this checkout, not a repr
    assert list((dump / "log").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    student = AutoModelForCausalLM.from_pretrained(dump)
    assert student.config.n_layer == 1 and student.config.bos_token_id == 1
    initial = GPT2LMHeadModel.from_pretrained(tiny_setup["teacher"])
    assert student.transformer.wte.weight.shape == initial.transformer.wte.weight.shape
    checkpoint = torch.load(dump / "checkpoint_step00000006" / "training_state.pt", weights_only=True)
    torch.testing.assert_close(checkpoint["student"]["transformer.h.0.mlp.c_fc.weight"],
                               student.transformer.h[0].mlp.c_fc.weight)


def test_training_lowers_the_loss(tiny_setup, tmp_path):
    import numpy as np

    from helpers import TINY_VOCAB, write_shard

    rng = np.random.default_rng(0)  # counting sequences: each token is the previous plus one
    counting = [np.array([1, *((start + np.arange(30)) % (TINY_VOCAB - 7) + 7), 2], dtype=np.uint16)
                for start in rng.integers(0, TINY_VOCAB, 64)]
    args = train_args(tiny_setup, tmp_path / "run", "--max_steps", "40", "--log_interval", "20", "--alpha_cos", "0",
                      "--checkpoint_interval", "0", "--learning_rate", "3e-3")
    args[args.index("--data_file") + 1] = str(write_shard(tmp_path / "counting.pickle", counting))
    train.run(args)
    losses = read_scalars(tmp_path / "run" / "log", "losses/clm")
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5


def test_gradient_accumulation_equals_a_bigger_batch(tiny_setup, tiny_run, tmp_path):
    defaults = train_args(tiny_setup, tiny_run)
    assert defaults[defaults.index("--batch_size") + 1] == "4"  # tiny_run: one micro-batch of 4 a step
    train.run(train_args(tiny_setup, tmp_path / "accumulated", "--batch_size", "2", "--gradient_accumulation_steps", "2"))
    assert_same_weights(weights(tiny_run), weights(tmp_path / "accumulated"), atol=1e-5)


def test_a_distilled_dump_path_serves_as_the_next_teacher(tiny_setup, tiny_run, tmp_path):
    second = train_args(tiny_setup, tmp_path / "second", "--teacher_name", str(tiny_run), "--alpha_cos", "0")
    second[second.index("--tokenizer_name") : second.index("--tokenizer_name") + 2] = []
    train.run(second)
    assert (tmp_path / "second" / "model.safetensors").is_file()

    from distil_ja.tokenization import DocumentEncoder

    text = ["今日はPythonで電車の本を読んだ。"]
    assert DocumentEncoder(str(tmp_path / "second")).encode_document(text) == \
        DocumentEncoder(str(tiny_setup["tokenizer"])).encode_document(text)


def test_training_without_a_teacher(tiny_setup, tmp_path):
    args = train_args(tiny_setup, tmp_path / "alone", "--alpha_ce", "0", "--alpha_cos", "0", "--alpha_clm", "1")
    i = args.index("--teacher_name")
    del args[i : i + 2]
    train.run(args)
    assert (tmp_path / "alone" / "model.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--alpha_ce", "0", "--alpha_clm", "0", "--alpha_cos", "0"], "positive sum"),
    (["--n_gpu", "1"], "CUDA is not available"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--kd_loss", "jsd", "--kd_beta", "1.5"], "--kd_beta (jsd's beta) must be in [0, 1], got 1.5"),
    (["--kd_loss", "taid", "--taid_t_start", "0.9", "--taid_t_end", "0.5"], "0 <= --taid_t_start <= --taid_t_end <= 1"),
    (["--student_config", "/nonexistent.json"], "unreadable student config"),
    (["--tokenizer_name", "/nonexistent/tokenizer"], "cannot load tokenizer '/nonexistent/tokenizer'"),
    (["--teacher_name", "/nonexistent/teacher"], "cannot load teacher '/nonexistent/teacher'"),
])
def test_bad_arguments_give_one_clear_line(tiny_setup, tmp_path, capsys, extra, message):
    if "--n_gpu" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = main_here(train_args(tiny_setup, tmp_path / "run", *extra), capsys)
    assert code == EXIT_USAGE
    assert_one_error_line(err, message)


@pytest.mark.parametrize("name, content, message", [
    ("missing.pt", None, "No such file"),
    ("garbage.pt", b"not a state dict", "cannot load --student_pretrained_weights"),
    ("garbage.safetensors", b"not safetensors", "cannot load --student_pretrained_weights"),
    ("wrong_shape.pt", "state", "size mismatch"),
])
def test_bad_student_weights_give_one_clear_line(tiny_setup, tmp_path, capsys, name, content, message):
    weights_file = tmp_path / name
    if content == "state":
        torch.save({"transformer.wte.weight": torch.zeros(5, 5)}, weights_file)
    elif content is not None:
        weights_file.write_bytes(content)
    code, err = main_here(train_args(tiny_setup, tmp_path / "run", "--student_pretrained_weights", str(weights_file)),
                          capsys)
    assert code == EXIT_USAGE, err
    assert_one_error_line(err, message)
    assert str(weights_file) in err
    assert not (tmp_path / "run").exists()  # refused before the dump path is created


def test_teacher_loss_terms_need_a_teacher(tiny_setup, tmp_path, capsys):
    args = train_args(tiny_setup, tmp_path / "run")
    i = args.index("--teacher_name")
    del args[i : i + 2]
    code, err = main_here(args, capsys)
    assert code == EXIT_USAGE
    assert_one_error_line(err, "need a teacher")


def test_existing_dump_path_is_refused_and_kept(tiny_setup, tmp_path, capsys):
    """A folder of the user's is refused, --force or not (distil_ja.outputs); an earlier run is replaced by --force.
    The first refusal in a subprocess, as a user runs train.py: the exit status and the one line of the process."""
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "precious.txt").write_text("keep me")
    result = run_train(train_args(tiny_setup, dump, "--force"))
    assert result.returncode == EXIT_USAGE
    assert_one_error_line(result.stderr, "this toolkit did not write it, so --force does not delete it")
    assert train.main(train_args(tiny_setup, dump)) == EXIT_USAGE
    assert "--force would not delete it either" in capsys.readouterr().err
    assert (dump / "precious.txt").read_text() == "keep me"
    run = tmp_path / "earlier"
    assert train.main(train_args(tiny_setup, run, "--max_steps", "1")) == 0
    (run / "notes.txt").write_text("put there after the run")
    assert train.main(train_args(tiny_setup, run, "--max_steps", "1")) == EXIT_USAGE
    assert "pass --resume to continue it or --force to overwrite it" in capsys.readouterr().err
    assert train.main(train_args(tiny_setup, run, "--max_steps", "1", "--force")) == 0
    assert not (run / "notes.txt").exists() and (run / "model.safetensors").is_file()


def test_token_ids_beyond_the_vocabulary_are_refused(tiny_setup, tmp_path, capsys):
    from helpers import random_sequences, write_shard

    bad = random_sequences(8, vocab_size=1000, seed=5)
    shard = write_shard(tmp_path / "big_ids.pickle", bad)
    args = train_args(tiny_setup, tmp_path / "run")
    args[args.index("--data_file") + 1] = str(shard)
    code, err = main_here(args, capsys)
    assert code == EXIT_DATA
    assert_one_error_line(err, "beyond the model vocabulary")


@pytest.mark.slow
@pytest.mark.parametrize("objective", [(), ("--kd_loss", "taid", "--taid_t_end", "0.6", "--taid_alpha", "0.3",
                                            "--taid_beta", "0.5", "--log_interval", "1")], ids=["fkl", "taid"])
def test_two_gloo_processes_match_one_process(tiny_setup, tmp_path, objective):
    """taid: t follows the KD term of the global batch, so two ranks (each half of it) keep the one t
    that one process has; from a rank's own half it would drift (and DDP would mix two objectives)."""
    train.run(train_args(tiny_setup, tmp_path / "one", "--batch_size", "4", *objective))
    result = torchrun_train(train_args(tiny_setup, tmp_path / "two", "--batch_size", "2", *objective))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process group (gloo): rank 0 of 2" in result.stderr
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    if objective:
        one, two = ([json.loads(line)["taid_t"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                    for run in ("one", "two"))
        assert two == pytest.approx(one, abs=1e-6) and two[-1] > two[1]


def test_n_gpu_must_match_what_torchrun_started(monkeypatch):
    from distil_ja.cli import UsageError
    from utils import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--n_gpu 4 but 2 process"):
        init_distributed(4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="only 1 GPU"):
        init_distributed(2)


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_runs_on_the_cpu(tiny_setup, tmp_path, precision):
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, precision, "--max_steps", "3", "--log_interval", "1"))
    logged = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in weights(dump).values())


@pytest.mark.slow
def test_a_recipe_file_trains_what_its_flags_train_and_is_recorded(tiny_setup, tmp_path):
    """train.py --config FILE, without --n_gpu on a CPU machine: the same run as the flags, and
    parameters.json says which file it came from (the command line's overrides included)."""
    flags = train_args(tiny_setup, tmp_path / "flags", "--learning_rate", "2e-3")
    flags.remove("--no-group_by_size")
    del flags[flags.index("--n_gpu"):flags.index("--n_gpu") + 2]  # the default: the CPU here
    values = dict(zip(flags[0::2], flags[1::2]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k[2:]}: {v}\n" for k, v in values.items() if k != "--dump_path")
                      + "group_by_size: false\n" + "learning_rate: 1e-3\n", encoding="utf-8")
    train.run([*flags, "--no-group_by_size"])
    train.run(["--config", str(recipe), "--dump_path", str(tmp_path / "file"), "--learning_rate", "2e-3"])
    assert_same_weights(weights(tmp_path / "flags"), weights(tmp_path / "file"), atol=0)
    by_flags = json.loads((tmp_path / "flags" / "parameters.json").read_text())
    by_file = json.loads((tmp_path / "file" / "parameters.json").read_text())
    assert by_file.pop("config") == str(recipe) and by_flags.pop("config") is None
    assert by_file.pop("dump_path") != by_flags.pop("dump_path")
    assert by_file == by_flags and by_file["n_gpu"] == 0 and by_file["learning_rate"] == 2e-3


def test_a_recipe_file_that_contradicts_a_flag_is_one_line_and_exit_2(tiny_setup, tmp_path):
    """The command's own exit (the messages of each refusal: test_config.py)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("precision: fp32\n")
    message = "--bf16 contradicts --precision fp32 (precision from"
    result = run_train([*train_args(tiny_setup, tmp_path / "run"), "--config", str(recipe), "--bf16"])
    assert result.returncode == EXIT_USAGE and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and str(recipe) in last
    assert not (tmp_path / "run").exists()
