"""checkpoint.py: a write cut short keeps the previous checkpoint the newest complete one; listing, pruning."""

import pytest
import torch

import checkpoint

CPU = torch.device("cpu")


class Crash(Exception):
    """Stands in for the process dying with the checkpoint half written (utils.inject_fault SIGKILLs)."""


def crash_mid_write(point, step):
    if point == "checkpoint_write":
        raise Crash(step)


def save(dump, step, keep=3, fault=None):
    """A single-process checkpoint of `step` whose contents say which step wrote them."""
    training_state = {"student": {"w": torch.full((3,), float(step))}, "loop_state": {"n_steps": step}}
    rank_state = {"rng": checkpoint.rng_state(), "log_tokens": step}
    return checkpoint.save(dump, step, training_state, rank_state, 0, keep, fault=fault)


def names(dump):
    return [p.name for p in checkpoint.list_checkpoints(dump)]


def test_a_write_cut_short_leaves_the_previous_checkpoint_the_newest(tmp_path):
    save(tmp_path, 3)
    with pytest.raises(Crash):
        save(tmp_path, 6, fault=crash_mid_write)
    assert names(tmp_path) == ["checkpoint_step00000003"]
    assert (tmp_path / "checkpoint_step00000006.tmp" / "rank0.pt").is_file()  # the half-written one, unlisted
    path, training_state, rank_state = checkpoint.load_latest(tmp_path, 0, CPU)
    assert path == tmp_path / "checkpoint_step00000003"
    assert training_state["loop_state"]["n_steps"] == 3 and rank_state["log_tokens"] == 3
    assert torch.equal(training_state["student"]["w"], torch.full((3,), 3.0))

    save(tmp_path, 6)  # the step written again (after a resume) replaces the stale .tmp folder
    assert names(tmp_path) == ["checkpoint_step00000006", "checkpoint_step00000003"]
    assert not (tmp_path / "checkpoint_step00000006.tmp").exists()
    assert checkpoint.load_latest(tmp_path, 0, CPU)[1]["loop_state"]["n_steps"] == 6


def test_list_checkpoints_is_newest_first_and_ignores_other_names(tmp_path):
    for name in ("checkpoint_step00000010", "checkpoint_step00000002", "checkpoint_step00000100",
                 "checkpoint_step00000200.tmp", "checkpoint_step5", "checkpoint_step00000300_old", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_step00000400").write_text("a file, not a folder")
    assert names(tmp_path) == ["checkpoint_step00000100", "checkpoint_step00000010", "checkpoint_step00000002"]
    assert names(tmp_path / "missing") == []
    assert checkpoint.load_latest(tmp_path / "missing", 0, CPU) is None


def test_save_keeps_the_newest_checkpoints_and_nothing_else_goes(tmp_path):
    (tmp_path / "notes").mkdir()
    for step in (9, 10, 11, 12):
        save(tmp_path, step, keep=2)
    assert names(tmp_path) == ["checkpoint_step00000012", "checkpoint_step00000011"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step00000011", "checkpoint_step00000012", "notes"]
