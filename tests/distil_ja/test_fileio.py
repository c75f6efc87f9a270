"""distil_ja/fileio.py: atomic writes, read back with plain open/json."""

import json
import os

import pytest

from distil_ja import fileio


def test_atomic_writes_replace_the_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content, longer than the new one")
    fileio.write_bytes(path, b"new")
    assert open(path, "rb").read() == b"new"
    fileio.write_text(path, "テキスト\n")
    assert open(path, encoding="utf-8").read() == "テキスト\n"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_exception_inside_atomic_open_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"):
        with fileio.atomic_open(path, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert open(path, encoding="utf-8").read() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]  # no keep.txt.tmp left behind


def test_write_json_round_trips_non_ascii(tmp_path):
    obj = {"名前": "東京", "emoji": "☃", "nested": [1, 2.5, None, {"ｶﾅ": True}]}
    path = tmp_path / "x.json"
    fileio.write_json(path, obj)
    raw = open(path, "rb").read().decode("utf-8")
    assert json.loads(raw) == obj
    assert "東京" in raw and "\\u" not in raw and raw.endswith("\n")  # readable, not escaped


