#!/usr/bin/env python
"""Export a trained student as a self-contained Hugging Face folder.

    python examples/distillation/export.py --checkpoint checkpoints/distilgpt2-ja \
        --tokenizer rinna/japanese-gpt2-medium --output_dir exports/distilgpt2-ja

--checkpoint: a dump_path (its final model, else its newest checkpoint), a
`checkpoint_stepNNNNNNNN/` folder, a `.pt`/`.pth`/`.safetensors` state dict (e.g. from
scripts/extract.py: give --config), or any causal-LM model folder (GPT-2, GPT-NeoX, Llama, Qwen2...).

The output loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` and nothing else:
    model.safetensors, config.json     bos, eos and pad: the tokenizer's ids
    generation_config.json             sampling defaults
    tokenizer.json + tokenizer_config.json + special_tokens_map.json
                                       the teacher's unigram model with NFKC + lowercasing in its
                                       normalizer (the same ids as binarize.py, uppercase included),
                                       `<s>` prepended and no `</s>` appended (generation prompts)
    spiece.model                       the sentencepiece model (evaluate.py / binarize.py --tokenizer DIR)
    README.md                          model card: architecture, recipe (parameters.json) and perplexities

Exit status: 0 done, 2 bad arguments or unusable inputs.
"""

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import models  # noqa: E402
from checkpoint import STATE_FILE, list_checkpoints  # noqa: E402
from distil_ja import fileio, outputs  # noqa: E402
from distil_ja.cli import ArgumentParser, UsageError, first_line, run_command, setup_logging  # noqa: E402
from distil_ja.tokenization import DocumentEncoder, load_tokenizer, resolve_spiece  # noqa: E402

logger = logging.getLogger("distillation.export")

PROBE_TEXT = "GPUとPythonで東京のAIモデルをTrainする。ＡＢＣ"


# ---- weights ----------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable JSON ({err})") from err


def resolve_checkpoint(checkpoint: str) -> tuple[Path | None, Path | None, Path | None]:
    """(model folder to from_pretrained, or weights file, dump_path for records)."""
    path = Path(checkpoint)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if path.is_dir() and (path / STATE_FILE).is_file():  # checkpoint_stepNNNNNNNN/
        return None, path / STATE_FILE, path.parent
    if path.is_dir() and (path / "config.json").is_file() and any(
            (path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return path, None, path
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UsageError(f"{path}: neither a model folder nor a dump_path with checkpoints")
        logger.info("%s has no final model: exporting its newest checkpoint %s", path, found[0].name)
        return None, found[0] / STATE_FILE, path
    parent = path.parent
    dump = parent.parent if (parent / STATE_FILE).is_file() else parent
    return None, path, dump if (dump / "parameters.json").is_file() else None


def run_params(dump_path: Path | None) -> dict:
    """The run's parameters.json, or {} (a bare weights file, a model folder from elsewhere)."""
    if dump_path is not None and (dump_path / "parameters.json").is_file():
        return read_json(dump_path / "parameters.json")
    return {}


def student_config_for(weights_file: Path, dump_path: Path | None, config: str | None, params: dict, family: str):
    candidates = [Path(config)] if config else []
    if dump_path is not None:
        candidates.append(dump_path / "config.json")
        if params.get("student_config"):
            candidates.append(Path(params["student_config"]))
    for candidate in candidates:
        if candidate.is_file():
            return models.load_config(candidate, family, "config")
        if config and candidate == Path(config):
            raise UsageError(f"--config {config}: no such file")
    raise UsageError(f"no config for {weights_file}: pass --config STUDENT_CONFIG_JSON")


def load_student(checkpoint: str, config: str | None = None):
    """(the student model, its dump_path or None, its parameters.json or {}); a folder of another
    family is refused."""
    folder, weights_file, dump_path = resolve_checkpoint(checkpoint)
    params = run_params(dump_path)
    family = params.get("student_type", models.AUTO)
    if folder is not None:
        return models.load_pretrained(str(folder), family, "model"), dump_path, params
    model = models.from_config(student_config_for(weights_file, dump_path, config, params, family))
    models.load_state(model, models.read_state_dict(weights_file), weights_file)
    logger.info("Loaded the student from %s", weights_file)
    return model, dump_path, params


# ---- tokenizer --------------------------------------------------------------------------


def export_tokenizer(source: str, output_dir: Path, model_max_length: int | None):
    """Save a tokenizer that lowercases itself and does not append </s>; returns it."""
    from tokenizers import Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        tok = load_tokenizer(source)  # with data_prep's Unigram unk-id fix, baked into tokenizer.json below
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/name
        raise UsageError(f"cannot load tokenizer {source!r}: {first_line(err)}") from err
    if getattr(tok, "backend_tokenizer", None) is None:
        raise UsageError(f"tokenizer {source!r} has no fast (tokenizers) backend to export")
    specials = {name: getattr(tok, name) for name in
                ("unk_token", "bos_token", "eos_token", "pad_token", "cls_token", "sep_token", "mask_token")}
    if None in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id):
        raise UsageError(f"tokenizer {source!r} must define <unk>, <s>, </s> and [PAD]")

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    if "Lowercase" not in json.dumps(json.loads(backend.to_str()).get("normalizer")):
        steps = [normalizers.NFKC(), normalizers.Lowercase()]  # = distil_ja.tokenization.normalize_text
        backend.normalizer = normalizers.Sequence(steps + ([backend.normalizer] if backend.normalizer else []))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    limit = {"model_max_length": model_max_length} if model_max_length else {}  # none: transformers' default
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **limit,
                                   **{k: v for k, v in specials.items() if v is not None})
    fast.save_pretrained(str(output_dir))
    config_file = output_dir / "tokenizer_config.json"
    config = read_json(config_file)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads on transformers 4 and 5 alike
    config.pop("backend", None)
    fileio.write_json(config_file, config)
    fileio.write_json(output_dir / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})

    try:
        shutil.copyfile(resolve_spiece(source), output_dir / "spiece.model")
    except Exception as err:  # noqa: BLE001 - no sentencepiece file (or no hub): the export works without
        logger.warning("no spiece.model copied from %s (%s): evaluate.py will tokenize through tokenizer.json",
                       source, err)
    return fast


def check_tokenizer(output_dir: Path) -> None:
    """The saved tokenizer, loaded as users will, must match binarize.py's ids on uppercase text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(output_dir))
    ids = tok(PROBE_TEXT)["input_ids"]
    if ids[-1] == tok.eos_token_id or ids[0] != tok.bos_token_id:
        raise UsageError(f"exported tokenizer gives {ids[:3]}...{ids[-3:]}: expected <s> first and no </s>")
    if (output_dir / "spiece.model").is_file():
        expected = DocumentEncoder(str(output_dir)).encode_document([PROBE_TEXT])[0][:-1]
        if ids != expected:
            raise UsageError(f"exported tokenizer disagrees with binarize.py on {PROBE_TEXT!r}: {ids} != {expected}")


# ---- records ----------------------------------------------------------------------------


def read_perplexities(paths: list[str], dump_path: Path | None) -> dict[str, float]:
    """Perplexities from evaluate.py --json files, flat {label: value} files and eval_results.json."""
    found = {}
    if dump_path is not None and (dump_path / "eval_results.json").is_file():
        results = read_json(dump_path / "eval_results.json")
        found[f"this model (in training, step {results.get('step')})"] = results.get("perplexity")
    for path in paths:
        data = read_json(Path(path))
        data = data.get("perplexity", data) if isinstance(data, dict) else {}
        found.update({k: v for k, v in data.items() if isinstance(v, (int, float))})
    return found


def architecture(model) -> str:
    """The model's class and shape in words, for the card: "LlamaForCausalLM (llama; 6 layers, d=1024, ...)"."""
    c = model.config
    shape = [f"{c.num_hidden_layers} layers", f"d={c.hidden_size}", f"{c.num_attention_heads} heads"]
    kv_heads = getattr(c, "num_key_value_heads", None)
    if kv_heads and kv_heads != c.num_attention_heads:
        shape.append(f"{kv_heads} key/value heads")
    shape += [f"{model.num_parameters() / 1e6:.1f}M parameters"]
    if models.max_positions(c):
        shape.append(f"context {models.max_positions(c)}")
    shape.append(f"vocabulary {c.vocab_size}")
    return f"{type(model).__name__} ({c.model_type}; {', '.join(shape)})"


def public_path(value, dump_path: Path | None):
    """A path as the card shows it: relative to the dump path when inside it, else its name alone.

    The card is published with the model: the folders of the machine it was trained on (a home
    folder, a user name) are not. Hub names (org/name that is no local path) and non-paths stay.
    """
    if isinstance(value, list):
        return [public_path(v, dump_path) for v in value]
    if not isinstance(value, str) or not (os.path.isabs(value) or os.path.exists(value)):
        return value
    path = Path(value).resolve()
    if dump_path is not None and path.is_relative_to(dump_path.resolve()):
        return str(path.relative_to(dump_path.resolve())) or "."
    return path.name


def model_card(model, params: dict | None, perplexities: dict[str, float], eval_data: str | None, name: str,
               dump_path: Path | None = None) -> str:
    c = model.config
    lines = [
        "---", "language: ja", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", f"- {c.model_type}", "- distillation", "---", "",
        f"# {name}", "",
        f"A Japanese causal LM student, {architecture(model)}, "
        "distilled with distil-ja (a CLM port of the Hugging Face distillation example).", "",
        "## Usage", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "", f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'print(pipeline("text-generation", model=model, tokenizer=tok)("今日は", max_new_tokens=40)[0]["generated_text"])',
        "```", "",
        "The tokenizer lowercases its input itself (the vocabulary is lowercase), prepends `<s>` and does not "
        "append `</s>`, so prompts continue as the model was trained (`<s>` document `</s>`). "
        f"Special ids (config.json): bos {c.bos_token_id}, eos {c.eos_token_id}, pad {c.pad_token_id}.", "",
    ]
    if params:
        keys = ["teacher_name", "student_config", "student_pretrained_weights", "data_file", "temperature",
                "alpha_ce", "alpha_clm", "alpha_mse", "alpha_cos", "learning_rate", "batch_size",
                "gradient_accumulation_steps", "n_epoch", "max_steps", "warmup_prop", "weight_decay",
                "world_size", "precision", "fp16", "bf16", "seed"]
        lines += ["## Training recipe", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(public_path(params[k], dump_path), ensure_ascii=False)} |"
                  for k in keys if k in params]
        lines += [""]
    if perplexities:
        lines += ["## Perplexity", ""]
        if eval_data:
            lines += [f"Held-out data: {public_path(eval_data, dump_path)}. Token-weighted perplexity "
                      "(examples/distillation/evaluate.py).", ""]
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in perplexities.items() if isinstance(v, (int, float))]
        lines += [""]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------


def export(checkpoint: str, tokenizer: str | None, output_dir: str, config: str | None = None,
           perplexity_files: list[str] = (), eval_data: str | None = None, dtype: str = "float32",
           force: bool = False, name: str | None = None) -> Path:
    out = Path(output_dir)
    replaces = outputs.will_replace(out, force, "--force", "--output_dir")  # the deletion rule (distil_ja.outputs)
    model, dump_path, params = load_student(checkpoint, config)
    if tokenizer is None:
        tokenizer = params.get("tokenizer_name") or params.get("teacher_name")
        if tokenizer is None:
            raise UsageError("name the tokenizer with --tokenizer (no parameters.json says which)")
        logger.info("Tokenizer from parameters.json: %s", tokenizer)

    if replaces:
        logger.info("--force: deleting what %s holds (an earlier export)", out)
        outputs.empty(out)
    outputs.claim(out, "export.py")
    tok = export_tokenizer(tokenizer, out, models.max_positions(model.config))
    if len(tok) > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {model.config.vocab_size}")
    check_tokenizer(out)

    from transformers import GenerationConfig

    for name_, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                         ("pad_token_id", tok.pad_token_id)):
        setattr(model.config, name_, value)
    model.config.architectures = [type(model).__name__]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, top_k=50, top_p=0.95, max_new_tokens=64)
    model.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)

    perplexities = read_perplexities(list(perplexity_files), dump_path)
    card = model_card(model, params, perplexities, eval_data, name or out.name, dump_path)
    (out / "README.md").write_text(card + "\n", encoding="utf-8")
    logger.info("Exported %s to %s (%s)", checkpoint, out, ", ".join(sorted(p.name for p in out.iterdir())))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="dump_path, checkpoint folder/file, or model folder.")
    parser.add_argument("--tokenizer", default=None,
                        help="The teacher's tokenizer (hub name or folder); default: from parameters.json.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", default=None, help="Student config JSON, for a bare state-dict file.")
    parser.add_argument("--perplexities", nargs="*", default=[],
                        help="evaluate.py --json outputs (or flat {label: perplexity} JSON) for the model card.")
    parser.add_argument("--eval_data", default=None, help="What the perplexities were measured on (model card).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--name", default=None, help="Model name in the card (default: the folder name).")
    parser.add_argument("--force", action="store_true", help="Overwrite a non-empty --output_dir.")
    return parser


def main(argv=None) -> int:
    def run(argv):
        args = build_parser().parse_args(argv)
        export(args.checkpoint, args.tokenizer, args.output_dir, args.config, args.perplexities, args.eval_data,
               args.dtype, args.force, args.name)

    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
