"""One source of truth for the recipe: train.py's defaults (config.RECIPE), and what follows them.

The benchmarks take their recipe from config.RECIPE, and --precision resolves as documented;
run_distill.sh passes a recipe flag only when its user sets one (tests/test_run_distill.py).
"""


from pathlib import Path

import pytest
import torch

import config
from helpers import REPO, load_script
from distil_ja.cli import UsageError

# The recommended recipe as written here, independently of config.py: changing it is a decision
# (docs/training.md "Recommended recipe", bench/RESULTS.md), so this test has to change with it.
RECOMMENDED = {
    "temperature": 1.0, "alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_mse": 0.0, "alpha_cos": 1.0,
    "learning_rate": 5e-4, "warmup_prop": 0.05, "weight_decay": 0.01,
    "batch_size": 8, "gradient_accumulation_steps": 16,
}
REQUIRED = ["--data_file", "data", "--student_config", "student.json", "--teacher_name", "teacher"]
RECIPE_FLAGS = ("--temperature", "--alpha_ce", "--alpha_clm", "--alpha_mse", "--alpha_cos", "--batch_size",
                "--gradient_accumulation_steps", "--learning_rate", "--warmup_prop", "--weight_decay", "--precision")


@pytest.fixture(autouse=True)
def first_attempt(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)  # not a restarted torchrun worker


def test_recipe_is_the_recommended_one():
    assert config.RECIPE == RECOMMENDED


def test_required_flags_alone_give_the_recipe_on_the_cpu():
    params = config.parse_config(REQUIRED + ["--n_gpu", "0"])
    assert {k: getattr(params, k) for k in RECOMMENDED} == RECOMMENDED
    assert params.precision == "fp32"
    assert params.compile is False and params.num_workers == 0
    assert not hasattr(params, "bf16") and not hasattr(params, "fp16")
    assert params.student_type == params.teacher_type == "auto"


def fake_cuda(monkeypatch, bf16: bool):
    """One visible GPU of compute capability 9.0 (Hopper: native bf16) or 7.0 (Volta: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0) if bf16 else (7, 0))


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_on_a_gpu_that_has_it(monkeypatch, bf16_supported, expected):
    fake_cuda(monkeypatch, bf16_supported)
    assert config.parse_config(REQUIRED + ["--n_gpu", "1", "--precision", "auto"]).precision == expected
    assert config.parse_config(REQUIRED + ["--n_gpu", "1"]).precision == expected  # auto is the default
    assert config.parse_config(REQUIRED + ["--n_gpu", "0"]).precision == "fp32"  # a CPU run, GPU or not


@pytest.mark.parametrize("flags, expected", [
    (["--bf16"], "bf16"), (["--fp16"], "fp16"), (["--precision", "fp16"], "fp16"),
    (["--precision", "fp32"], "fp32"), (["--bf16", "--precision", "bf16"], "bf16"),
])
def test_explicit_precision_and_its_aliases(monkeypatch, flags, expected):
    fake_cuda(monkeypatch, True)
    assert config.parse_config(REQUIRED + ["--n_gpu", "1", *flags]).precision == expected


@pytest.mark.parametrize("flags", [["--fp16", "--bf16"], ["--bf16", "--precision", "fp32"],
                                   ["--fp16", "--precision", "bf16"]])
def test_contradicting_precision_flags_are_refused(flags):
    with pytest.raises(UsageError):
        config.parse_config(REQUIRED + ["--n_gpu", "0", *flags])


def test_amp_dtype_of_each_precision():
    assert config.amp_dtype("bf16") is torch.bfloat16
    assert config.amp_dtype("fp16") is torch.float16
    assert config.amp_dtype("fp32") is None


# ---- the benchmarks take their recipe from config.RECIPE -------------------------------------

def load_bench(name: str):
    """bench/NAME.py as a module, without running it as a script (so it edits no sys.path)."""
    return load_script(f"bench/{name}.py")


def test_quality_default_recipe_is_the_recipe():
    quality = load_bench("quality")
    expected = {"T": RECOMMENDED["temperature"], "ce": RECOMMENDED["alpha_ce"], "clm": RECOMMENDED["alpha_clm"],
                "cos": RECOMMENDED["alpha_cos"], "kd": config.parse_config(REQUIRED).kd_loss,
                "cross": config.parse_config(REQUIRED).cross_kd,
                "within": float(config.parse_config(REQUIRED).within_pieces), "classes": 0.0}
    assert quality.DEFAULT_RECIPE == expected
    assert quality.build_parser().parse_args([]).recipe == expected
    # the students' loss flags are valid train.py settings: with a teacher, and without one
    runs = quality.student_runs(quality.DEFAULT_RECIPE, ["no_kd", "kd"])
    kd = config.parse_config(REQUIRED + ["--n_gpu", "0", *map(str, runs["kd"]["args"])])
    assert {k: getattr(kd, k) for k in ("temperature", "alpha_ce", "alpha_clm", "alpha_cos", "kd_loss")} == \
        {**{k: RECOMMENDED[k] for k in ("temperature", "alpha_ce", "alpha_clm", "alpha_cos")}, "kd_loss": "fkl"}
    alone = ["--data_file", "data", "--student_config", "s.json", "--tokenizer_name", "tok", "--n_gpu", "0"]
    no_kd = config.parse_config(alone + [str(a) for a in runs["no_kd"]["args"]])
    assert (no_kd.alpha_ce, no_kd.alpha_clm, no_kd.alpha_mse, no_kd.alpha_cos) == (0, 1, 0, 0)
    # within=1 gives the cross-tokenizer KD runs --within_pieces, and their no-teacher baseline not
    cross = quality.student_runs(quality.parse_recipe("cos=0,within=1"), ["xkd", "xkd_top8", "no_kd_x"])
    assert [("--within_pieces" in cross[r]["args"]) for r in ("xkd", "xkd_top8", "no_kd_x")] == [True, True, False]
    assert config.parse_config(REQUIRED + ["--n_gpu", "0", *map(str, cross["xkd"]["args"])]).within_pieces
    # classes=1: the xkd_topK dumps of next-character classes, in a folder of their own
    assert quality.topk_dump(Path("q"), 8, 1.0, 8000, True, True).name == "top8-T1-x8000-within-classes"
    assert quality.topk_dump(Path("q"), 8, 1.0, None, True, True).name == "top8-T1"


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md"])
def test_readme_by_hand_command_is_the_design_card_command_with_the_recipe(doc):
    """The 'same by hand' torchrun line (README, docs/training.md) passes inputs only: its parsed settings
    are the recipe."""
    text = (REPO / doc).read_text(encoding="utf-8")
    start = text.index("torchrun --nproc_per_node 4 examples/distillation/train.py --n_gpu 4")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = " ".join(lines).split()
    argv = words[argv_start(words):]
    assert not set(argv) & set(RECIPE_FLAGS), argv
    argv[argv.index("--n_gpu") + 1] = "0"  # parsed here, on the CPU
    params = config.parse_config(argv)
    assert {k: getattr(params, k) for k in RECOMMENDED} == RECOMMENDED


def argv_start(words: list[str]) -> int:
    """Index of the first train.py argument in a `torchrun ... train.py ARGS` command."""
    return next(i for i, w in enumerate(words) if w.endswith("train.py")) + 1


def test_the_docs_list_every_setting_a_resume_may_change():
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    bullet = text[text.index("- **`--resume`**"):]
    bullet = bullet[:bullet.index("\n- **")]
    for name in sorted(config.RESUMABLE_CHANGES - {"resume", "force"}):
        assert f"`--{name}`" in bullet, name


# ---- --n_gpu's default: where the user is --------------------------------------------------------

def test_n_gpu_default_is_the_cpu_where_no_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2 on a CPU machine: gloo
    params = config.parse_config(REQUIRED)
    assert params.n_gpu == 0 and params.precision == "fp32" and params.compile is False


@pytest.mark.parametrize("local_world_size, expected", [(None, 1), ("4", 4)])
def test_n_gpu_default_is_one_gpu_per_process_torchrun_started(monkeypatch, local_world_size, expected):
    fake_cuda(monkeypatch, True)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # plain python: one process, one GPU
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    params = config.parse_config(REQUIRED)
    assert params.n_gpu == expected and params.precision == "bf16" and params.compile is True
    assert config.parse_config(REQUIRED + ["--n_gpu", "0"]).n_gpu == 0  # an explicit value stands


def test_the_design_card_command_still_gives_four_gpus_and_the_recipe(monkeypatch):
    fake_cuda(monkeypatch, True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    params = config.parse_config(["--n_gpu", "4"] + REQUIRED)
    assert params.n_gpu == 4 and params.precision == "bf16" and params.compile is True
    assert {k: getattr(params, k) for k in RECOMMENDED} == RECOMMENDED


def test_one_teacher_flag_reads_needs():
    with pytest.raises(UsageError, match=r"^--alpha_cos needs a teacher: .* set it to 0$"):
        config.parse_config(["--data_file", "d", "--student_config", "s", "--tokenizer_name", "t", "--alpha_ce", "0"])
    with pytest.raises(UsageError, match=r"^--alpha_ce, --alpha_cos need a teacher: .* set them to 0$"):
        config.parse_config(["--data_file", "d", "--student_config", "s", "--tokenizer_name", "t"])


# ---- recipe files: --config FILE.yaml ------------------------------------------------------------

def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


INPUTS = "data_file: data\nstudent_config: student.json\nteacher_name: teacher\nn_gpu: 0\n"


def test_a_recipe_gives_the_flags_it_names(tmp_path):
    path = recipe(tmp_path, INPUTS + "alpha_ce: 3\nlearning_rate: 1e-4\nkd_loss: jsd\ncompile: false\n"
                                     "eval_data: [dev1, dev2]\nfreeze_pos_embs: true\n")
    params = config.parse_config(["--config", path])
    flags = config.parse_config(["--data_file", "data", "--student_config", "student.json", "--teacher_name",
                                 "teacher", "--n_gpu", "0", "--alpha_ce", "3", "--learning_rate", "1e-4",
                                 "--kd_loss", "jsd", "--no-compile", "--eval_data", "dev1", "dev2",
                                 "--freeze_pos_embs"])
    assert vars(params) == {**vars(flags), "config": str(Path(path).resolve())}
    assert flags.config is None
    assert params.data_file == ["data"] and params.alpha_ce == 3.0 and isinstance(params.alpha_ce, float)
    assert params.learning_rate == 1e-4  # 1e-4 is a float here, though YAML 1.1 reads it as a string


def test_the_command_line_overrides_the_file(tmp_path):
    path = recipe(tmp_path, INPUTS + "alpha_ce: 3\nprecision: bf16\ndata_file: [a, b]\ncompile: true\n")
    params = config.parse_config(["--alpha_ce", "1", "--config", path, "--precision", "fp32", "--data_file", "c",
                                  "--no-compile"])
    assert (params.alpha_ce, params.precision, params.data_file, params.compile) == (1.0, "fp32", ["c"], False)
    assert params.student_config == "student.json"  # what the command line does not name stays the file's


@pytest.mark.parametrize("text, message", [
    ("alpah_ce: 1\n", "unknown key 'alpah_ce'; did you mean alpha_ce?"),
    ("bogus: 1\n", "unknown key 'bogus' (keys are train.py's flag names, without --)"),
    ("--alpha_ce: 1\n", "unknown key '--alpha_ce'"),
    ("config: other.yaml\n", "a recipe cannot name another recipe"),
    ("batch_size: 8.5\n", "batch_size: expected an integer, got 8.5"),
    ("batch_size: true\n", "batch_size: expected an integer, got True"),
    ("alpha_ce: five\n", "alpha_ce: expected a number, got 'five'"),
    ("alpha_ce: '5'\n", "alpha_ce: expected a number, got '5'"),
    ("compile: 1\n", "compile: expected true or false, got 1"),
    ("kd_loss: kl\n", "kd_loss: 'kl' is not one of fkl, rkl, jsd"),
    ("teacher_name: 3\n", "teacher_name: expected a string, got 3"),
    ("eval_data: []\n", "eval_data: expected a path or a list of paths, got []"),
])
def test_a_bad_recipe_is_one_line(tmp_path, text, message):
    refused_in_one_line(recipe(tmp_path, INPUTS + text), message)


@pytest.mark.parametrize("text, message", [
    ("- alpha_ce\n", "expected a mapping of flag names to values, got list"),
    ("alpha_ce: 1\nbatch_size: [1\n", "not valid YAML at line 3"),
])
def test_a_recipe_that_is_no_mapping_is_one_line(tmp_path, text, message):
    refused_in_one_line(recipe(tmp_path, text), message)


def refused_in_one_line(path: str, message: str):
    with pytest.raises(UsageError) as caught:
        config.parse_config(["--config", path])
    assert message in str(caught.value) and str(caught.value).startswith(f"--config {path}: ")
    assert "\n" not in str(caught.value)


def test_an_unreadable_recipe_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"cannot read it \(No such file or directory\)"):
        config.parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, flags, message", [
    ("precision: fp32\n", ["--bf16"], r"--bf16 contradicts --precision fp32 \(precision from "),
    ("bf16: true\n", ["--precision", "fp32"], r"--bf16 contradicts --precision fp32 \(bf16 from "),
    ("fp16: true\n", ["--bf16"], r"--fp16 and --bf16 exclude each other \(fp16 from "),
    ("bf16: true\nprecision: fp16\n", [], r"--bf16 contradicts --precision fp16 \(precision, bf16 from "),
])
def test_a_setting_named_two_ways_that_disagree_is_refused(tmp_path, text, flags, message):
    with pytest.raises(UsageError, match=message):
        config.parse_config(["--config", recipe(tmp_path, INPUTS + text), *flags])


def test_the_same_name_on_the_command_line_is_an_override_not_a_contradiction(tmp_path):
    path = recipe(tmp_path, INPUTS + "precision: fp32\n")
    assert config.parse_config(["--config", path, "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(UsageError, match="contradicts"):  # another name for it: which did the user mean?
        config.parse_config(["--config", path, "--bf16"])


def test_a_recipe_may_give_the_required_flags_and_none_of_them(tmp_path):
    assert config.parse_config(["--config", recipe(tmp_path, "")] + REQUIRED).config is not None
    with pytest.raises(UsageError, match="required: --data_file"):
        config.parse_config(["--config", recipe(tmp_path, "student_config: s\nteacher_name: t\n")])
