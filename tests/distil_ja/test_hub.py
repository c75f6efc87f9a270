"""distil_ja/hub.py: a hub name that cannot be fetched is one line at once, not minutes of retries
followed by a misleading message (or a tokenizer of four tokens)."""

import time

import pytest

from distil_ja import hub
from distil_ja.cli import EXIT_USAGE, UsageError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port on this machine: the connection is refused at once


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub that refuses connections."""
    monkeypatch.setattr(hub, "endpoint", lambda: UNREACHABLE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def test_unreachable_hub_is_one_line_naming_the_way_out(no_hub):
    with pytest.raises(UsageError) as err:
        hub.check_fetchable("someorg/somemodel", "teacher")
    message = str(err.value)
    assert "teacher 'someorg/somemodel'" in message and UNREACHABLE in message and "cannot be reached" in message
    assert "--local-dir DIR" in message and "\n" not in message


def test_offline_without_a_cached_copy(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        hub.check_fetchable("someorg/somemodel", "tokenizer")


def test_local_paths_are_not_hub_names(no_hub, tmp_path):
    hub.check_fetchable(str(tmp_path), "teacher")  # an existing folder: nothing to fetch
    with pytest.raises(UsageError, match="no such file or directory"):
        hub.check_fetchable(str(tmp_path / "missing"), "teacher")
    with pytest.raises(UsageError, match="no such file or directory"):
        hub.check_fetchable("./relative/missing", "teacher")


def test_a_cached_name_needs_no_hub(no_hub, tmp_path):
    """huggingface_hub's cache layout: refs/main names the snapshot that holds the files."""
    repo = tmp_path / "hf_cache" / "models--someorg--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    hub.check_fetchable("someorg/cached", "teacher")
    with pytest.raises(UsageError, match="cannot be reached"):
        hub.check_fetchable("someorg/cached", "tokenizer", "tokenizer_config.json")  # not that file


def test_tokenizer_loading_does_not_fall_back_to_an_empty_tokenizer(no_hub):
    from distil_ja.tokenization import load_tokenizer

    with pytest.raises(UsageError, match="cannot be reached"):
        load_tokenizer("someorg/somemodel")


def test_train_refuses_an_unreachable_teacher_at_once(no_hub, tiny_setup, tmp_path, capsys):
    import train
    from helpers import train_args

    args = train_args(tiny_setup, tmp_path / "run")
    args[args.index("--teacher_name") + 1] = "rinna/japanese-gpt2-medium"
    del args[args.index("--tokenizer_name"):args.index("--tokenizer_name") + 2]  # the teacher's, from the hub
    start = time.monotonic()
    assert train.main(args) == EXIT_USAGE
    assert time.monotonic() - start < 60  # transformers' own retries took minutes
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rinna/japanese-gpt2-medium" in errors[0] and "local" in errors[0], err
    assert not (tmp_path / "run").exists()
