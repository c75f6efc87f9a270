"""recipes/: every shipped recipe parses into a valid run, and the 4-GPU one is train.py's defaults.

The demo recipe is checked against what run_distill.sh --demo passes (tests/test_run_distill.py).
"""

from pathlib import Path

import pytest
import yaml

import config
from helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DEFAULTS = REPO / "recipes" / "rinna-medium-6l-4gpu.yaml"
INPUTS = {"data_file", "student_config", "teacher_name", "n_gpu"}  # what the recipe distils, and where


@pytest.fixture(autouse=True)
def first_attempt(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)


def test_the_four_recipes_are_shipped():
    assert {p.name for p in RECIPES} == {"rinna-medium-6l-4gpu.yaml", "rinna-medium-6l-offline-top64.yaml",
                                         "neox-3.6b-sharded-6l-4gpu.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_into_a_valid_run(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' paths are relative to the folder train.py runs from
    params = config.parse_config(["--config", str(path.relative_to(REPO)), "--n_gpu", "0"])
    assert params.config == str(path)
    assert set(yaml.safe_load(path.read_text())) <= set(vars(params))


def test_the_defaults_recipe_is_config_recipe_and_every_default():
    recipe = config.read_recipe(str(DEFAULTS), config.build_parser())
    assert {k: recipe[k] for k in config.RECIPE} == config.RECIPE
    parser = config.build_parser()
    defaults = {k: parser.get_default(k) for k in recipe if k not in INPUTS}
    defaults["precision"] = defaults["precision"] or "auto"  # None in the parser: --bf16 alone is no contradiction
    assert {k: v for k, v in recipe.items() if k not in INPUTS} == defaults
    assert recipe["n_gpu"] == 4


def test_the_defaults_recipe_trains_what_the_design_card_command_trains(monkeypatch):
    """torchrun --nproc_per_node 4 train.py --n_gpu 4 --data_file ... (docs/training.md) = the recipe file."""
    monkeypatch.chdir(REPO)
    card = config.parse_config(["--n_gpu", "0", "--data_file", "data/binarized", "--student_config",
                                "examples/distillation/training_configs/distilgpt2-ja.json",
                                "--teacher_name", "rinna/japanese-gpt2-medium"])
    from_file = config.parse_config(["--config", "recipes/rinna-medium-6l-4gpu.yaml", "--n_gpu", "0"])
    assert vars(from_file) == {**vars(card), "config": str(DEFAULTS)}


def test_the_other_recipes_name_what_makes_them_what_they_are(monkeypatch):
    monkeypatch.chdir(REPO)
    offline = config.parse_config(["--config", "recipes/rinna-medium-6l-offline-top64.yaml", "--n_gpu", "0"])
    assert offline.teacher_logits and offline.teacher_name is None and offline.alpha_cos == 0
    neox = config.parse_config(["--config", "recipes/neox-3.6b-sharded-6l-4gpu.yaml", "--n_gpu", "0"])
    assert neox.shard_teacher and neox.teacher_name == "rinna/japanese-gpt-neox-3.6b"
    assert Path(neox.student_pretrained_weights).suffix == ".safetensors"
