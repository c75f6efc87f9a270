"""One source of truth for the recipe: train.py's defaults (config.RECIPE), and what follows them.

The benchmarks take their recipe from config.RECIPE, and --precision resolves as documented;
run_distill.sh passes a recipe flag only when its user sets one (tests/test_run_distill.py).
"""


import pytest
import torch

import config
from helpers import REPO, load_script
from distil_ja.cli import UsageError

# The recommended recipe as written here, independently of config.py: changing it is a decision
# (README "Recommended recipe", bench/RESULTS.md), so this test has to change with it.
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
                "cos": RECOMMENDED["alpha_cos"], "kd": config.parse_config(REQUIRED).kd_loss}
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


def test_readme_by_hand_command_is_the_design_card_command_with_the_recipe():
    """The README's 'same by hand' torchrun line passes inputs only: its parsed settings are the recipe."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
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


def test_readme_lists_every_setting_a_resume_may_change():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    bullet = text[text.index("- **`--resume`**"):]
    bullet = bullet[:bullet.index("\n- **")]
    for name in sorted(config.RESUMABLE_CHANGES - {"resume", "force"}):
        assert f"`--{name}`" in bullet, name
