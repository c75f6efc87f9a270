"""distil_ja.outputs: the deletion rule's parts, alone (the commands are tested in tests/test_deletion_rule.py)."""

import pytest

from distil_ja import outputs
from distil_ja.cli import UsageError
from helpers import REPO


def test_the_checkout_home_root_and_current_folder_are_protected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    protected = outputs.protected_folders()
    assert {REPO, tmp_path.resolve(), (tmp_path / "h").resolve()} <= set(protected)
    assert protected[outputs.REPO] == "this toolkit's repository" and outputs.REPO == REPO
    for folder in (REPO, REPO.parent, tmp_path, tmp_path.parent):
        with pytest.raises(UsageError, match="no command deletes it"):
            outputs.check_protected(folder)
    outputs.check_protected(REPO / "checkpoints")  # inside the checkout: an output may live there
    outputs.check_protected(tmp_path / "out")


def test_claim_marks_only_a_new_or_empty_folder_unless_it_adopts(tmp_path):
    assert outputs.is_marked(outputs.claim(tmp_path / "new", "test"))
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    outputs.claim(users, "test")
    assert not outputs.is_marked(users)  # adding files to a user's folder never makes it deletable
    outputs.claim(users, "test", adopt=True)
    assert outputs.is_marked(users)


def test_will_replace_and_empty(tmp_path):
    out = outputs.claim(tmp_path / "out", "test")
    assert outputs.will_replace(out, False, "--force") is False  # only the marker: empty
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("x")
    (out / "link").symlink_to(tmp_path)  # a link inside is removed, never followed
    with pytest.raises(UsageError, match="pass --force to replace it"):
        outputs.will_replace(out, False, "--force")
    assert outputs.will_replace(out, True, "--force") is True
    outputs.empty(out)
    assert [p.name for p in out.iterdir()] == [outputs.MARKER] and tmp_path.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        outputs.will_replace(tmp_path / "file", True, "--force")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="symbolic link to nothing"):
        outputs.will_replace(tmp_path / "dangling", True, "--force")


def test_empty_refuses_an_unmarked_folder_even_when_called_without_the_check(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError):
        outputs.empty(tmp_path)
    assert (tmp_path / "f").read_text() == "x"
