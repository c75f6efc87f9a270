"""Every command block of README.md and docs/*.md runs as written: its scripts exist and its flags parse.

A ```bash block is read as bash reads it (continuation lines joined, comments and heredoc bodies
dropped, `&&`, `;` and `|` separating commands, VAR=value prefixes taken apart); `[...]` marks an
optional part, which is checked as if given. Each command is then checked against the script it runs:
train.py through config.parse_config (its flags, their checks, a recipe file), the other Python commands
through their own build_parser (or, for the benchmarks that have none, their --flags in the source),
run_distill.sh's extra arguments as train.py flags and its variables as ones the script reads.
A ```yaml block is a recipe file and is read by config.read_recipe. docs/notes/ holds drafts: not checked.
"""

import argparse
import re
import shlex
from pathlib import Path

import pytest

import config
from helpers import REPO, load_script

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Python commands with a parser of their own: the path and how to get it
PARSERS = {
    "examples/distillation/evaluate.py": "examples/distillation/evaluate.py",
    "examples/distillation/export.py": "examples/distillation/export.py",
    "examples/distillation/generate.py": "examples/distillation/generate.py",
    "examples/distillation/scripts/extract.py": "examples/distillation/scripts/extract.py",
    "examples/distillation/scripts/dump_teacher_logits.py": "examples/distillation/scripts/dump_teacher_logits.py",
    "data_prep/build_corpus.py": "data_prep/build_corpus.py",
    "data_prep/make_tokenizer.py": "data_prep/make_tokenizer.py",
    "data_prep/binarize.py": "data_prep/binarize.py",
    "bench/plot_runs.py": "bench/plot_runs.py",
    "bench/quality.py": "bench/quality.py",
}
TORCHRUN_VALUE_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                        "--max-restarts", "--rdzv_backend", "--rdzv_endpoint"}


def blocks(kind: str):
    """(file, block text) for every fenced block of `kind` in the docs."""
    for path in DOCS:
        for lang, body in FENCE.findall(path.read_text(encoding="utf-8")):
            if lang == kind:
                yield path, body


def commands(body: str) -> list[list[str]]:
    """The simple commands of a bash block, as word lists."""
    lines, heredoc, joined = [], None, ""
    for line in body.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        joined += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        marker = re.search(r"<<-?\s*'?(\w+)'?", joined)
        if marker:
            heredoc = marker.group(1)
            joined = joined[:marker.start()]
        lines.append(joined)
        joined = ""
    result = []
    for line in lines:
        lexer = shlex.shlex(line.replace("[", " ").replace("]", " "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        command = []
        for word in words + [";"]:
            if word in ("&&", ";", "|", "||"):
                if command:
                    result.append(command)
                command = []
            else:
                command.append(word)
    return result


def split_env(words: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    return env, words


ALL_COMMANDS = [(path.relative_to(REPO), words) for path, body in blocks("bash") for words in commands(body)]


def test_the_docs_have_command_blocks():
    files = {str(path) for path, _ in ALL_COMMANDS}
    assert {"README.md", "docs/data-preparation.md", "docs/training.md", "docs/offline-teacher.md",
            "docs/scaling.md", "docs/speed.md", "docs/evaluation.md", "docs/development.md"} <= files
    assert len(ALL_COMMANDS) > 40


@pytest.mark.parametrize("doc, words", ALL_COMMANDS, ids=[f"{p}:{' '.join(w)[:60]}" for p, w in ALL_COMMANDS])
def test_every_documented_command_exists_and_parses(doc, words, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' commands run from the repository root
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    env, words = split_env(words)
    program, args = words[0], words[1:]
    if program.rsplit("/", 1)[-1] == "pip":  # pip, or a virtual environment's bin/pip
        check_pip(args)
    elif program == "torchrun":
        check_env(env, set())
        check_python(torchrun_script(args))
    elif program in ("python", "python3"):
        check_env(env, set())
        if args[:2] in (["-m", "pytest"], ["-m", "venv"]):
            return
        if args == ["-"]:  # a heredoc script: its body is plain Python
            return
        check_python(args)
    elif program == "bash":
        check_bash(env, args)
    else:
        pytest.fail(f"{doc}: unknown command {program!r} in {' '.join(words)}")


def torchrun_script(args: list[str]) -> list[str]:
    """The script and its arguments of `torchrun [torchrun flags] SCRIPT ARGS`."""
    i = 0
    while args[i].startswith("-"):
        flag = args[i].split("=", 1)[0]
        assert flag in TORCHRUN_VALUE_FLAGS, f"unknown torchrun flag {flag}"
        i += 1 if "=" in args[i] else 2
    return args[i:]


def check_pip(args: list[str]) -> None:
    assert args[0] == "install", args
    for flag, value in zip(args, args[1:]):
        if flag == "-r":
            assert (REPO / value).is_file(), value


def check_env(env: dict, known: set) -> None:
    assert set(env) <= known | {"OMP_NUM_THREADS", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES"}, env


def check_python(args: list[str]) -> None:
    script, argv = args[0], args[1:]
    assert (REPO / script).is_file(), f"{script} does not exist"
    if script == "examples/distillation/train.py":
        config.parse_config(argv)  # flags, their checks, a --config file
    elif script in PARSERS:
        parser = load_script(PARSERS[script]).build_parser()
        parser.parse_args(argv)
    else:  # a benchmark without build_parser: its flags are in its source
        source = (REPO / script).read_text(encoding="utf-8")
        for word in argv:
            if word.startswith("--"):
                assert f'"{word.split("=")[0]}"' in source, f"{script} has no {word}"


def check_bash(env: dict, args: list[str]) -> None:
    script, argv = args[0], args[1:]
    assert (REPO / script).is_file(), f"{script} does not exist"
    source = (REPO / script).read_text(encoding="utf-8")
    check_env(env, {name for name in env if re.search(rf"\b{name}\b", source)})
    if script != "run_distill.sh":
        for word in argv:
            assert not word.startswith("-") or word in source, f"{script} has no {word}"
        return
    if argv[:1] == ["--demo"]:
        assert all(w == "--force" or not w.startswith("-") for w in argv[1:]), argv
        return
    train_flags = config.build_parser()._option_string_actions
    for word in argv:
        if word.startswith("--"):
            assert word.split("=")[0] in train_flags, f"train.py has no {word}"
    if "--config" in argv:
        config.read_recipe(argv[argv.index("--config") + 1], config.build_parser())


@pytest.mark.parametrize("doc, body", list(blocks("yaml")), ids=lambda v: str(v)[:40])
def test_every_documented_recipe_block_is_a_valid_recipe(doc, body, tmp_path):
    path = tmp_path / "block.yaml"
    path.write_text(body, encoding="utf-8")
    assert config.read_recipe(str(path), config.build_parser())


def test_the_reader_sees_what_bash_sees():
    body = ("A=1 B=2 python x.py --a 1 \\\n    --b [--c] # comment\n"
            "python - <<'PY'  # heredoc\nimport os\nPY\nmkdir -p d && cd d; ls | wc\n")
    assert commands(body) == [["A=1", "B=2", "python", "x.py", "--a", "1", "--b", "--c"], ["python", "-"],
                              ["mkdir", "-p", "d"], ["cd", "d"], ["ls"], ["wc"]]
    assert split_env(["A=1", "B=2", "python"]) == ({"A": "1", "B": "2"}, ["python"])
    assert isinstance(config.build_parser(), argparse.ArgumentParser)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


LINKS = [(path.relative_to(REPO), target) for path in DOCS
         for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
         if not target.startswith("http")]


@pytest.mark.parametrize("doc, target", LINKS, ids=[f"{d}->{t}" for d, t in LINKS])
def test_every_link_of_the_docs_reaches_its_file_and_heading(doc, target):
    file, _, fragment = target.partition("#")
    path = (REPO / doc).parent / file if file else REPO / doc
    assert path.exists(), f"{doc}: {target} does not exist"
    if fragment:
        headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
        assert fragment in {anchor(h) for h in headings}, f"{doc}: no heading #{fragment} in {file or doc}"
