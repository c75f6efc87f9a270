"""Project conventions: no import side effects, every command runs from any folder, one layering."""

import ast
import subprocess
import sys

import pytest

from helpers import REPO

LIBRARY_DIRS = ("distil_ja", "data_prep", "examples/distillation", "examples/distillation/scripts", "bench")
COMMANDS = [
    "data_prep/build_corpus.py", "data_prep/make_tokenizer.py", "data_prep/binarize.py",
    "examples/distillation/train.py", "examples/distillation/evaluate.py", "examples/distillation/export.py",
    "examples/distillation/generate.py", "examples/distillation/scripts/extract.py",
    "examples/distillation/scripts/dump_teacher_logits.py",
    "bench/distill_step.py", "bench/quality.py", "bench/host_memory.py", "bench/binarize_bench.py",
    "bench/shard_memory.py",
    "bench/dump_teacher_logits_bench.py", "bench/plot_runs.py",
    "bench/logit_memory.py", "bench/gpu_check_table.py", "bench/shard_verify.py",
]


def python_files():
    for folder in LIBRARY_DIRS:
        yield from sorted((REPO / folder).glob("*.py"))


def test_importing_any_module_leaves_sys_path_alone():
    """Each file is imported under its own name (not __main__), as a test or another module would."""
    code = (
        "import importlib.util, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'examples' / 'distillation')!r}]\n"
        "before = list(sys.path)\n"
        "for path in sys.argv[1:]:\n"
        "    name = 'probe_' + path.replace('/', '_').removesuffix('.py')\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "    assert sys.path == before, (path, set(sys.path) ^ set(before))\n"
    )
    files = [str(p) for p in python_files() if p.name != "__init__.py"]
    proc = subprocess.run([sys.executable, "-c", code, *files], cwd="/", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_from_another_folder(command, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / command), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def imported_roots(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_the_shared_base_imports_nothing_above_it():
    """distil_ja/ is the bottom layer: data_prep/ and examples/distillation/ import it, never the reverse."""
    above = {"data_prep", "examples"} | {p.stem for p in (REPO / "examples" / "distillation").glob("*.py")}
    for path in (REPO / "distil_ja").glob("*.py"):
        assert not above & set(imported_roots(path)), path
    for path in (REPO / "data_prep").glob("*.py"):
        assert not (above - {"data_prep"}) & set(imported_roots(path)), path


def local_import_graph():
    """Module name -> the project modules it imports anywhere in its body (function-level imports too)."""
    files = {p.stem: p for p in (REPO / "examples" / "distillation").glob("*.py")}
    files |= {f"{folder}.{p.stem}": p for folder in ("distil_ja", "data_prep") for p in (REPO / folder).glob("*.py")
              if p.stem != "__init__"}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = sorted(deps & set(files) - {name})
    return graph


def test_no_import_cycle():
    """An import cycle (plots <-> training_log was one) makes import order matter and hides a shared concern."""
    graph = local_import_graph()
    assert "training_log" in graph["plots"] or "records" in graph["plots"]  # the graph sees imports
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_tokenization_lives_in_the_shared_base():
    """Training and data preparation share tokenization through distil_ja, not through data_prep/."""
    assert (REPO / "distil_ja" / "tokenization.py").is_file()
    assert not (REPO / "data_prep" / "tokenization.py").exists()
    for path in (REPO / "examples" / "distillation").rglob("*.py"):
        assert "data_prep" not in set(imported_roots(path)), path
