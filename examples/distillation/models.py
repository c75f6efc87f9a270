"""Model families, configs and weights: the one place where the toolkit loads a model.

transformers loads a checkpoint of one family into another family's class without an error:
the weights that do not fit are freshly initialised and a warning scrolls by. A Llama teacher
read as GPT-2 would then "teach" from random weights. So every load here reads the family
(`model_type` of the config) first and refuses a mismatch in one line (UsageError, exit 2).
"""

import json
import logging
import pickle
from pathlib import Path

import torch

from distil_ja import hub
from distil_ja.cli import UsageError, first_line

logger = logging.getLogger("distillation")

FAMILIES = ("gpt2",)  # the choices of --student_type / --teacher_type


def model_class(family: str):
    """The transformers causal-LM class of a family."""
    from transformers import GPT2LMHeadModel

    classes = {"gpt2": GPT2LMHeadModel}
    if family not in classes:
        raise UsageError(f"model family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    return classes[family]


def check_family(found: str | None, family: str, what: str) -> None:
    if found != family:
        raise UsageError(f"{what} is a {found or 'unknown'!r} model, but this run handles {family!r} models only "
                         f"(supported families: {', '.join(FAMILIES)})")


# ---- configs ----------------------------------------------------------------------------


def load_config(path, family: str, what: str = "student config"):
    """A config JSON file of `family` (a file without model_type is taken as that family)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable {what} ({first_line(err)})") from err
    check_family(data.get("model_type", family), family, f"{what} {path}")
    config_class = model_class(family).config_class
    return config_class.from_dict(data)


def pretrained_config(name_or_dir: str, what: str):
    """The config of a hub name or model folder (any family), or one line saying why not."""
    from transformers import AutoConfig

    hub.check_fetchable(name_or_dir, what)
    try:
        return AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError, KeyError) as err:  # transformers 4.x: HFValidationError (a ValueError)
        raise UsageError(f"cannot load {what} {name_or_dir!r}: {first_line(err)}") from err


# ---- pretrained models ------------------------------------------------------------------


def load_pretrained(name_or_dir: str, family: str, what: str = "model"):
    """A model folder or hub name of `family`; another family is refused before any weight is read."""
    config = pretrained_config(name_or_dir, what)
    check_family(config.model_type, family, f"{what} {name_or_dir!r}")
    try:
        return model_class(family).from_pretrained(name_or_dir, config=config)
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(f"cannot load {what} {name_or_dir!r}: {first_line(err)}") from err


def load_causal_lm(name_or_dir: str, what: str = "model"):
    """Any causal LM, its class chosen by its own config (evaluation and sampling): nothing to mismatch."""
    from transformers import AutoModelForCausalLM

    config = pretrained_config(name_or_dir, what)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_dir, config=config)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UsageError(f"cannot load {what} {name_or_dir!r}: {first_line(err)}") from err


# ---- state dicts ------------------------------------------------------------------------


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file, a torch state dict (scripts/extract.py) or a training
    checkpoint's training_state.pt (its "student" entry)."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise UsageError(f"{path}: unreadable weights ({' '.join(first_line(err).split())[:300]})") from err
    if isinstance(state, dict) and isinstance(state.get("student"), dict):
        state = state["student"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: neither a state dict nor a training checkpoint")
    return state


def load_state(model, state: dict, source) -> None:
    """Load `state` into `model`, every key accounted for (a tied LM head may be absent)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes: the message lists every mismatch over many lines
        raise UsageError(f"{source} does not fit the config: {' '.join(str(err).split())[:400]}") from err
    if getattr(model.config, "tie_word_embeddings", True):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UsageError(f"{source} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_student(config, family: str, weights: str | None = None):
    """A student of `config`: random, or initialised from a model folder or a weights file."""
    cls = model_class(family)
    if weights is None:
        return cls(config)
    if not Path(weights).exists():
        raise UsageError(f"cannot load --student_pretrained_weights {weights!r}: No such file or directory")
    if Path(weights).is_dir():
        check_family(pretrained_config(weights, "--student_pretrained_weights").model_type, family,
                     f"--student_pretrained_weights {weights!r}")
        try:
            return cls.from_pretrained(weights, config=config)
        except (OSError, ValueError, RuntimeError) as err:
            raise UsageError(f"cannot load --student_pretrained_weights {weights!r}: {first_line(err)}") from err
    student = cls(config)
    try:
        load_state(student, read_state_dict(weights), weights)
    except UsageError as err:
        raise UsageError(f"cannot load --student_pretrained_weights {weights!r}: {err}") from err
    return student
