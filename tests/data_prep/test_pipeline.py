"""The whole chain on project-written fixtures: build_corpus -> binarize -> read shards back."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import binarize as binarize_mod
from data_prep import build_corpus
from data_prep.binarize import binarize
from distil_ja.cli import DataError
from distil_ja.outputs import MARKER
from distil_ja.shards import dtype_for_vocab, load_manifest, read_shard
from distil_ja.tokenization import iter_documents
from helpers import REPO as REPO_PATH
from data_prep_fixtures import (plain_text_bytes, tiny_tokenizer_dir, write_cc100_xz, write_cirrus_dump,
                                write_truncated_xz)

REPO = str(REPO_PATH)


def read_all(out_dir):
    manifest = load_manifest(out_dir)
    shards = [read_shard(os.path.join(out_dir, s["file"])) for s in manifest["shards"]]
    return manifest, shards


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    tok = tiny_tokenizer_dir(base)
    raw = base / "raw"
    raw.mkdir()
    write_cirrus_dump(str(raw / "jawiki-cirrussearch-content.json.gz"))
    write_cc100_xz(str(raw / "ja.txt.xz"))
    (raw / "plain.txt").write_bytes(plain_text_bytes())
    corpus = base / "corpus"
    stats = {}
    for source, name, extra in [("jawiki-cirrus", "jawiki-cirrussearch-content.json.gz", []),
                                ("cc100", "ja.txt.xz", ["--lines_per_file", "10"]),
                                ("text", "plain.txt", [])]:
        out = corpus / source
        rc = build_corpus.main(["--source", source, "--input", str(raw / name), "--output_dir", str(out),
                                "--quiet"] + extra)
        assert rc == 0
        stats[source] = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    doc_dirs = [str(corpus / s / "doc_data") for s in ("jawiki-cirrus", "cc100", "text")]
    outs = {}
    for workers in (1, 2):
        out = str(base / f"bin_w{workers}")
        binarize(doc_dirs, tok, out, num_workers=workers, shard_size=300, lines_per_chunk=7, progress=False)
        outs[workers] = out
    return {"base": base, "tok": tok, "raw": raw, "corpus": corpus, "stats": stats, "doc_dirs": doc_dirs,
            "bin": outs}


def test_cirrus_cleaning(env):
    docs = list(iter_documents(str(env["corpus"] / "jawiki-cirrus" / "doc_data")))
    st = env["stats"]["jawiki-cirrus"]
    assert len(docs) == 6  # 6 articles; the template-only one dropped, namespace 1 skipped
    assert st["docs_dropped_empty"] == 1 and st["docs_skipped_namespace"] == 1 and st["json_lines_skipped"] == 1
    assert st["sentences_dropped_math"] == 6
    text = "\n".join("\n".join(d) for d in docs)
    for bad in ("[1]", "[要出典]", "[注 2]", "{{", "}}", "displaystyle", "脚注", "外部リンク", "について説明しています",
                "\t", "\x07", "Ａ"):
        assert bad not in text, bad
    assert "「行くよ。」と彼は言った。" in docs[0]
    assert "ABC社のWikiで知られる。" in docs[0]
    assert all(1 <= len(line) <= 1024 for d in docs for line in d)


def test_cc100_xz_bad_bytes_and_empty_docs(env):
    st = env["stats"]["cc100"]
    assert st["lines_with_bad_bytes"] == 1 and st["docs_dropped_empty"] == 5
    assert st["train_documents"] == 30 and st["damaged_inputs"] == []
    files = sorted(set(os.listdir(env["corpus"] / "cc100" / "doc_data")) - {MARKER})  # the deletion rule's marker
    assert len(files) == st["train_files"] > 1
    for name in files:  # each file ends with a complete document
        assert (env["corpus"] / "cc100" / "doc_data" / name).read_text(encoding="utf-8").endswith("。\n\n")
    docs = list(iter_documents(str(env["corpus"] / "cc100" / "doc_data")))
    assert len(docs) == 30 and any("\ufffd" in line for d in docs for line in d)


def test_shards_structure_and_manifest(env):
    manifest, shards = read_all(env["bin"][1])
    assert manifest["unit"] == "doc" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert manifest["tokenizer"]["lowercase"] is True
    assert len(shards) == len(manifest["shards"]) > 3
    for info, seqs in zip(manifest["shards"], shards):
        assert isinstance(seqs, list)
        for s in seqs:
            assert isinstance(s, np.ndarray) and s.ndim == 1 and s.dtype == np.uint16
            assert s[0] == 1 and s[-1] == 2 and not (s[1:-1] == 2).any() and not (s[1:] == 1).any()
        assert info["sequences"] == info["documents"] == len(seqs)
        assert info["tokens"] == sum(len(s) for s in seqs)
        assert info["unk_tokens"] == sum(int((s == 0).sum()) for s in seqs)
        data = open(os.path.join(env["bin"][1], info["file"]), "rb").read()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    n_docs = sum(len(list(iter_documents(d))) for d in env["doc_dirs"])
    totals = manifest["totals"]
    assert totals["documents"] == totals["sequences"] == n_docs == sum(len(s) for s in shards)
    assert totals["tokens"] == sum(len(s) for seqs in shards for s in seqs)
    assert totals["unk_tokens"] > 0  # the replacement characters from undecodable bytes
    assert max(len(s) for seqs in shards for s in seqs) > 1024  # the long document is kept whole


def test_same_output_with_1_and_2_workers(env):
    m1, m2 = load_manifest(env["bin"][1]), load_manifest(env["bin"][2])
    assert m1 == m2
    for info in m1["shards"]:
        a = open(os.path.join(env["bin"][1], info["file"]), "rb").read()
        b = open(os.path.join(env["bin"][2], info["file"]), "rb").read()
        assert a == b


def test_uppercase_and_fullwidth_binarize_like_lowercase(env, tmp_path):
    out = str(tmp_path / "bin")
    binarize([str(env["corpus"] / "text" / "doc_data")], env["tok"], out, num_workers=1, progress=False)
    _, (seqs,) = read_all(out)
    # document 0: "ABCの研究…\nＡＢＣとＷｉｋｉは…"; document 1: the same in lowercase ASCII
    assert np.array_equal(seqs[0], seqs[1]) and 0 not in seqs[0]


def test_line_unit(env, tmp_path):
    text_dir = str(env["corpus"] / "text" / "doc_data")
    out = str(tmp_path / "line")
    manifest = binarize([text_dir], env["tok"], out, unit="line", num_workers=2, progress=False)
    _, shards = read_all(out)
    seqs = [s for shard in shards for s in shard]
    n_lines = sum(len(d) for d in iter_documents(text_dir))
    assert len(seqs) == n_lines == manifest["totals"]["sequences"]
    assert manifest["totals"]["documents"] == len(list(iter_documents(text_dir)))
    assert all(s[0] == 1 and s[-1] == 2 and not (s[1:-1] == 2).any() for s in seqs)


def test_output_dir_refused_without_overwrite(env, tmp_path, capsys):
    out = str(tmp_path / "existing")
    shutil.copytree(env["bin"][1], out)  # a complete earlier output; the shared one stays intact
    args = ["--input", env["doc_dirs"][2], "--tokenizer", env["tok"], "--output_dir", out, "--quiet"]
    assert binarize_mod.main(args) == 2  # an output folder in the way is a usage error
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and "\n" not in err
    assert binarize_mod.main(args + ["--overwrite"]) == 0
    assert load_manifest(out)["inputs"] == [os.path.join(env["doc_dirs"][2], "0.txt")]
    assert sorted(os.listdir(out)) == [MARKER, "00000.pickle", "manifest.json"]  # the marker: binarize wrote it


def test_partial_output_has_no_manifest(env, tmp_path, monkeypatch):
    real_flush = binarize_mod.ShardWriter.flush

    def failing_flush(self):
        if self.shards:
            raise RuntimeError("disk full")
        real_flush(self)

    monkeypatch.setattr(binarize_mod.ShardWriter, "flush", failing_flush)
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        binarize(env["doc_dirs"], env["tok"], str(out), num_workers=1, shard_size=300, progress=False)
    assert (out / "00000.pickle").exists() and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        load_manifest(str(out))


def test_truncated_archive_keeps_what_was_read(env, tmp_path, capsys):
    bad = write_truncated_xz(str(tmp_path / "ja.txt.xz"))
    out = tmp_path / "trunc"
    rc = build_corpus.main(["--source", "cc100", "--input", bad, "--output_dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: truncated or corrupt input" in err and "ja.txt.xz" in err
    docs = list(iter_documents(str(out / "doc_data")))
    assert 5 <= len(docs) < 150  # what was read before the damage
    assert json.loads((out / "stats.json").read_text())["damaged_inputs"]


def test_dev_split_is_seeded_and_disjoint(env, tmp_path):
    src = str(env["raw"] / "ja.txt.xz")
    runs = []
    for k in range(2):
        out = tmp_path / f"dev{k}"
        build_corpus.build_corpus("cc100", [src], str(out), dev_docs=4, seed=3, progress=False)
        runs.append((list(iter_documents(str(out / "doc_data"))), list(iter_documents(str(out / "dev_data")))))
    assert runs[0] == runs[1]
    train, dev = runs[0]
    assert len(dev) == 4 and len(train) == 26
    everything = list(iter_documents(str(env["corpus"] / "cc100" / "doc_data")))
    assert sorted(map(tuple, train + dev)) == sorted(map(tuple, everything))


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_build_corpus_errors(tmp_path, capsys):
    assert build_corpus.main(["--source", "text", "--input", str(tmp_path / "nope.txt"),
                              "--output_dir", str(tmp_path / "o")]) == 1  # missing input: bad data
    assert "nope.txt" in one_error_line(capsys)
    f = tmp_path / "a.txt"
    f.write_text("一つ目。\n二つ目。\n", encoding="utf-8")
    assert build_corpus.main(["--source", "text", "--input", str(f), "--output_dir", str(tmp_path / "o"),
                              "--doc_per_line", "--quiet"]) == 0
    assert list(iter_documents(str(tmp_path / "o" / "doc_data"))) == [["一つ目。"], ["二つ目。"]]
    assert build_corpus.main(["--source", "text", "--input", str(f), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert build_corpus.main(["--source", "text", "--input", str(f), "--output_dir", str(tmp_path / "p"),
                              "--lines_per_file", "0"]) == 2
    assert "--lines_per_file" in one_error_line(capsys)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    assert build_corpus.main(["--source", "text", "--input", str(blank), "--output_dir", str(tmp_path / "q"),
                              "--quiet"]) == 1
    assert "no documents" in one_error_line(capsys)
    assert json.loads((tmp_path / "q" / "stats.json").read_text())["train_documents"] == 0


@pytest.mark.parametrize("where", ["repo_root", "elsewhere_spawn"])
def test_entry_scripts_run_from_any_folder(env, tmp_path, where):
    script, cwd, env_vars = "data_prep/binarize.py", REPO, dict(os.environ)
    if where == "elsewhere_spawn":  # the workers import the script as __mp_main__: no path block there
        script, cwd = os.path.join(REPO, script), str(tmp_path)
        env_vars["BINARIZE_MP_START"] = "spawn"
    env_vars.pop("PYTHONPATH", None)
    out = str(tmp_path / "cli")
    cmd = [sys.executable, script, "--input", env["doc_dirs"][2], "--tokenizer", env["tok"],
           "--output_dir", out, "--num_workers", "2", "--quiet"]
    proc = subprocess.run(cmd, cwd=cwd, env=env_vars, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr
    assert load_manifest(out)["totals"]["documents"] == 5
    bad = subprocess.run([sys.executable, script, "--input", str(tmp_path / "missing"),
                          "--tokenizer", env["tok"], "--output_dir", str(tmp_path / "x")],
                         cwd=cwd, env=env_vars, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_interrupt_says_the_output_is_incomplete(env, tmp_path, monkeypatch, capsys):
    def interrupted_flush(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(binarize_mod.ShardWriter, "flush", interrupted_flush)
    out = tmp_path / "cut"
    rc = binarize_mod.main(["--input", env["doc_dirs"][2], "--tokenizer", env["tok"], "--output_dir", str(out),
                            "--num_workers", "1", "--quiet"])
    err = one_error_line(capsys)
    assert rc == 130 and "interrupted" in err and "incomplete" in err and "manifest.json" in err
    assert not (out / "manifest.json").exists()


def test_spawn_start_method_gives_same_output(env, tmp_path, monkeypatch):
    monkeypatch.setenv("BINARIZE_MP_START", "spawn")
    out = str(tmp_path / "spawn")
    binarize(env["doc_dirs"], env["tok"], out, num_workers=2, shard_size=300, lines_per_chunk=7, progress=False)
    assert load_manifest(out) == load_manifest(env["bin"][1])


BINARIZE_ERRORS = {  # case: (exit status, a word the one-line message must hold)
    "missing_tokenizer": (2, "no_tok"),
    "corrupt_tokenizer": (2, "bad_tok"),
    "bad_shard_size": (2, "--shard_size"),
    "bad_unit": (2, "--unit"),  # argparse's own refusals are one line and 2 as well
    "missing_input": (1, "gone.txt"),
    "no_documents": (1, "no documents"),
    "truncated_input": (1, "cut.txt.xz"),
}


@pytest.mark.parametrize("case", sorted(BINARIZE_ERRORS))
def test_binarize_cli_errors_are_one_line(env, tmp_path, capsys, case):
    import lzma

    tok, inp, extra = env["tok"], env["doc_dirs"][2], []
    if case == "missing_tokenizer":
        tok = str(tmp_path / "no_tok")
    elif case == "corrupt_tokenizer":
        tok = str(tmp_path / "bad_tok")
        os.makedirs(tok)
        open(os.path.join(tok, "spiece.model"), "wb").write(b"not a sentencepiece model")
    elif case == "bad_shard_size":
        extra = ["--shard_size", "0"]
    elif case == "bad_unit":
        extra = ["--unit", "para"]
    elif case == "missing_input":
        inp = str(tmp_path / "gone.txt")
    elif case == "no_documents":
        inp = str(tmp_path / "blank.txt")
        open(inp, "w").write("\n \n\n")
    else:
        inp = str(tmp_path / "cut.txt.xz")
        data = lzma.compress(open(os.path.join(env["doc_dirs"][1], "0.txt"), "rb").read())
        open(inp, "wb").write(data[: len(data) // 2])
    out = tmp_path / "out"
    rc = binarize_mod.main(["--input", inp, "--tokenizer", tok, "--output_dir", str(out), "--quiet", *extra])
    err = one_error_line(capsys)
    status, word = BINARIZE_ERRORS[case]
    assert rc == status and word in err, err
    assert not (out / "manifest.json").exists()


def test_plain_text_counts_and_int32_for_big_vocabularies(env):
    st = env["stats"]["text"]
    assert st["lines_with_bad_bytes"] == 1 and st["docs_dropped_empty"] == 1 and st["train_documents"] == 5
    docs = list(iter_documents(env["doc_dirs"][2]))
    assert docs[0][1] == "ABCとWikiは学校に行きました。"  # NFKC: full-width to ASCII, case kept in text
    assert "\ufffd" in docs[2][0]
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65536) == np.int32


def test_truncated_cirrus_gz(tmp_path, capsys):
    import gzip

    good = write_cirrus_dump(str(tmp_path / "full.json.gz"), bad_json=False)
    raw = gzip.decompress(open(good, "rb").read())
    data = gzip.compress(raw)
    bad = tmp_path / "jawiki-cut.json.gz"
    bad.write_bytes(data[: int(len(data) * 0.8)])
    rc = build_corpus.main(["--source", "jawiki-cirrus", "--input", str(bad), "--output_dir",
                            str(tmp_path / "o"), "--quiet"])
    assert rc == 1 and "jawiki-cut.json.gz" in capsys.readouterr().err
    assert 1 <= len(list(iter_documents(str(tmp_path / "o" / "doc_data")))) < 6
