"""build_corpus --num_workers: the same bytes whatever N, parallel .xz blocks, and what a
damaged archive, a dead worker or Ctrl-C leave behind.

The reference for "the same bytes" is one pass: each input in a single chunk (--chunk_kb larger
than the file) cleaned by one worker, which is the single-process code's order of work.  The
parallel runs use 1 KiB chunks, so a fixture is cut in tens of places.
"""
import filecmp
import json
import lzma
import os
import shutil
import signal
import subprocess

import pytest

from data_prep import build_corpus, xz_blocks
from distil_ja.outputs import MARKER
from data_prep_fixtures import cc100_bytes, plain_text_bytes, write_cirrus_dump, cirrus_articles

ONE_PASS_KB = 1 << 20


def same_tree(a, b):
    """Every file of two output folders byte for byte (names included)."""
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), (
        cmp.left_only, cmp.right_only, cmp.diff_files)
    for sub in cmp.common_dirs:
        same_tree(os.path.join(a, sub), os.path.join(b, sub))
    for name in cmp.common_files:  # dircmp's shallow compare trusts size+mtime: read them
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def build(inputs, out, source, workers, chunk_kb, extra=()):
    args = ["--source", source, "--input", *inputs, "--output_dir", str(out), "--quiet",
            "--num_workers", str(workers), "--chunk_kb", str(chunk_kb), "--dev_docs", "4",
            "--lines_per_file", "25", *extra]
    return build_corpus.main(args)


def concatenated_xz(path, data, parts):
    """A multi-block .xz made here: `parts` single-block streams back to back (as `cat a.xz b.xz`)."""
    step = len(data) // parts
    pieces = [data[i * step:(i + 1) * step if i < parts - 1 else len(data)] for i in range(parts)]
    with open(path, "wb") as f:
        f.write(b"".join(lzma.compress(p) for p in pieces))
    return str(path)


def xz_cli_blocks(path, data, block_size="2KiB"):
    """A multi-block .xz as `xz -T0` writes it (one stream, many blocks), or None without the xz tool."""
    if shutil.which("xz") is None:
        return None
    raw = str(path)[:-3]
    with open(raw, "wb") as f:
        f.write(data)
    subprocess.run(["xz", "-T2", f"--block-size={block_size}", "-f", raw], check=True, timeout=60)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("parallel_inputs")
    cc = cc100_bytes(n_docs=300)  # ~65 KB: about 60 chunks of 1 KiB
    with lzma.open(base / "cc100.txt.xz", "wb") as f:
        f.write(cc)
    articles = cirrus_articles(n=30)
    found = {
        "cirrus": ("jawiki-cirrus", [write_cirrus_dump(str(base / "jawiki.json.gz"), articles)], ()),
        "cc100": ("cc100", [str(base / "cc100.txt.xz")], ()),
        "cc100_streams": ("cc100", [concatenated_xz(base / "streams.txt.xz", cc, 7)], ()),
        "text": ("text", [str(base / "plain.txt")], ()),
        "text_per_line": ("text", [str(base / "plain.txt")], ("--doc_per_line", "--split_sentences")),
        "several_files": ("cc100", [str(base / "cc100.txt.xz"), str(base / "plain.txt")], ()),
    }
    (base / "plain.txt").write_bytes(plain_text_bytes() + cc100_bytes(seed=5, n_docs=60))
    cli = xz_cli_blocks(base / "blocks.txt.xz", cc)
    if cli:
        found["cc100_xz_blocks"] = ("cc100", [cli], ())
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cirrus", "cc100", "cc100_streams", "cc100_xz_blocks", "text", "text_per_line",
                                  "several_files"])
def test_output_is_byte_identical_for_1_2_3_workers(inputs, tmp_path, case):
    if case not in inputs:
        pytest.skip("no xz command to write a multi-block file")
    source, files, extra = inputs[case]
    # a multi-block file's reference is its text in one block (a block is one task whatever --chunk_kb)
    reference = inputs["cc100"][1] if "cc100_" in case else files
    assert build(reference, tmp_path / "one_pass", source, 1, ONE_PASS_KB, extra) == 0
    stats = json.loads((tmp_path / "one_pass" / "stats.json").read_text())
    assert stats["train_files"] >= 2 and stats["dev_documents"] == 4
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        assert build(files, out, source, workers, 1, extra) == 0
        if reference != files:  # stats.json names the input
            stats_path = out / "stats.json"
            stats_path.write_text(stats_path.read_text().replace(files[0], reference[0]))
        same_tree(tmp_path / "one_pass", out)


def test_multi_block_files_are_read_by_block(inputs):
    _, (path,), _ = inputs["cc100_streams"]
    blocks = xz_blocks.blocks(path)
    assert len(blocks) == 7
    with open(path, "rb") as f:
        text = b"".join(xz_blocks.BlockReader(f, b).read_all() for b in blocks)
    assert text == lzma.decompress(open(path, "rb").read())
    assert [b.uncompressed_offset for b in blocks[1:]] == [sum(x.uncompressed_size for x in blocks[:i + 1])
                                                          for i in range(6)]
    _, (single,), _ = inputs["cc100"]
    assert xz_blocks.read_blocks(single) is not None and xz_blocks.blocks(single) is None  # one block
    if "cc100_xz_blocks" in inputs:
        assert len(xz_blocks.blocks(inputs["cc100_xz_blocks"][1][0])) > 10


@pytest.mark.parametrize("damage", ["truncated", "corrupt_block"])
def test_damaged_multi_block_archive(inputs, tmp_path, capsys, damage):
    """Exit 1 naming the file; what was read before the damage kept; the same whatever N."""
    _, (path,), _ = inputs["cc100_streams"]
    data = bytearray(open(path, "rb").read())
    if damage == "truncated":  # no index at the end: read as one stream, which reports the cut
        data = data[: len(data) * 2 // 3]
    else:  # an index, but block 3's data broken
        block = xz_blocks.blocks(path)[3]
        data[block.offset + block.compressed_size // 2] ^= 0xFF
    bad = tmp_path / "ja.txt.xz"
    bad.write_bytes(bytes(data))
    full = len(cc100_bytes(n_docs=300).split(b"\n\n"))
    with open(path, "rb") as f:  # a corrupt block 3: nothing of the blocks after it may be kept
        before_damage = b"".join(xz_blocks.BlockReader(f, b).read_all() for b in xz_blocks.blocks(path)[:4])
    most = before_damage.count(b"\n\n") + 1 if damage == "corrupt_block" else full
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        assert build([str(bad)], out, "cc100", workers, 1) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: truncated or corrupt input") and "ja.txt.xz" in err
        stats = json.loads((out / "stats.json").read_text())
        kept = stats["train_documents"] + stats["dev_documents"]
        assert len(stats["damaged_inputs"]) == 1 and 20 < kept <= most and kept < full
        if workers > 1:
            same_tree(tmp_path / "w1", out)


def no_complete_looking_output(out, lines_per_file=25):
    """No stats.json, no temporary file, and no torn doc_data file: each N.txt left holds at
    least lines_per_file lines (a file is finished at the first document end after that many)."""
    names = [n for _, _, files in os.walk(out) for n in files]
    assert "stats.json" not in names and not [n for n in names if n.endswith(".tmp")], names
    for name in set(os.listdir(out / "doc_data")) - {MARKER}:
        lines = (out / "doc_data" / name).read_text(encoding="utf-8").splitlines()
        assert len([line for line in lines if line]) >= lines_per_file, name


def killing_clean_chunk(real):
    """clean_chunk that kills its own worker process on the chunk holding document 150."""
    def clean(data, options, damaged=None):
        if "食" in data.decode("utf-8", "replace") and os.getpid() != PARENT:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, options, damaged)
    return clean


PARENT = os.getpid()


def test_a_dead_worker_is_one_line_exit_4_and_no_stats(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(build_corpus.MP_START_ENV, "fork")  # the workers inherit the patched function
    monkeypatch.setattr(build_corpus, "clean_chunk", killing_clean_chunk(build_corpus.clean_chunk))
    out = tmp_path / "out"
    _, files, _ = inputs["cc100"]
    assert build(files, out, "cc100", 2, 1) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a worker process died") and "incomplete (no stats.json)" in err
    assert "\n" not in err and "Traceback" not in err
    no_complete_looking_output(out)


def test_interrupt_is_exit_130_and_removes_the_old_stats(inputs, tmp_path, monkeypatch, capsys):
    _, files, _ = inputs["cc100"]
    out = tmp_path / "out"
    assert build(files, out, "cc100", 2, 1) == 0  # a complete earlier output, then an interrupted rerun
    real_write, written = build_corpus.DocDataWriter.write, []

    def interrupted(self, doc, n_lines):
        written.append(1)
        if len(written) == 45:  # in the middle of doc_data/3.txt
            raise KeyboardInterrupt
        real_write(self, doc, n_lines)

    monkeypatch.setattr(build_corpus.DocDataWriter, "write", interrupted)
    assert build(files, out, "cc100", 2, 1, ("--overwrite",)) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"error: interrupted: {out} is incomplete (no stats.json)"
    no_complete_looking_output(out)
    assert os.listdir(out / "doc_data")  # the files finished before the interrupt stay, named N.txt


def test_bad_worker_count_is_a_usage_error(inputs, tmp_path, capsys):
    _, files, _ = inputs["cc100"]
    assert build(files, tmp_path / "o", "cc100", -1, 1) == 2
    assert "--num_workers" in capsys.readouterr().err
    assert build_corpus.default_num_workers() >= 1


@pytest.mark.slow
def test_ctrl_c_to_the_process_group(tmp_path):
    """A real Ctrl-C (SIGINT to the command and its workers, as a terminal sends it): exit 130, one
    line, no stats.json, no torn file, no process left behind."""
    import sys
    import time

    from helpers import REPO

    source = tmp_path / "big.txt"
    source.write_bytes(cc100_bytes(seed=9, n_docs=40_000))  # several seconds of work here
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / "build_corpus.py"), "--source", "cc100",
                             "--input", str(source), "--output_dir", str(out), "--num_workers", "2", "--quiet",
                             "--lines_per_file", "25", "--chunk_kb", "64"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (out / "doc_data" / "3.txt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1].strip().splitlines()
    assert proc.returncode == 130, err
    assert err[-1] == f"error: interrupted: {out} is incomplete (no stats.json)"
    assert not [line for line in err if "Traceback" in line]
    no_complete_looking_output(out)
    with pytest.raises(ProcessLookupError):  # the workers are gone with their session
        os.killpg(proc.pid, 0)
