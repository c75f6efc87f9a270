#!/usr/bin/env python
"""Export a trained student as a self-contained Hugging Face folder.

    python examples/distillation/export.py --checkpoint checkpoints/distilgpt2-ja \
        --tokenizer rinna/japanese-gpt2-medium --output_dir exports/distilgpt2-ja

--checkpoint: a dump_path (its final model, else its newest checkpoint), a
`checkpoint_stepNNNNNNNN/` folder, a `.pt`/`.pth`/`.safetensors` state dict (e.g. from
scripts/extract.py: give --config), or any GPT-2 model folder.

The output loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` and nothing else:
    model.safetensors, config.json     bos 1, eos 2, pad 3 (the tokenizer's ids)
    generation_config.json             sampling defaults
    tokenizer.json + tokenizer_config.json + special_tokens_map.json
                                       the teacher's unigram model with NFKC + lowercasing in its
                                       normalizer (the same ids as binarize.py, uppercase included),
                                       `<s>` prepended and no `</s>` appended (generation prompts)
    spiece.model                       the sentencepiece model (evaluate.py / binarize.py --tokenizer DIR)
    README.md                          model card: recipe (parameters.json) and perplexities

Exit status: 0 done, 2 bad arguments or unusable inputs.
"""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data_prep

import torch  # noqa: E402

logger = logging.getLogger("distillation.export")

PROBE_TEXT = "GPUとPythonで東京のAIモデルをTrainする。ＡＢＣ"


class ExportError(Exception):
    """Unusable checkpoint, tokenizer or output folder; the message says which."""


# ---- weights ----------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable JSON ({err})") from err


def load_state_file(path: Path) -> dict:
    """Student weights from a state-dict file or a training checkpoint file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file can raise almost anything
        raise ExportError(f"{path}: unreadable weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("student"), dict):
        state = state["student"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path}: not a state dict nor a training checkpoint")
    return state


def newest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("checkpoint_step*") if p.name[len("checkpoint_step"):].isdigit()
                   or (p.suffix == ".pt" and p.stem[len("checkpoint_step"):].isdigit()))
    return found[-1] if found else None


def resolve_checkpoint(checkpoint: str) -> tuple[Path | None, Path | None, Path | None]:
    """(model folder to from_pretrained, or weights file, dump_path for records)."""
    path = Path(checkpoint)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "training_state.pt").is_file():  # checkpoint_stepNNNNNNNN/
        return None, path / "training_state.pt", path.parent
    if path.is_dir() and (path / "config.json").is_file() and any(
            (path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return path, None, path
    if path.is_dir():
        ckpt = newest_checkpoint(path)
        if ckpt is None:
            raise ExportError(f"{path}: neither a model folder nor a dump_path with checkpoints")
        logger.info("%s has no final model: exporting its newest checkpoint %s", path, ckpt.name)
        return None, (ckpt / "training_state.pt" if ckpt.is_dir() else ckpt), path
    parent = path.parent
    dump = parent.parent if (parent / "training_state.pt").is_file() else parent
    return None, path, dump if (dump / "parameters.json").is_file() else None


def student_config_for(weights_file: Path, dump_path: Path | None, config: str | None):
    from transformers import GPT2Config

    candidates = [Path(config)] if config else []
    if dump_path is not None:
        candidates.append(dump_path / "config.json")
        params_file = dump_path / "parameters.json"
        if params_file.is_file():
            student_config = read_json(params_file).get("student_config")
            if student_config:
                candidates.append(Path(student_config))
    for candidate in candidates:
        if candidate.is_file():
            try:
                return GPT2Config.from_json_file(str(candidate))
            except (OSError, ValueError) as err:
                raise ExportError(f"{candidate}: unreadable config ({err})") from err
        if config and candidate == Path(config):
            raise ExportError(f"--config {config}: no such file")
    raise ExportError(f"no config for {weights_file}: pass --config STUDENT_CONFIG_JSON")


def load_student(checkpoint: str, config: str | None = None):
    """(GPT2LMHeadModel, dump_path or None)."""
    from transformers import GPT2LMHeadModel

    folder, weights_file, dump_path = resolve_checkpoint(checkpoint)
    if folder is not None and weights_file is None:
        try:
            return GPT2LMHeadModel.from_pretrained(folder), dump_path
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot load the model in {folder}: {err}") from err
    model = GPT2LMHeadModel(student_config_for(weights_file, dump_path, config))
    missing, unexpected = model.load_state_dict(load_state_file(weights_file), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ExportError(f"{weights_file} does not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    logger.info("Loaded the student from %s", weights_file)
    return model, dump_path


# ---- tokenizer --------------------------------------------------------------------------


def export_tokenizer(source: str, output_dir: Path, model_max_length: int):
    """Save a tokenizer that lowercases itself and does not append </s>; returns it."""
    from tokenizers import Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    from data_prep.tokenization import load_tokenizer

    try:
        tok = load_tokenizer(source)  # with data_prep's Unigram unk-id fix, baked into tokenizer.json below
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/name
        raise ExportError(f"cannot load tokenizer {source!r}: {str(err).strip().splitlines()[0]}") from err
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ExportError(f"tokenizer {source!r} has no fast (tokenizers) backend to export")
    specials = {name: getattr(tok, name) for name in
                ("unk_token", "bos_token", "eos_token", "pad_token", "cls_token", "sep_token", "mask_token")}
    if None in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id):
        raise ExportError(f"tokenizer {source!r} must define <unk>, <s>, </s> and [PAD]")

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    if "Lowercase" not in json.dumps(json.loads(backend.to_str()).get("normalizer")):
        steps = [normalizers.NFKC(), normalizers.Lowercase()]  # = data_prep.tokenization.normalize_text
        backend.normalizer = normalizers.Sequence(steps + ([backend.normalizer] if backend.normalizer else []))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                   **{k: v for k, v in specials.items() if v is not None})
    fast.save_pretrained(str(output_dir))
    config_file = output_dir / "tokenizer_config.json"
    config = read_json(config_file)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads on transformers 4 and 5 alike
    config.pop("backend", None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output_dir / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in specials.items() if v is not None}, indent=2, ensure_ascii=False) + "\n")

    from data_prep.tokenization import resolve_spiece

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
        raise ExportError(f"exported tokenizer gives {ids[:3]}...{ids[-3:]}: expected <s> first and no </s>")
    if (output_dir / "spiece.model").is_file():
        from data_prep.tokenization import DocumentEncoder

        expected = DocumentEncoder(str(output_dir)).encode_document([PROBE_TEXT])[0][:-1]
        if ids != expected:
            raise ExportError(f"exported tokenizer disagrees with binarize.py on {PROBE_TEXT!r}: {ids} != {expected}")


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


def model_card(model, params: dict | None, perplexities: dict[str, float], eval_data: str | None, name: str) -> str:
    c = model.config
    lines = [
        "---", "language: ja", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- gpt2", "- distillation", "---", "",
        f"# {name}", "",
        f"A Japanese GPT-2 student ({c.n_layer} layers, d={c.n_embd}, {c.n_head} heads, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, context {c.n_positions}, vocabulary {c.vocab_size}) "
        "distilled with distil-ja (a CLM port of the Hugging Face distillation example).", "",
        "## Usage", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "", f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'print(pipeline("text-generation", model=model, tokenizer=tok)("今日は", max_new_tokens=40)[0]["generated_text"])',
        "```", "",
        "The tokenizer lowercases its input itself (the vocabulary is lowercase), prepends `<s>` and does not "
        "append `</s>`, so prompts continue as the model was trained (`<s>` document `</s>`). "
        "Special ids: `<unk>` 0, `<s>` 1, `</s>` 2, `[PAD]` 3.", "",
    ]
    if params:
        keys = ["teacher_name", "student_config", "student_pretrained_weights", "data_file", "temperature",
                "alpha_ce", "alpha_clm", "alpha_mse", "alpha_cos", "learning_rate", "batch_size",
                "gradient_accumulation_steps", "n_epoch", "max_steps", "warmup_prop", "weight_decay",
                "world_size", "fp16", "bf16", "seed"]
        lines += ["## Training recipe", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(params[k], ensure_ascii=False)} |" for k in keys if k in params]
        lines += [""]
    if perplexities:
        lines += ["## Perplexity", ""]
        if eval_data:
            lines += [f"Held-out data: {eval_data}. Token-weighted perplexity (examples/distillation/evaluate.py).", ""]
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in perplexities.items() if isinstance(v, (int, float))]
        lines += [""]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------


def export(checkpoint: str, tokenizer: str | None, output_dir: str, config: str | None = None,
           perplexity_files: list[str] = (), eval_data: str | None = None, dtype: str = "float32",
           force: bool = False, name: str | None = None) -> Path:
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; pass --force to overwrite it")
    model, dump_path = load_student(checkpoint, config)
    params = None
    if dump_path is not None and (dump_path / "parameters.json").is_file():
        params = read_json(dump_path / "parameters.json")
    if tokenizer is None:
        tokenizer = (params or {}).get("tokenizer_name") or (params or {}).get("teacher_name")
        if tokenizer is None:
            raise ExportError("name the tokenizer with --tokenizer (no parameters.json says which)")
        logger.info("Tokenizer from parameters.json: %s", tokenizer)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = export_tokenizer(tokenizer, out, model.config.n_positions)
    if len(tok) > model.config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {model.config.vocab_size}")
    check_tokenizer(out)

    from transformers import GenerationConfig

    for name_, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                         ("pad_token_id", tok.pad_token_id)):
        setattr(model.config, name_, value)
    model.config.architectures = ["GPT2LMHeadModel"]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, top_k=50, top_p=0.95, max_new_tokens=64)
    model.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)

    perplexities = read_perplexities(list(perplexity_files), dump_path)
    card = model_card(model, params, perplexities, eval_data, name or out.name)
    (out / "README.md").write_text(card + "\n", encoding="utf-8")
    logger.info("Exported %s to %s (%s)", checkpoint, out, ", ".join(sorted(p.name for p in out.iterdir())))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    try:
        export(args.checkpoint, args.tokenizer, args.output_dir, args.config, args.perplexities, args.eval_data,
               args.dtype, args.force, args.name)
    except ExportError as err:
        logger.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
