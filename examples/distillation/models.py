"""Model families, configs and weights: the one place where the toolkit loads a model.

Any causal LM that transformers' AutoModelForCausalLM knows can be a teacher or a student: the
family (`model_type` of its config) picks the class, and attention is SDPA where the family has it.
TESTED_FAMILIES are the ones the test suite runs end to end; another family loads with a warning.

transformers loads a checkpoint of one family into another family's class without an error:
the weights that do not fit are freshly initialised and a warning scrolls by. A Llama teacher
read as GPT-2 would then "teach" from random weights. So nothing here picks a class by hand:
the class always comes from the file's own config, a family the user names (--student_type,
--teacher_type other than `auto`) must be the one the config says, and student weights must be
of the student config's family; a mismatch is one line (UsageError, exit 2).

Every load asks for an explicit dtype (float32 unless told): transformers 5 would otherwise keep
the dtype a checkpoint was saved in, or the one a config JSON names, and a student must train
in float32 whatever its config says.
"""

import json
import logging
import pickle
from pathlib import Path

import torch

from distil_ja import hub
from distil_ja.cli import UsageError, first_line

logger = logging.getLogger("distillation")

AUTO = "auto"  # --student_type / --teacher_type: the family is whatever the config says
TESTED_FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2")
TYPE_CHOICES = (AUTO, *TESTED_FAMILIES)  # the choices of --student_type / --teacher_type
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


# ---- families ---------------------------------------------------------------------------


def check_family(found: str | None, family: str, what: str) -> None:
    """`found` (a config's model_type) must be a causal-LM family, and `family` unless that is auto."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not found:
        raise UsageError(f"{what} names no model_type: add one (e.g. \"model_type\": \"llama\")")
    if family != AUTO and found != family:
        raise UsageError(f"{what} is a {found!r} model, but {family!r} was asked for "
                         f"(type {AUTO!r} takes the family from the config)")
    if found not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{what} is a {found!r} model, which is not a causal LM that transformers can load")
    if found not in TESTED_FAMILIES:
        logger.warning("%s is a %r model: not one of the tested families (%s)", what, found,
                       ", ".join(TESTED_FAMILIES))


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The dtype argument of from_pretrained / from_config: `dtype` since transformers 4.56, before it
    `torch_dtype` (which transformers 5 still takes, with a deprecation warning)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def with_attention(load, what: str):
    """`load(attn_implementation)` with SDPA, or eager attention for a family that has no SDPA yet
    (GPT-Neo and BLOOM in transformers 4.46, say): slower, but the same model."""
    try:
        return load("sdpa")
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
    logger.warning("%s: this family has no SDPA attention in this transformers version; using eager attention", what)
    return load("eager")


def from_config(config, dtype: torch.dtype = torch.float32):
    """A freshly initialised causal LM of `config`, of the class its model_type names."""
    from transformers import AutoModelForCausalLM

    return with_attention(lambda attn: AutoModelForCausalLM.from_config(
        config, attn_implementation=attn, **dtype_kwargs(dtype)), f"a {config.model_type!r} model")


# ---- configs ----------------------------------------------------------------------------


def load_config(path, family: str, what: str = "student config"):
    """A config JSON file of any causal-LM family (`family` auto), or of `family` only; a file
    without model_type is taken as `family` when that is named."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable {what} ({first_line(err)})") from err
    model_type = data.get("model_type") or (family if family != AUTO else None)
    check_family(model_type, family, f"{what} {path}")
    data["model_type"] = model_type
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{path}: invalid {model_type} {what} ({first_line(err)})") from err


def pretrained_config(name_or_dir: str, what: str):
    """The config of a hub name or model folder (any family), or one line saying why not."""
    from transformers import AutoConfig

    hub.check_fetchable(name_or_dir, what)
    try:
        return AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError, KeyError) as err:  # transformers 4.x: HFValidationError (a ValueError)
        raise UsageError(f"cannot load {what} {name_or_dir!r}: {first_line(err)}") from err


def max_positions(config) -> int | None:
    """The longest sequence the model takes (its trained context for rotary families), or None.

    Families name it differently: GPT-2 n_positions (max_position_embeddings is an alias in its
    config class), GPT-NeoX, Llama and Qwen2 max_position_embeddings, a few others n_ctx or seq_length.
    """
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def special_id_agrees(config_value, tokenizer_id: int) -> bool:
    """A config's bos/eos id against the tokenizer's. Absent (None) agrees: some families' configs
    (Qwen2's class defaults) leave them out, and the tokenizer decides. A list (several end ids,
    as some Llama configs have) agrees when it holds the tokenizer's."""
    if isinstance(config_value, (list, tuple)):
        return tokenizer_id in config_value
    return config_value is None or config_value == tokenizer_id


# ---- pretrained models ------------------------------------------------------------------


def load_pretrained(name_or_dir: str, family: str, what: str = "model", dtype: torch.dtype = torch.float32):
    """A model folder or hub name of any causal-LM family (`family` auto) or of `family` only;
    another family is refused before any weight is read."""
    config = pretrained_config(name_or_dir, what)
    check_family(config.model_type, family, f"{what} {name_or_dir!r}")
    return _from_pretrained(name_or_dir, config, what, dtype)


def load_causal_lm(name_or_dir: str, what: str = "model"):
    """Any causal LM in float32 (evaluation and sampling): its class comes from its own config."""
    return load_pretrained(name_or_dir, AUTO, what)


def _from_pretrained(name_or_dir: str, config, what: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return with_attention(lambda attn: AutoModelForCausalLM.from_pretrained(
            name_or_dir, config=config, attn_implementation=attn, **dtype_kwargs(dtype)), f"{what} {name_or_dir!r}")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UsageError(f"cannot load {what} {name_or_dir!r}: {first_line(err)}") from err


def check_split_forward(model, what: str) -> None:
    """Refuse a model whose logits are not head(body(x)) for the distiller's fused path.

    The distiller runs `model.base_model(...).last_hidden_state` (after the final norm) and applies
    `model.get_output_embeddings()` itself, inside the loss. For the tested families that is exactly
    `model(x).logits`; a family whose forward rescales or soft-caps its logits (Gemma 2, Cohere,
    Granite) would be distilled against other numbers than its own. So an untested family is
    checked once on a short probe (a forward of 8 tokens) and refused in one line if it differs.
    """
    if model.config.model_type in TESTED_FAMILIES:
        return
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UsageError(f"{what}: a {model.config.model_type!r} model without a linear LM head is not supported")
    ids = (torch.arange(8, device=head.weight.device) * 7 % head.out_features)[None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole = model(input_ids=ids, use_cache=False).logits.float()
            split = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(training)
    if not torch.allclose(whole, split, rtol=1e-4, atol=1e-5):
        raise UsageError(f"{what}: a {model.config.model_type!r} model transforms its logits after the LM head "
                         "(scaling or soft-capping), which the fused distillation loss does not do: not supported")


def position_embeddings(model) -> torch.nn.Module | None:
    """The model's learned position embeddings (GPT-2's wpe), or None where positions have no
    parameters (rotary: GPT-NeoX, Llama, Qwen2; ALiBi), which --freeze_pos_embs cannot freeze.

    Found as the one nn.Embedding of the model body besides the token embeddings, so learned
    positions under another name (OPT's embed_positions) are found too.
    """
    tokens = model.get_input_embeddings()
    found = [m for m in model.base_model.modules() if isinstance(m, torch.nn.Embedding) and m is not tokens]
    return found[0] if len(found) == 1 else None


def tied_head_keys(model) -> set[str]:
    """The state-dict keys of the LM head when it shares the token embeddings' weight: a state dict
    may leave them out (scripts/extract.py does). Names differ by family (lm_head, embed_out)."""
    head, tokens = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not tokens.weight:
        return set()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def attached_rows(width: int, attach: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask (B, 1, W + E, W + E), position_ids (B, W + E)) for a batch of W positions followed
    by E attached ones: column W + e is read after position attach[:, e] of its own row, at the position
    after it, attending to positions 0..attach and itself only (attach -1: padding, attending to itself).
    The W positions stay causal among themselves and see no attached one, so their rows are those of the
    batch alone. The mask is additive (0 or dtype's lowest) in the model's dtype: every tested family,
    eager or SDPA, takes a 4-D mask as it is (tested against a separate forward per attached position).
    """
    batch, extra = attach.shape
    total = width + extra
    cols = torch.arange(total, device=attach.device)
    real = cols[:width, None] >= cols[None, :]  # (W, W + E): causal, so no attached position (columns >= W)
    own = cols[width:, None] == cols[None, :]  # (E, W + E)
    attached = (cols[None, None, :] <= attach[:, :, None]) | own  # (B, E, W + E)
    allowed = torch.cat([real.expand(batch, width, total), attached], 1)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attach.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    positions = torch.cat([cols[:width].expand(batch, width), (attach + 1).clamp(min=0)], 1)
    return mask, positions


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
    missing = [k for k in missing if k not in tied_head_keys(model)]
    if missing or unexpected:
        raise UsageError(f"{source} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_student(config, family: str = AUTO, weights: str | None = None):
    """A float32 student of `config` (of `family` unless auto): random, or initialised from a model
    folder (of the config's family) or a weights file."""
    check_family(config.model_type, family, "student config")
    if weights is None:
        return from_config(config)
    what = f"--student_pretrained_weights {weights!r}"
    if not Path(weights).exists():
        raise UsageError(f"cannot load {what}: No such file or directory")
    if Path(weights).is_dir():
        found = pretrained_config(weights, "--student_pretrained_weights").model_type
        if found != config.model_type:
            raise UsageError(f"{what} is a {found!r} model, but the student config is a {config.model_type!r} one")
        return _from_pretrained(weights, config, "--student_pretrained_weights", torch.float32)
    student = from_config(config)
    try:
        load_state(student, read_state_dict(weights), weights)
    except UsageError as err:
        raise UsageError(f"cannot load {what}: {err}") from err
    return student
