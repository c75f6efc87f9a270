"""run_distill.sh, without training anything: stubs stand in for torchrun and for $PYTHON.

The stub torchrun records its argv and working folder (and can print and fail like a real launch);
the stub $PYTHON records the demo's commands and answers the GPU count (STUB_GPUS). So these tests
check what the script launches, from where, and what it refuses before anything runs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
from distil_ja.outputs import MARKER
from helpers import REPO

SCRIPT = REPO / "run_distill.sh"
TRAIN_PY = "examples/distillation/train.py"
RECIPE_FLAGS = ("--temperature", "--alpha_ce", "--alpha_clm", "--alpha_mse", "--alpha_cos", "--batch_size",
                "--gradient_accumulation_steps", "--learning_rate", "--warmup_prop", "--weight_decay", "--precision")
DEMO_ENTRIES = ("tokenizer", "data", "teacher", "student_kd", "student_no_kd", "perplexity.json", "results.json",
                "curves.png", "export")

TORCHRUN_STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG/torchrun_argv.txt"
pwd > "$STUB_LOG/torchrun_cwd.txt"
if [[ -f "$STUB_LOG/torchrun_stdout" ]]; then cat "$STUB_LOG/torchrun_stdout"; fi
if [[ -f "$STUB_LOG/torchrun_stderr" ]]; then cat "$STUB_LOG/torchrun_stderr" >&2; fi
exit "${STUB_STATUS:-0}"
"""
PYTHON_STUB = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then echo "${STUB_GPUS:-0}"; exit 0; fi   # the GPU count
if [[ "$1 $2" == "-m distil_ja.outputs" ]]; then exec "$REAL_PYTHON" "$@"; fi   # the deletion rule, for real
printf '%s\\t%s\\n' "$PWD" "$*" >> "$STUB_LOG/python_calls.txt"
if [[ "$1" == "-" ]]; then cat > /dev/null; fi
"""


class Run:
    """One run of run_distill.sh with the stubs: its result, and what the stubs saw."""

    def __init__(self, tmp_path: Path, args=(), env=None, cwd=None, torchrun_stdout=b"", torchrun_stderr=b""):
        self.log = tmp_path / "stub_log"
        self.log.mkdir(exist_ok=True)
        bin_dir = tmp_path / "stub_bin"
        bin_dir.mkdir(exist_ok=True)
        for name, text in (("torchrun", TORCHRUN_STUB), ("python", PYTHON_STUB)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        if torchrun_stdout:
            (self.log / "torchrun_stdout").write_bytes(torchrun_stdout)
        if torchrun_stderr:
            (self.log / "torchrun_stderr").write_bytes(torchrun_stderr)
        full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                    "PYTHON": str(bin_dir / "python"), "STUB_LOG": str(self.log), "STUB_GPUS": "4",
                    "REAL_PYTHON": sys.executable, **(env or {})}
        self.proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd or tmp_path, env=full_env,
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        self.returncode = self.proc.returncode
        self.stdout = self.proc.stdout.decode()
        self.stderr = self.proc.stderr.decode()

    @property
    def launched(self) -> bool:
        return (self.log / "torchrun_argv.txt").exists()

    @property
    def argv(self) -> list[str]:
        return (self.log / "torchrun_argv.txt").read_text().splitlines()

    @property
    def torchrun_cwd(self) -> Path:
        return Path((self.log / "torchrun_cwd.txt").read_text().strip())

    @property
    def python_calls(self) -> list[tuple[str, str]]:
        calls = self.log / "python_calls.txt"
        return [tuple(line.split("\t", 1)) for line in calls.read_text().splitlines()] if calls.exists() else []

    def train_args(self) -> list[str]:
        """What torchrun hands to train.py: everything after the script."""
        argv = self.argv
        return argv[next(i for i, a in enumerate(argv) if a.endswith(TRAIN_PY)) + 1:]

    def value(self, flag: str) -> str:
        args = self.train_args()
        return args[len(args) - 1 - args[::-1].index(flag) + 1]  # the last one wins, as in argparse


def refused(run: Run, status: int, *words: str):
    """One line `error: ...` on stderr naming words, the given status, and nothing launched."""
    assert run.returncode == status, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not run.launched


@pytest.fixture
def caller(tmp_path) -> Path:
    """The folder the user runs the script from, holding the default DATA (data/binarized)."""
    folder = tmp_path / "caller"
    (folder / "data" / "binarized").mkdir(parents=True)
    return folder


# ---- the full recipe: only what its user sets -------------------------------------------------

def test_run_distill_passes_no_recipe_flag_unless_set(tmp_path, caller):
    run = Run(tmp_path, cwd=caller)
    assert run.returncode == 0, run.stderr
    argv = run.argv
    assert argv[argv.index("--nproc_per_node") + 1] == "4"
    args = run.train_args()
    assert not [a for a in args if a in RECIPE_FLAGS + ("--bf16", "--fp16")]
    assert not [a for a in args if a in ("--student_type", "--teacher_type", "--dump_path")]  # train.py's defaults
    params = config.build_parser().parse_args(args)
    assert params.n_gpu == 4 and params.data_file == ["data/binarized"]
    assert params.teacher_name == "rinna/japanese-gpt2-medium"
    assert Path(params.student_config) == REPO / "examples/distillation/training_configs/distilgpt2-ja.json"
    assert params.precision is None  # resolved by train.py: auto
    for name, value in config.RECIPE.items():
        assert getattr(params, name) == value


def test_run_distill_passes_what_is_set_and_extra_arguments_last(tmp_path, caller):
    run = Run(tmp_path, ["--max_steps", "7"], cwd=caller,
              env={"ALPHA_CE": "3", "PRECISION": "fp16", "ALPHA_CLM": "", "DUMP_PATH": "out/run1", "N_GPU": "2"})
    assert run.returncode == 0, run.stderr
    args = run.train_args()
    pairs = list(zip(args, args[1:]))
    assert ("--alpha_ce", "3") in pairs and ("--precision", "fp16") in pairs and ("--dump_path", "out/run1") in pairs
    assert "--alpha_clm" not in args  # set but empty: train.py's default
    assert args[-2:] == ["--max_steps", "7"]
    params = config.build_parser().parse_args(args)
    assert (params.alpha_ce, params.precision, params.n_gpu, params.max_steps) == (3.0, "fp16", 2, 7)
    assert params.alpha_clm == config.RECIPE["alpha_clm"]


# ---- issue 1: paths are the caller's -----------------------------------------------------------

def test_full_recipe_reads_every_relative_path_from_the_callers_folder(tmp_path, caller):
    (caller / "my.json").write_text("{}")
    (caller / "init.pt").write_bytes(b"")
    for folder in ("dev", "teacher_dir", "extra_dev"):
        (caller / folder).mkdir()
    env = {"DATA": "data/binarized", "STUDENT_CONFIG": "my.json", "STUDENT_INIT": "init.pt", "EVAL_DATA": "dev",
           "TEACHER": "teacher_dir", "DUMP_PATH": "out/run1"}
    run = Run(tmp_path, ["--eval_data", "extra_dev"], env=env, cwd=caller)
    assert run.returncode == 0, run.stderr
    here = run.torchrun_cwd  # the folder torchrun (and so train.py) reads relative paths from
    for flag, expected in [("--data_file", "data/binarized"), ("--student_config", "my.json"),
                           ("--student_pretrained_weights", "init.pt"), ("--teacher_name", "teacher_dir"),
                           ("--dump_path", "out/run1"), ("--eval_data", "extra_dev")]:
        assert (here / run.value(flag)).resolve() == (caller / expected).resolve(), flag
    train_py = next(a for a in run.argv if a.endswith(TRAIN_PY))
    assert (here / train_py).resolve() == REPO / TRAIN_PY


def test_demo_writes_in_the_callers_folder(tmp_path, caller):
    run = Run(tmp_path, ["--demo", "rel_out"], cwd=caller)
    assert run.returncode == 0, run.stderr
    assert (caller / "rel_out").is_dir() and not (REPO / "rel_out").exists()
    assert (caller / "rel_out" / MARKER).is_file()
    # every command ran from the caller's folder and wrote under rel_out; the inputs came from the repo
    calls = run.python_calls
    assert len(calls) == 10 and all(Path(cwd) == caller for cwd, _ in calls)
    assert "--output_dir rel_out/tokenizer" in calls[0][1]
    assert f"--input {REPO}/data_prep/sample/ja_train.txt" in calls[0][1]
    # the three runs' curves in one picture, and the demo says where it is
    assert calls[8][1] == (f"{REPO}/bench/plot_runs.py rel_out/teacher rel_out/student_kd rel_out/student_no_kd "
                           "--out rel_out/curves.png")
    assert "plot:    rel_out/curves.png" in run.stdout
    # with no OUT_DIR: checkpoints/demo, there too
    Run(tmp_path, ["--demo"], cwd=caller)
    assert (caller / "checkpoints" / "demo" / MARKER).is_file()


# ---- issue 1: the demo deletes nothing it did not write ----------------------------------------

@pytest.mark.parametrize("force", [[], ["--force"]])
def test_demo_refuses_a_non_empty_folder_it_did_not_write(tmp_path, force):
    """--force included: the demo deletes only what this toolkit wrote (distil_ja.outputs' rule)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "teacher").mkdir()  # even one of the demo's names
    run = Run(tmp_path, ["--demo", *force, "mine"])
    refused(run, 2, "mine", "--force", MARKER, "nothing was deleted")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "teacher").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "teacher"]
    assert run.python_calls == [] and run.stdout == ""  # stopped before anything ran


@pytest.mark.parametrize("marker", [MARKER, ".distil-ja-demo"])  # the demo's own marker before the shared rule
def test_demo_rerun_replaces_only_what_the_demo_wrote(tmp_path, marker):
    out = tmp_path / "demo"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "stale.bin").write_bytes(b"old")
    (out / "results.json").write_text("{}")
    (out / marker).write_text("")
    (out / "notes.txt").write_text("keep me")
    run = Run(tmp_path, ["--demo", "demo"])
    assert run.returncode == 0, run.stderr
    assert not (out / "teacher").exists() and not (out / "results.json").exists()  # the stub writes nothing
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(run.python_calls) == 10


def test_demo_force_replaces_the_whole_earlier_output(tmp_path):
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "old.pickle").write_bytes(b"")
    (out / "notes.txt").write_text("put here after the demo")
    (out / MARKER).write_text("")
    run = Run(tmp_path, ["--demo", "--force", "demo"])
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # the stub writes nothing
    assert len(run.python_calls) == 10


def test_demo_never_writes_into_the_repository_even_with_force(tmp_path):
    """Against a copy of the script and of distil_ja, so that a bug here could only delete the copy's folder."""
    fake_repo = tmp_path / "repo"
    fake_repo.mkdir()
    (fake_repo / "run_distill.sh").write_bytes(SCRIPT.read_bytes())
    shutil.copytree(REPO / "distil_ja", fake_repo / "distil_ja", ignore=shutil.ignore_patterns("__pycache__"))
    (fake_repo / "README.md").write_text("keep me")
    (fake_repo / MARKER).write_text("")  # even marked: the repository is never replaced
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "PYTHON": sys.executable}
    for target in (fake_repo, tmp_path):  # the repository, and a folder above it
        proc = subprocess.run(["bash", str(fake_repo / "run_distill.sh"), "--demo", "--force", str(target)],
                              cwd="/", env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
        assert "this toolkit's repository" in proc.stderr, proc.stderr
        assert (fake_repo / "README.md").read_text() == "keep me"
        assert not (target / "teacher").exists()


@pytest.mark.parametrize("args", [["--demo", "a", "b"], ["--demo", "--frce", "a"]])
def test_demo_usage_errors(tmp_path, args):
    refused(Run(tmp_path, args), 2, "usage: bash run_distill.sh --demo [--force] [OUT_DIR]")
    assert not (tmp_path / "a").exists()


# ---- issue 2: the inputs are checked before the launch -----------------------------------------

def test_missing_data_is_named_before_anything_is_launched(tmp_path):
    run = Run(tmp_path)  # no data/binarized in the caller's folder
    refused(run, 1, "DATA data/binarized", str(tmp_path))


@pytest.mark.parametrize("env, words", [
    ({"STUDENT_CONFIG": "missing.json"}, ["STUDENT_CONFIG missing.json"]),
    ({"STUDENT_INIT": "missing.pt"}, ["STUDENT_INIT missing.pt"]),
    ({"EVAL_DATA": "missing_dev"}, ["EVAL_DATA missing_dev"]),
    ({"TEACHER": "./missing_teacher"}, ["TEACHER ./missing_teacher", "org/name"]),
    ({"TEACHER": "a/b/c"}, ["TEACHER a/b/c"]),
    ({"STUB_GPUS": "0"}, ["N_GPU=4", "N_GPU=0"]),  # a CPU machine, the default N_GPU
    ({"STUB_GPUS": "2", "N_GPU": "4"}, ["N_GPU=4", "only 2 GPU"]),
    ({"N_GPU": "four"}, ["N_GPU=four"]),
    ({"N_GPU": "0", "NPROC": "0"}, ["NPROC=0"]),
    ({"N_GPU": "2", "NPROC": "3"}, ["NPROC=3"]),
    ({"NNODES": "0"}, ["NNODES=0"]),
    ({"NNODES": "2", "NODE_RANK": "2"}, ["NODE_RANK=2", "NNODES=2"]),
    ({"SHARD_TEACHER": "yes"}, ["SHARD_TEACHER=yes"]),
])
def test_bad_inputs_are_refused_in_one_line_before_the_launch(tmp_path, caller, env, words):
    refused(Run(tmp_path, env=env, cwd=caller), 2, *words)


def test_a_gpu_count_that_suffices_launches(tmp_path, caller):
    run = Run(tmp_path, env={"STUB_GPUS": "8", "N_GPU": "4"}, cwd=caller)
    assert run.returncode == 0, run.stderr
    assert run.argv[run.argv.index("--nproc_per_node") + 1] == "4" and run.value("--n_gpu") == "4"


@pytest.mark.parametrize("env, nproc", [({"N_GPU": "0"}, "1"), ({"N_GPU": "0", "NPROC": "2"}, "2")])
def test_n_gpu_0_is_a_cpu_run(tmp_path, caller, env, nproc):
    run = Run(tmp_path, env={"STUB_GPUS": "0", **env}, cwd=caller)  # no GPU needed, none counted
    assert run.returncode == 0, run.stderr
    assert run.argv[run.argv.index("--nproc_per_node") + 1] == nproc
    assert run.value("--n_gpu") == "0"


def test_the_topology_of_several_nodes_goes_to_torchrun_and_shard_teacher_to_train_py(tmp_path, caller):
    run = Run(tmp_path, cwd=caller, env={"STUB_GPUS": "8", "N_GPU": "8", "NNODES": "2", "NODE_RANK": "1",
                                         "MASTER_ADDR": "node0", "MAX_RESTARTS": "3", "SHARD_TEACHER": "1"})
    assert run.returncode == 0, run.stderr
    launch = dict(zip(run.argv, run.argv[1:]))
    expected = {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "8", "--master_addr": "node0",
                "--max-restarts": "3"}
    assert {k: launch[k] for k in expected} == expected
    assert config.build_parser().parse_args(run.train_args()).shard_teacher


def test_extra_arguments_decide_what_they_set(tmp_path):
    (tmp_path / "mydata").mkdir()
    run = Run(tmp_path, ["--data_file", "mydata", "--n_gpu", "0"], env={"STUB_GPUS": "0", "N_GPU": "0"})
    assert run.returncode == 0, run.stderr  # the default DATA (absent) is not checked: --data_file wins
    assert run.value("--data_file") == "mydata"


# ---- issue 2: a worker's error line is the last thing on the screen ------------------------------

TRACEBACK = "".join(f"  File \"torch/distributed/run.py\", line {i}, in main\n" for i in range(40)) + \
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 60 + "\n"


@pytest.mark.parametrize("worker_line", [
    "error: shard 00003.pickle is truncated\n",
    "Steps:  10%|#         | 5/50 [00:01<00:09]\rerror: shard 00003.pickle is truncated\n",  # after a progress bar
])
def test_a_failing_workers_error_line_comes_last(tmp_path, caller, worker_line):
    stderr = "W1127 torchrun warning\n" + worker_line * 4 + "E1127 failed (exitcode: 1) local_rank: 0\n" + TRACEBACK
    run = Run(tmp_path, cwd=caller, env={"STUB_STATUS": "1"}, torchrun_stdout=b"step 1\n",
              torchrun_stderr=stderr.encode())
    assert run.returncode == 1
    assert run.stdout.endswith("step 1\n")  # the workers' stdout still comes through
    assert TRACEBACK in run.stderr  # and all of torchrun's stderr, unchanged
    assert run.stderr.splitlines()[-1] == "error: shard 00003.pickle is truncated"


@pytest.mark.parametrize("status", [0, 3])
def test_torchruns_status_is_the_scripts(tmp_path, caller, status):
    run = Run(tmp_path, cwd=caller, env={"STUB_STATUS": str(status)}, torchrun_stderr=b"some log line\n")
    assert run.returncode == status
    assert run.stderr == "some log line\n"  # no error line to repeat: nothing added


@pytest.mark.parametrize("case", [".", "..", "home", "link to home"])
def test_demo_refuses_the_current_folder_its_parents_and_home(tmp_path, case):
    """Issue 22: the demo follows distil_ja.outputs' rule too; each folder here holds the marker, and is refused."""
    here = tmp_path / "work" / "here"  # the caller's folder; HOME is tmp_path (Run)
    here.mkdir(parents=True)
    for folder in (here, here.parent, tmp_path):
        (folder / MARKER).write_text("")
        (folder / "keep.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path)
    target = {".": ".", "..": "..", "home": str(tmp_path), "link to home": str(tmp_path / "link")}[case]
    run = Run(tmp_path, ["--demo", "--force", target], cwd=here)
    refused(run, 2, "no command deletes it", "nothing was deleted")
    assert all((folder / "keep.txt").read_text() == "keep me" for folder in (here, here.parent, tmp_path))
    assert run.python_calls == []

# ---- recipe files: --config ----------------------------------------------------------------------

def test_with_a_recipe_file_only_what_the_environment_sets_is_passed(tmp_path, caller):
    run = Run(tmp_path, ["--config", "my.yaml"], cwd=caller)
    assert run.returncode == 0, run.stderr
    assert run.train_args() == ["--config", "my.yaml"]  # the file names the inputs and the GPUs
    assert run.argv[run.argv.index("--nproc_per_node") + 1] == "4"  # the launch stays the environment's
    run = Run(tmp_path, ["--config=my.yaml"], cwd=caller, env={"DATA": "data/binarized", "N_GPU": "2",
                                                                "ALPHA_CE": "3"})
    assert run.returncode == 0, run.stderr
    assert run.train_args() == ["--n_gpu", "2", "--data_file", "data/binarized", "--alpha_ce", "3",
                                "--config=my.yaml"]
    (tmp_path / "third").mkdir()
    refused(Run(tmp_path / "third", ["--config", "my.yaml"], cwd=caller, env={"DATA": "nowhere"}), 1, "DATA nowhere")


def test_the_demo_recipe_is_what_the_demo_trains_its_student_with(tmp_path, caller, monkeypatch):
    run = Run(tmp_path, ["--demo"], cwd=caller)
    assert run.returncode == 0, run.stderr
    student_kd = next(args for _, args in run.python_calls if "--dump_path checkpoints/demo/student_kd" in args)
    argv = student_kd.split()
    assert argv[0].endswith(TRAIN_PY)
    monkeypatch.chdir(REPO)  # where the recipe is run from; the demo's paths are the caller's
    demo = vars(config.parse_config(argv[1:]))
    recipe = vars(config.parse_config(["--config", "recipes/demo.yaml", "--dump_path", demo["dump_path"]]))
    assert recipe.pop("config") == str(REPO / "recipes" / "demo.yaml") and demo.pop("config") is None
    assert Path(demo.pop("student_config")) == REPO / recipe.pop("student_config")
    assert recipe == demo
