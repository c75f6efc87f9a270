#!/usr/bin/env python
"""Initialise a GPT-2 student from some of its teacher's layers.

    python examples/distillation/scripts/extract.py --teacher rinna/japanese-gpt2-medium \
        --student_config examples/distillation/training_configs/distilgpt2-ja.json \
        --dump_checkpoint checkpoints/distilgpt2-ja-init.pth [--layers 0,5,9,14,18,23]

Copies the token and position embeddings, the chosen transformer blocks (in order), the
final layer norm and, when the student does not tie it to the embeddings, the LM head.
Without --layers the blocks are spread evenly over the teacher's depth, first and last
included (24 -> 6: 0,5,9,14,18,23). Teacher and student must have the same width
(n_embd, n_inner) and vocabulary; the student may have fewer positions (the first ones
are kept). The output (.pth/.pt: torch.save; .safetensors) feeds
`train.py --student_pretrained_weights`.

Exit status: 0 done, 2 bad arguments or incompatible models.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("distillation.extract")


class ExtractError(Exception):
    """Incompatible teacher/student or bad arguments; the message says which."""


def default_layers(n_teacher: int, n_student: int) -> list[int]:
    """n_student block indices spread evenly over 0..n_teacher-1, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise ExtractError(f"the student has {n_student} layers, the teacher {n_teacher}: need 1 <= student <= teacher")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ExtractError(f"--layers must be comma-separated integers, got {text!r}") from err


def check_compatible(teacher_config, student_config, layers: list[int]) -> None:
    for name in ("n_embd", "vocab_size"):
        t, s = getattr(teacher_config, name), getattr(student_config, name)
        if t != s:
            raise ExtractError(f"{name} differs: teacher {t}, student {s}; layers can only be copied between equal widths")
    t_inner = teacher_config.n_inner or 4 * teacher_config.n_embd
    s_inner = student_config.n_inner or 4 * student_config.n_embd
    if t_inner != s_inner:
        raise ExtractError(f"n_inner differs: teacher {t_inner}, student {s_inner}")
    if student_config.n_positions > teacher_config.n_positions:
        raise ExtractError(f"the student has more positions ({student_config.n_positions}) "
                           f"than the teacher ({teacher_config.n_positions})")
    if len(layers) != student_config.n_layer:
        raise ExtractError(f"{len(layers)} layer(s) chosen for a {student_config.n_layer}-layer student")
    bad = [i for i in layers if not 0 <= i < teacher_config.n_layer]
    if bad:
        raise ExtractError(f"layer(s) {bad} outside the teacher's 0..{teacher_config.n_layer - 1}")
    if sorted(layers) != layers or len(set(layers)) != len(layers):
        logger.warning("layers %s are not strictly increasing", layers)
    if teacher_config.n_head != student_config.n_head:
        logger.warning("n_head differs (teacher %d, student %d): the copied attention weights are split differently",
                       teacher_config.n_head, student_config.n_head)


def extract(teacher, student_config, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The student's state dict built from `teacher` (a GPT2LMHeadModel)."""
    tconf = teacher.config
    layers = default_layers(tconf.n_layer, student_config.n_layer) if layers is None else list(layers)
    check_compatible(tconf, student_config, layers)
    source = teacher.state_dict()
    state = {
        "transformer.wte.weight": source["transformer.wte.weight"],
        "transformer.wpe.weight": source["transformer.wpe.weight"][: student_config.n_positions],
    }
    for name in ("weight", "bias"):
        state[f"transformer.ln_f.{name}"] = source[f"transformer.ln_f.{name}"]
    for s_index, t_index in enumerate(layers):
        prefix = f"transformer.h.{t_index}."
        for key, value in source.items():
            if key.startswith(prefix) and not key.endswith((".attn.bias", ".attn.masked_bias")):
                state[f"transformer.h.{s_index}.{key[len(prefix):]}"] = value
    if not getattr(student_config, "tie_word_embeddings", True):
        state["lm_head.weight"] = source.get("lm_head.weight", source["transformer.wte.weight"])
    logger.info("Student blocks from teacher blocks %s", layers)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Teacher GPT-2: hub name or folder.")
    parser.add_argument("--student_config", required=True, help="GPT-2 config JSON of the student.")
    parser.add_argument("--layers", default=None, help="Teacher block per student block, e.g. 0,8,16,23.")
    parser.add_argument("--dump_checkpoint", required=True, help="Output: .pth/.pt (torch.save) or .safetensors.")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        try:
            student_config = GPT2Config.from_json_file(args.student_config)
        except (OSError, ValueError) as err:
            raise ExtractError(f"{args.student_config}: unreadable student config ({err})") from err
        try:
            teacher = GPT2LMHeadModel.from_pretrained(args.teacher)
        except (OSError, ValueError) as err:
            raise ExtractError(f"cannot load teacher {args.teacher!r}: {str(err).strip().splitlines()[0]}") from err
        layers = parse_layers(args.layers) if args.layers else None
        state = extract(teacher, student_config, layers)
        save_state(state, Path(args.dump_checkpoint))
    except ExtractError as err:
        logger.error("%s", err)
        sys.exit(2)
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    logger.info("Wrote %s (%.1fM parameters)", args.dump_checkpoint, n_params / 1e6)


if __name__ == "__main__":
    main()
