"""binarize.py refuses bad text instead of writing shards full of <unk>: a file that is not UTF-8
(cp932 / Shift-JIS), or text the tokenizer does not cover; --allow_bad_text takes it anyway, and the
counts are in manifest.json either way."""
import json
import lzma
import os

import pytest

from data_prep import binarize as binarize_mod
from distil_ja.tokenization import iter_documents
from data_prep_fixtures import tiny_tokenizer_dir, training_text

HANGUL = "한국어로 쓴 문장입니다. 학교에 갔습니다."  # the tiny tokenizer has no Hangul: half <unk>


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("bad_text_tok"))


@pytest.fixture(scope="module")
def cp932_file(tmp_path_factory):
    """The tokenizer's own training text, saved as cp932 (Shift-JIS): every Japanese line is bad UTF-8."""
    path = tmp_path_factory.mktemp("cp932") / "sjis.txt"
    path.write_bytes(training_text().encode("cp932"))
    return path


def run(args, capsys):
    """binarize.py's main: (exit status, stderr)."""
    rc = binarize_mod.main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err.strip()


def assert_one_error_line(err):
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err


def assert_no_manifest_nor_tmp(out):
    names = os.listdir(out) if os.path.isdir(out) else []
    assert "manifest.json" not in names and not [n for n in names if n.endswith(".tmp")], names


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("workers", [1, 2])
def test_cp932_file_is_refused_in_one_line(tok, cp932_file, tmp_path, capsys, workers):
    out = tmp_path / "out"
    rc, err = run(["--input", cp932_file, "--tokenizer", tok, "--output_dir", out, "--num_workers", workers],
                  capsys)
    assert rc == 1
    assert_one_error_line(err)
    n_lines = len(training_text().splitlines())
    n_bad = sum(1 for line in training_text().splitlines() if line)  # every text line holds Japanese
    assert str(cp932_file) in err and f"{n_bad:,} of {n_lines:,} lines" in err, err
    assert "not valid UTF-8" in err and "iconv -f cp932 -t utf-8" in err and "--allow_bad_text" in err
    assert_no_manifest_nor_tmp(out)


def test_allow_bad_text_takes_it_and_the_manifest_records_the_counts(tok, cp932_file, tmp_path, capsys, caplog):
    lines = training_text().splitlines()
    manifests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        rc, err = run(["--input", cp932_file, "--tokenizer", tok, "--output_dir", out, "--num_workers", workers,
                       "--allow_bad_text"], capsys)
        assert rc == 0, err
        manifests.append(manifest_of(out))
    manifest = manifests[0]
    assert manifests[1] == manifest  # counted by the parent: the same whatever --num_workers
    (counts,) = manifest["input_counts"]
    assert counts["file"] == str(cp932_file)
    assert counts["lines"] == len(lines) and counts["undecodable_lines"] == sum(1 for line in lines if line)
    assert counts["tokens"] == manifest["totals"]["tokens"]
    assert counts["unk_tokens"] == manifest["totals"]["unk_tokens"]
    assert counts["documents"] == manifest["totals"]["documents"] == 120
    assert manifest["totals"]["undecodable_lines"] == counts["undecodable_lines"]
    assert manifest["totals"]["lines"] == len(lines)
    assert manifest["bad_text"]["allowed"] is True
    # backwards compatible: the keys readers knew are all still there, unchanged in kind
    assert manifest["inputs"] == [str(cp932_file)]
    assert {"shards", "documents", "sequences", "tokens", "unk_tokens"} <= set(manifest["totals"])
    assert manifest["totals"]["unk_tokens"] > 0.05 * manifest["totals"]["tokens"]  # over both limits, taken anyway
    assert any("not valid UTF-8" in r.getMessage() and str(cp932_file) in r.getMessage() for r in caplog.records)


def test_one_bad_line_in_a_thousand_passes_and_is_counted(tok, tmp_path, capsys):
    lines = [line.encode("utf-8") for line in training_text(n_docs=200).splitlines()[:1000]]
    lines[500] = "壊れた".encode("utf-8") + b"\xff\xfe" + "行。".encode("utf-8")
    text = tmp_path / "one_bad.txt"
    text.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc, err = run(["--input", text, "--tokenizer", tok, "--output_dir", out, "--num_workers", 2], capsys)
    assert rc == 0, err
    (counts,) = manifest_of(out)["input_counts"]
    assert (counts["lines"], counts["undecodable_lines"]) == (1000, 1)
    assert manifest_of(out)["bad_text"]["allowed"] is False


def test_the_undecodable_limit_is_per_file_not_over_all_lines_so_far(tok, tmp_path, capsys):
    """2 bad lines of 40 (5%) after a good file of hundreds: under 1% of all the lines read, over it in their
    own file, which is refused."""
    good = tmp_path / "good.txt"
    good.write_text(training_text(), encoding="utf-8")
    n_good = len(training_text().splitlines())
    lines = [line.encode("utf-8") for line in training_text(n_docs=10, seed=3).splitlines()[:40]]
    lines[5] = lines[20] = "あい".encode("cp932")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    assert 2 < 0.01 * (n_good + 40)  # within the limit if the lines so far counted
    out = tmp_path / "out"
    rc, err = run(["--input", good, bad, "--tokenizer", tok, "--output_dir", out, "--num_workers", 1], capsys)
    assert rc == 1
    assert_one_error_line(err)
    assert f"{bad}: 2 of 40 lines (5.00%) are not valid UTF-8" in err and "good.txt" not in err, err
    assert_no_manifest_nor_tmp(out)


def test_overall_unk_rate_over_5_percent_is_refused(tok, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(training_text(), encoding="utf-8")  # the tokenizer's own text: no <unk>
    hangul = tmp_path / "hangul.txt"
    hangul.write_text("\n\n".join([HANGUL] * 200) + "\n", encoding="utf-8")  # valid UTF-8, ~1,000 <unk>
    out = tmp_path / "out"
    args = ["--input", good, hangul, "--tokenizer", tok, "--output_dir", out, "--num_workers", 2]
    rc, err = run(args, capsys)
    assert rc == 1
    assert_one_error_line(err)
    assert "<unk>" in err and "limit 5%" in err and str(hangul) in err and "--allow_bad_text" in err, err
    assert str(good) not in err  # it names the file with the <unk>s, not every input
    assert_no_manifest_nor_tmp(out)
    rc, err = run(args + ["--overwrite", "--allow_bad_text"], capsys)
    assert rc == 0, err
    by_file = {c["file"]: c for c in manifest_of(out)["input_counts"]}
    assert by_file[str(good)]["unk_tokens"] == 0 and by_file[str(hangul)]["unk_tokens"] >= 1000
    assert by_file[str(hangul)]["undecodable_lines"] == 0  # valid UTF-8: only the <unk> rate catches it


def test_bad_file_is_refused_before_the_next_file_is_read(tok, cp932_file, tmp_path, capsys):
    """A large corpus with one bad file fails as soon as that file is read, not at the end."""
    later = tmp_path / "later.txt.xz"  # damaged: reading it would be an error of its own
    data = lzma.compress(training_text().encode("utf-8"))
    later.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc, err = run(["--input", cp932_file, later, "--tokenizer", tok, "--output_dir", out, "--num_workers", 2],
                  capsys)
    assert rc == 1 and str(cp932_file) in err and "later.txt.xz" not in err, err
    assert_no_manifest_nor_tmp(out)


def test_iter_documents_reports_undecodable_lines_per_file(tmp_path):
    cp932_line = "あい\n".encode("cp932")  # b"\x82\xa0\x82\xa2\n": 4 bytes that are not UTF-8
    (tmp_path / "0.txt").write_bytes("良い行。\n\n".encode("utf-8") + cp932_line + "次。\n".encode("utf-8"))
    (tmp_path / "1.txt").write_bytes("置換済み\ufffd文字。\n".encode("utf-8"))  # already U+FFFD: valid UTF-8
    seen = []
    docs = list(iter_documents(str(tmp_path), on_file=lambda *a: seen.append(a)))
    assert seen == [(str(tmp_path / "0.txt"), 4, 1), (str(tmp_path / "1.txt"), 1, 0)]
    assert docs == [["良い行。"], ["\ufffd\ufffd\ufffd\ufffd", "次。"], ["置換済み\ufffd文字。"]]
