"""Issue 22: one deletion rule for every --force and --overwrite (distil_ja.outputs), command by command.

Each command is pointed, with its replace flag, at a folder it must never delete: the current
folder, a folder above it, the home folder, a symlink to the home folder, a git repository, and a
folder of the user's that no command wrote. Each must refuse in one line with exit 2 and leave
every file where it was. The protected folders hold the toolkit's marker too, so that the
protection cannot be passed off as the marker check. They live in tmp_path (the current folder
and HOME are moved there): a command that fails this test deletes a folder of the test's.
"""

from pathlib import Path

import pytest

from distil_ja.outputs import MARKER
from helpers import REPO, dump_args, dump_script, load_script, train_args

SAMPLE = str(REPO / "data_prep" / "sample" / "ja_dev.txt")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """tmp/home (HOME, .bashrc), tmp/work/here (the current folder, inside a git repository tmp/work),
    tmp/mine (a user's folder). Returns {case: path as given on the command line}."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    here = work / "here"
    mine = tmp_path / "mine"
    for folder, name in ((home, ".bashrc"), (here, "notes.txt"), (mine, "notes.txt")):
        folder.mkdir(parents=True)
        (folder / name).write_text("keep me")
    (work / ".git").mkdir()
    for folder in (home, work, here):
        (folder / MARKER).write_text("")  # marked, and still refused
    (tmp_path / "link_to_home").symlink_to(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    return {"current folder": ".", "folder above": "..", "home": str(home),
            "symlink to home": str(tmp_path / "link_to_home"), "user's folder": str(mine),
            "git repository": str(work)}, tmp_path


CASES = ["current folder", "folder above", "home", "symlink to home", "user's folder", "git repository"]
WORDS = {"current folder": "the current folder", "folder above": "a folder above", "home": "your home folder",
         "symlink to home": "your home folder", "user's folder": "did not write it",
         "git repository": "a folder above"}  # tmp/work is above the current folder as well as a repository


def commands(setup, offline_setup, tokenizer):
    """name -> (main, argv for an output folder TARGET with the replace flag)."""
    import train

    from data_prep import binarize, make_tokenizer

    export = load_script("examples/distillation/export.py")
    return {
        "train.py --force": (train.main, lambda t: train_args(setup, t, "--force")),
        "export.py --force": (export.main, lambda t: ["--checkpoint", str(setup["teacher"]), "--output_dir", t,
                                                      "--force"]),
        "dump_teacher_logits.py --force": (dump_script().main, lambda t: dump_args(offline_setup, t, "--force")),
        "binarize.py --overwrite": (binarize.main, lambda t: ["--input", SAMPLE, "--tokenizer", str(tokenizer),
                                                              "--output_dir", t, "--overwrite", "--quiet"]),
        "make_tokenizer.py --overwrite": (make_tokenizer.main, lambda t: ["--input", SAMPLE, "--output_dir", t,
                                                                          "--vocab_size", "100", "--overwrite"]),
    }


COMMANDS = ["train.py --force", "export.py --force", "dump_teacher_logits.py --force", "binarize.py --overwrite",
            "make_tokenizer.py --overwrite"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_replace_flag_never_deletes_what_the_toolkit_did_not_write(command, case, places, tiny_setup,
                                                                       offline_setup, tiny_tokenizer, capsys):
    targets, root = places
    before = snapshot(root)
    main, argv = commands(tiny_setup, offline_setup, tiny_tokenizer)[command]
    status = main(argv(targets[case]))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert err[-1].startswith("error: ") and WORDS[case] in err[-1], err[-1]
    assert "nothing was deleted" in err[-1] or "would not delete it" in err[-1], err[-1]
    assert snapshot(root) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("case", ["home", "symlink to home", "user's folder"])
def test_build_corpus_overwrite_deletes_only_its_own_doc_data(case, places, capsys):
    """build_corpus.py --overwrite replaces OUTPUT_DIR/doc_data and dev_data: a doc_data that is a user's
    folder, or a link to the home folder, is refused."""
    targets, root = places
    out = root / "corpus"
    out.mkdir()
    if case == "user's folder":
        (out / "doc_data").mkdir()
        (out / "doc_data" / "mine.txt").write_text("keep me")
    else:
        (out / "doc_data").symlink_to(targets[case])
    before = snapshot(root)
    from data_prep import build_corpus

    status = build_corpus.main(["--source", "text", "--input", SAMPLE, "--output_dir", str(out), "--overwrite",
                                "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: ") and "doc_data" in err[-1], err
    assert snapshot(root) == before


def test_a_replace_flag_replaces_an_earlier_output_of_the_toolkit(tmp_path, monkeypatch, tiny_tokenizer):
    """The other side of the rule: what a command wrote (it holds the marker) is replaced, nothing else of it kept."""
    monkeypatch.chdir(tmp_path)
    from data_prep import binarize

    out = tmp_path / "bin"
    args = ["--input", SAMPLE, "--tokenizer", str(tiny_tokenizer), "--output_dir", str(out), "--quiet",
            "--num_workers", "1", "--allow_bad_text"]  # the tiny tokenizer lacks most of the sample's kanji
    assert binarize.main(args) == 0 and (out / MARKER).is_file()
    (out / "stale.pickle").write_bytes(b"from before")
    assert binarize.main(args) == 2  # not empty, no --overwrite
    assert binarize.main([*args, "--overwrite"]) == 0
    assert (out / MARKER).is_file() and not (out / "stale.pickle").exists()


def test_every_replace_flag_is_covered():
    """A new --force/--overwrite in a command must join the table above."""
    flagged = set()
    for path in [*REPO.glob("data_prep/*.py"), *REPO.glob("examples/distillation/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for flag in ("--force", "--overwrite"):
            if f'add_argument("{flag}"' in text or f"add_argument('{flag}'" in text:
                flagged.add(f"{path.name} {flag}")
    assert flagged == set(COMMANDS) - {"train.py --force"} | {"build_corpus.py --overwrite", "config.py --force"}
