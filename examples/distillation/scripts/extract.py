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

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

import models  # noqa: E402
from distil_ja import fileio  # noqa: E402
from distil_ja.cli import ArgumentParser, UsageError, run_command, setup_logging  # noqa: E402

logger = logging.getLogger("distillation.extract")
FAMILY = "gpt2"  # the family whose layers this script knows how to copy


def default_layers(n_teacher: int, n_student: int) -> list[int]:
    """n_student block indices spread evenly over 0..n_teacher-1, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise UsageError(f"the student has {n_student} layers, the teacher {n_teacher}: need 1 <= student <= teacher")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from err


def check_compatible(teacher_config, student_config, layers: list[int]) -> None:
    for name in ("n_embd", "vocab_size"):
        t, s = getattr(teacher_config, name), getattr(student_config, name)
        if t != s:
            raise UsageError(f"{name} differs: teacher {t}, student {s}; layers can only be copied between equal widths")
    t_inner = teacher_config.n_inner or 4 * teacher_config.n_embd
    s_inner = student_config.n_inner or 4 * student_config.n_embd
    if t_inner != s_inner:
        raise UsageError(f"n_inner differs: teacher {t_inner}, student {s_inner}")
    if student_config.n_positions > teacher_config.n_positions:
        raise UsageError(f"the student has more positions ({student_config.n_positions}) "
                           f"than the teacher ({teacher_config.n_positions})")
    if len(layers) != student_config.n_layer:
        raise UsageError(f"{len(layers)} layer(s) chosen for a {student_config.n_layer}-layer student")
    bad = [i for i in layers if not 0 <= i < teacher_config.n_layer]
    if bad:
        raise UsageError(f"layer(s) {bad} outside the teacher's 0..{teacher_config.n_layer - 1}")
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
    """Atomically, so a crash never leaves a torn file where train.py will look for weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        fileio.write_bytes(path, save(state))
    else:
        with fileio.atomic_open(path, "wb") as f:
            torch.save(state, f)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Teacher GPT-2: hub name or folder.")
    parser.add_argument("--student_config", required=True, help="GPT-2 config JSON of the student.")
    parser.add_argument("--layers", default=None, help="Teacher block per student block, e.g. 0,8,16,23.")
    parser.add_argument("--dump_checkpoint", required=True, help="Output: .pth/.pt (torch.save) or .safetensors.")
    return parser


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    student_config = models.load_config(args.student_config, FAMILY)
    teacher = models.load_pretrained(args.teacher, FAMILY, "teacher")
    layers = parse_layers(args.layers) if args.layers else None
    state = extract(teacher, student_config, layers)
    save_state(state, Path(args.dump_checkpoint))
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    logger.info("Wrote %s (%.1fM parameters)", args.dump_checkpoint, n_params / 1e6)


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
