"""One run per dump path, and nothing lost when a run dies or its disk fills up.

- a dump path held by a live run (here: another process holding its lock) is refused in one line,
  --force included, and nothing in it is touched;
- a full disk ends the run with one line naming what could not be written and the room it needs,
  exit 1; the newest complete checkpoint and metrics.jsonl survive, and the next start removes what
  the dead run left half-written;
- --resume on a run that died before its first checkpoint restarts without duplicated log lines;
- the last steps are logged even when the run does not end on a log interval.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import checkpoint
import distiller
import train
from distil_ja.cli import EXIT_DATA, EXIT_USAGE
from helpers import REPO, TRAIN_PY, train_args

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}


def metric_steps(dump):
    return [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()]


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


class Crash(Exception):
    """A process dying at a chosen point, without killing the test process."""


def crash_at(monkeypatch, step):
    def fault(point, n):
        if point == "after_step" and n == step:
            raise Crash(f"crash after step {n}")

    monkeypatch.setattr(distiller, "inject_fault", fault)


# ---- the lock ------------------------------------------------------------------------------------


@pytest.fixture
def holder(tiny_setup, tmp_path):
    """A finished run whose dump path another process holds, as a live run does (rank 0's lock)."""
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--max_steps", "2"))
    (dump / "precious.txt").write_text("keep me")
    code = ("import sys, time; from utils import DumpPathLock; lock = DumpPathLock(sys.argv[1], 0); lock.acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(dump)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield dump, proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_a_dump_path_in_use_is_refused_and_untouched(tiny_setup, holder, capsys, flag):
    dump, proc = holder
    capsys.readouterr()
    before = sorted(p.name for p in dump.iterdir())
    assert train.main(train_args(tiny_setup, dump, flag, "--max_steps", "2")) == EXIT_USAGE
    line, = error_lines(capsys)
    assert f"is in use by pid {proc.pid} on host" in line and str(dump) in line
    assert sorted(p.name for p in dump.iterdir()) == before and (dump / "precious.txt").read_text() == "keep me"


def test_the_lock_goes_with_its_process(tiny_setup, holder, capsys):
    dump, proc = holder
    proc.kill()  # like kill -9: the kernel drops the lock, no stale lock file blocks the next run
    proc.wait()
    assert train.main(train_args(tiny_setup, dump, "--force", "--max_steps", "2")) == 0
    assert (dump / "model.safetensors").is_file() and not (dump / "precious.txt").exists()


# ---- a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_setup, tmp_path, monkeypatch, capsys):
    dump = tmp_path / "run"
    real_save = checkpoint._fsynced_save

    def disk_full_at_step_4(obj, path):
        if "checkpoint_step00000004" in str(path) and path.name == checkpoint.STATE_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "_fsynced_save", disk_full_at_step_4)
    args = train_args(tiny_setup, dump, "--checkpoint_interval", "2", "--log_interval", "1")
    assert train.main(args) == EXIT_DATA
    line, = error_lines(capsys)
    assert "cannot write checkpoint" in line and "checkpoint_step00000004" in line and "KiB, " in line
    assert [p.name for p in checkpoint.list_checkpoints(dump)] == ["checkpoint_step00000002"]
    assert not list(dump.glob("*.tmp")) and metric_steps(dump) == [1, 2, 3, 4]

    monkeypatch.setattr(checkpoint, "_fsynced_save", real_save)  # room again
    leftover = dump / "checkpoint_step00000009.tmp"  # what a SIGKILL mid-write leaves
    leftover.mkdir()
    (dump / "token_cache" / "tokens.npy.tmp").write_bytes(b"half")
    assert train.main(args + ["--resume"]) == 0
    assert not leftover.exists() and not list(dump.rglob("*.tmp"))
    assert metric_steps(dump) == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_anywhere_else_is_one_line_exit_1(tiny_setup, tmp_path, monkeypatch, capsys):
    """metrics.jsonl, eval results, the final model: every write goes through the same exit table."""
    import training_log

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(training_log, "open", full, raising=False)
    assert train.main(train_args(tiny_setup, tmp_path / "run")) == EXIT_DATA
    line, = error_lines(capsys)
    assert line.startswith("error: no space left to write") and "metrics.jsonl" in line and "iB free there" in line


@pytest.mark.slow
def test_a_real_full_disk(tiny_setup, tmp_path):
    """A 3 MB tmpfs as the dump path (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        dump = mount / "run"
        filler = mount / "filler"
        # leave ~1 MiB: room for the start (tokenizer, token cache, first checkpoint), not for the run
        filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - 1_200_000))
        args = train_args(tiny_setup, dump, "--max_steps", "40", "--checkpoint_interval", "2", "--log_interval", "1",
                          "--keep_checkpoints", "100")
        result = subprocess.run([sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True, env=ENV,
                                timeout=300)
        assert result.returncode == EXIT_DATA, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "iB" in errors[0] and str(dump) in errors[0]
        complete = checkpoint.list_checkpoints(dump)
        assert complete and not list(dump.glob("checkpoint_step*.tmp"))
        assert metric_steps(dump)[-1] >= int(complete[0].name[-8:])  # nothing logged was lost with the disk
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---- --resume before the first checkpoint, and the last log line ----------------------------------


def test_resume_before_any_checkpoint_restarts_without_duplicate_lines(tiny_setup, tmp_path, monkeypatch, caplog):
    dump = tmp_path / "run"
    args = train_args(tiny_setup, dump, "--checkpoint_interval", "0", "--log_interval", "1")
    crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(args)
    assert metric_steps(dump) == [1, 2, 3] and not checkpoint.list_checkpoints(dump)
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        train.run(args + ["--resume"])
    assert "no checkpoint" in caplog.text and "cleared" in caplog.text
    assert metric_steps(dump) == [1, 2, 3, 4, 5, 6]


def test_the_last_steps_are_logged_off_the_interval(tiny_setup, tmp_path):
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--max_steps", "5", "--log_interval", "2", "--checkpoint_interval", "0"))
    assert metric_steps(dump) == [2, 4, 5]



def test_torch_zip_writer_on_a_full_disk_is_the_disk_full_line(tiny_setup, tmp_path, monkeypatch, capsys):
    """torch.save reports a failed write as RuntimeError ("unexpected pos"): the OSError beneath is what the
    user reads (one line, exit 1), not two tracebacks (issue 22)."""
    import builtins

    real_open = builtins.open

    class FullAfter:  # a file that takes 2 KiB, then the disk is full
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def opener(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullAfter(f) if str(path).endswith("rank0.pt.tmp") and "w" in mode else f

    monkeypatch.setattr(checkpoint.fileio, "open", opener, raising=False)
    assert train.main(train_args(tiny_setup, tmp_path / "run", "--checkpoint_interval", "2")) == EXIT_DATA
    line, = error_lines(capsys)
    assert "cannot write checkpoint" in line and "No space left" in line, line


def test_a_tokenizer_save_on_a_full_disk_is_the_disk_full_line(tiny_setup, tmp_path, monkeypatch, capsys):
    """The Rust tokenizers library raises a plain Exception for a failed write (issue 22): vocab.save_tokenizer."""
    def full(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    assert train.main(train_args(tiny_setup, tmp_path / "run")) == EXIT_DATA
    line, = error_lines(capsys)
    assert line.startswith("error: no space left to write") and "tokenizer.json" in line, line
