#!/usr/bin/env python
"""Initialise a student from some of its teacher's layers, for any causal-LM family.

    python examples/distillation/scripts/extract.py --teacher rinna/japanese-gpt2-medium \
        --student_config examples/distillation/training_configs/distilgpt2-ja.json \
        --dump_checkpoint checkpoints/distilgpt2-ja-init.pth [--layers 0,5,9,14,18,23]

Copies the token embeddings (and learned position embeddings, where the family has them), the
chosen blocks (in order), the final norm and, when the student does not tie it to the
embeddings, the LM head. Without --layers the blocks are spread evenly over the teacher's depth,
first and last included (24 -> 6: 0,5,9,14,18,23). Teacher and student must be of the same
family (GPT-2, GPT-NeoX, Llama, Qwen2 are tested; any family whose blocks are one list works)
with the same widths and vocabulary; the student may have fewer positions (the first ones are
kept). Keeping every layer reproduces the teacher exactly. The output (.pth/.pt: torch.save;
.safetensors) feeds `train.py --student_pretrained_weights`.

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
    """What the configs say; tensor shapes that still differ (intermediate sizes, key/value heads)
    are caught tensor by tensor in extract()."""
    if teacher_config.model_type != student_config.model_type:
        raise UsageError(f"the student config is a {student_config.model_type!r} model and the teacher a "
                         f"{teacher_config.model_type!r} one: layers can only be copied within one family")
    for name in ("hidden_size", "vocab_size"):
        t, s = getattr(teacher_config, name), getattr(student_config, name)
        if t != s:
            raise UsageError(f"{name} differs: teacher {t}, student {s}; layers can only be copied between equal widths")
    t_positions, s_positions = models.max_positions(teacher_config), models.max_positions(student_config)
    if t_positions and s_positions and s_positions > t_positions:
        raise UsageError(f"the student has more positions ({s_positions}) than the teacher ({t_positions})")
    n_teacher = teacher_config.num_hidden_layers
    if len(layers) != student_config.num_hidden_layers:
        raise UsageError(f"{len(layers)} layer(s) chosen for a {student_config.num_hidden_layers}-layer student")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise UsageError(f"layer(s) {bad} outside the teacher's 0..{n_teacher - 1}")
    if sorted(layers) != layers or len(set(layers)) != len(layers):
        logger.warning("layers %s are not strictly increasing", layers)
    if teacher_config.num_attention_heads != student_config.num_attention_heads:
        logger.warning("the number of heads differs (teacher %d, student %d): the copied attention weights are "
                       "split differently", teacher_config.num_attention_heads, student_config.num_attention_heads)


def block_prefix(model) -> str:
    """The state-dict prefix of a model's blocks ("transformer.h.", "gpt_neox.layers.", "model.layers."):
    the module list that holds one entry per hidden layer."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return f"{name}."
    raise UsageError(f"cannot find the blocks of a {model.config.model_type!r} model")


def source_key(key: str, s_prefix: str, t_prefix: str, layers: list[int]) -> str:
    """The teacher key a student key is copied from: block i takes the teacher's block layers[i]."""
    if not key.startswith(s_prefix):
        return key
    index, rest = key[len(s_prefix):].split(".", 1)
    return f"{t_prefix}{layers[int(index)]}.{rest}"


def extract(teacher, student_config, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The student's state dict built from `teacher` (a causal LM of the student's family).

    Driven by the student's own keys and shapes (a model on the meta device: no memory), so every
    key the student needs comes from the teacher or is refused; buffers that are not saved
    (causal masks, rotary frequencies) are not copied. A tied head is left out, as in a checkpoint.
    """
    tconf = teacher.config
    if layers is None:
        layers = default_layers(tconf.num_hidden_layers, student_config.num_hidden_layers)
    layers = list(layers)
    check_compatible(tconf, student_config, layers)
    with torch.device("meta"):
        student = models.from_config(student_config)
    s_prefix, t_prefix = block_prefix(student), block_prefix(teacher)
    positions = models.position_embeddings(student)
    position_keys = {f"{n}.weight" for n, m in student.named_modules() if positions is not None and m is positions}
    head_keys = {f"{n}.{p}" for n, m in student.named_modules() if m is student.get_output_embeddings()
                 for p, _ in m.named_parameters(recurse=False)}
    tied = models.tied_head_keys(student)
    source = teacher.state_dict()
    t_head = teacher.get_output_embeddings()
    state = {}
    for key, target in student.state_dict().items():
        if key in tied:
            continue
        if key in head_keys:  # by module: a tied teacher's state dict may not name its head
            value = getattr(t_head, key.rsplit(".", 1)[1], None)
        else:
            value = source.get(source_key(key, s_prefix, t_prefix, layers))
        if value is None:
            raise UsageError(f"the teacher has nothing for the student's {key}")
        if key in position_keys:
            value = value[: target.shape[0]]  # fewer positions: the first ones
        if value.shape != target.shape:
            raise UsageError(f"{key} has shape {tuple(target.shape)} in the student, {tuple(value.shape)} in the "
                             "teacher; layers can only be copied between equal widths")
        state[key] = value
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
    parser.add_argument("--teacher", required=True, help="Teacher: hub name or folder (any causal-LM family).")
    parser.add_argument("--student_config", required=True, help="Config JSON of the student (the teacher's family).")
    parser.add_argument("--layers", default=None, help="Teacher block per student block, e.g. 0,8,16,23.")
    parser.add_argument("--dump_checkpoint", required=True, help="Output: .pth/.pt (torch.save) or .safetensors.")
    return parser


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    student_config = models.load_config(args.student_config, models.AUTO)
    teacher = models.load_pretrained(args.teacher, models.AUTO, "teacher")
    layers = parse_layers(args.layers) if args.layers else None
    state = extract(teacher, student_config, layers)
    save_state(state, Path(args.dump_checkpoint))
    n_params = sum(v.numel() for v in state.values())
    logger.info("Wrote %s (%.1fM parameters)", args.dump_checkpoint, n_params / 1e6)


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
