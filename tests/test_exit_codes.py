"""Issue 22, item 4: exit codes that follow the table (distil_ja.cli), arguments checked before anything is written."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

import train
from distil_ja import cli
from helpers import REPO, TRAIN_PY, train_args

SAMPLE = str(REPO / "data_prep" / "sample" / "ja_dev.txt")


def last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and not any("Traceback" in line for line in lines), lines
    return lines[-1]


@pytest.mark.parametrize("flags, words", [
    (["--learning_rate", "-1"], "--learning_rate must be > 0"),
    (["--learning_rate", "nan"], "--learning_rate nan: every number must be finite"),
    (["--alpha_ce", "nan"], "--alpha_ce nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--max_steps", "-5"], "--max_steps must be >= 1, got -5"),
    (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_anything_is_written(flags, words, tiny_setup, tmp_path, capsys):
    dump = tmp_path / "run"
    assert train.main(train_args(tiny_setup, dump, *flags)) == cli.EXIT_USAGE
    assert words in last_error(capsys)
    assert not dump.exists()  # so the corrected rerun needs no --force


def test_a_dump_path_that_is_a_file_is_one_line(tiny_setup, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert train.main(train_args(tiny_setup, tmp_path / "file")) == cli.EXIT_USAGE
    assert "--dump_path" in (line := last_error(capsys)) and "is not a folder" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_binarize_on_a_full_disk_is_exit_1(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from data_prep import binarize

    def full(path, sequences):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(binarize.shards, "write_shard", full)
    args = ["--input", SAMPLE, "--tokenizer", str(tiny_tokenizer), "--output_dir", str(tmp_path / "out"), "--quiet",
            "--num_workers", "1", "--allow_bad_text"]
    assert binarize.main(args) == cli.EXIT_DATA
    assert last_error(capsys).startswith("error: no space left to write")


def test_sigterm_is_one_line_and_exit_143(capsys):
    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this frame

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run_command(main) == cli.EXIT_TERMINATED == 143
    assert last_error(capsys) == "error: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


@pytest.mark.slow
def test_sigterm_during_training_says_what_is_kept(tiny_setup, tmp_path):
    dump = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}
    args = train_args(tiny_setup, dump, "--max_steps", "100000", "--checkpoint_interval", "2")
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(dump.glob("checkpoint_step*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: terminated (SIGTERM): ") and "--resume" in line and "Traceback" not in err, err
