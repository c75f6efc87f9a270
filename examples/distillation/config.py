"""train.py's flags, read once into one settings object that nothing changes afterwards.

The defaults ARE the recommended recipe (README, "Recommended recipe"): `RECIPE` below is the one
place it is written. run_distill.sh passes only what its user sets, and the benchmarks import
`RECIPE` instead of restating it; tests/examples/distillation/test_config.py and tests/test_run_distill.py
fail if any of them drift apart.

`parse_config(argv)` parses, checks every flag that can be checked without loading anything,
and resolves the automatic ones (precision, compile, DataLoader workers, a torchrun restart
turning into --resume) so that the namespace it returns says what the run does.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from distil_ja.cli import ArgumentParser, UsageError
from losses import KD_LOSSES, KdSpec, TaidSchedule
from models import AUTO, TYPE_CHOICES

# The recommended recipe (bench/quality.py --size tiny over 3 seeds; README "Recommended recipe").
# batch_size x gradient_accumulation_steps is per process: 8 x 16 x 4 GPUs = 512 sequences a step.
RECIPE = {
    "temperature": 1.0,  # T=1 beat T=2 at every seed
    "alpha_ce": 5.0,  # the KD term
    "alpha_clm": 2.0,
    "alpha_mse": 0.0,
    "alpha_cos": 1.0,
    "learning_rate": 5e-4,
    "warmup_prop": 0.05,
    "weight_decay": 0.01,
    "batch_size": 8,
    "gradient_accumulation_steps": 16,
}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOSS_FLAGS = ("alpha_ce", "alpha_clm", "alpha_mse", "alpha_cos")

# Settings a resumed run may change; any other difference from parameters.json is refused.
# The types only check the families the configs name (runs before `auto` recorded "gpt2").
RESUMABLE_CHANGES = {"resume", "force", "dump_path", "max_steps", "n_epoch", "log_interval", "checkpoint_interval",
                     "keep_checkpoints", "max_nonfinite", "eval_interval", "num_workers", "compile",
                     "compile_mode", "student_type", "teacher_type", "plots", "shard_teacher"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Distil a causal-LM teacher into a small student (or train the student alone with "
                    "--alpha_clm only).\n\n"
                    "    torchrun --nproc_per_node 4 examples/distillation/train.py --n_gpu 4 --data_file DIR \\\n"
                    "        --student_config CONFIG.json --teacher_name TEACHER\n\n"
                    "Defaults are the recommended recipe. Exit status: 0 done, 1 bad data, 2 bad arguments or "
                    "models, 3 training stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--dump_path", default="checkpoints/distilgpt2-ja", help="Output directory.")
    io.add_argument("--force", action="store_true", help="Delete an existing --dump_path and start afresh.")
    io.add_argument("--resume", action="store_true",
                    help="Continue the run in --dump_path exactly from its newest checkpoint.")
    io.add_argument("--data_file", nargs="+", required=True,
                    help="binarize.py output directory (manifest + shards), or one or more .pickle shards.")

    models = parser.add_argument_group("models")
    models.add_argument("--student_type", choices=TYPE_CHOICES, default=AUTO,
                        help="Model family of the student: auto (default) takes it from the config's model_type; "
                             "a named family refuses a config of another one.")
    models.add_argument("--student_config", required=True,
                        help="Config JSON of the student, any causal-LM family (its model_type picks the class).")
    models.add_argument("--student_pretrained_weights", default=None,
                        help="Initial student weights: a state-dict file (scripts/extract.py) or a model directory.")
    models.add_argument("--teacher_type", choices=TYPE_CHOICES, default=AUTO,
                        help="Model family of the teacher: auto (default) takes it from its config; "
                             "a named family refuses a teacher of another one.")
    models.add_argument("--teacher_name", default=None,
                        help="Teacher: hub name or local directory. Omit to train the student without a teacher.")
    models.add_argument("--teacher_logits", default=None, metavar="DIR",
                        help="An offline teacher: the output of scripts/dump_teacher_logits.py, read instead of running "
                             "a teacher (excludes --teacher_name; needs --alpha_mse 0 --alpha_cos 0).")
    models.add_argument("--tokenizer_name", default=None,
                        help="Tokenizer: hub name or directory (default: the teacher's, or the one saved in --teacher_logits).")

    loss = parser.add_argument_group("losses (weights of the terms; defaults: the recommended recipe)")
    loss.add_argument("--temperature", type=float, help="Softmax temperature of the KD term.")
    loss.add_argument("--alpha_ce", type=float, help="The KD term: T^2 * divergence(teacher_T, student_T), see --kd_loss.")
    loss.add_argument("--kd_loss", choices=KD_LOSSES, default="fkl",
                      help="The KD term's divergence: fkl KL(t||s) (default), rkl KL(s||t), jsd (generalised "
                           "Jensen-Shannon, --kd_beta), skew_fkl / skew_rkl (DistiLLM, --kd_skew), tvd (total "
                           "variation), taid (TAID: KL to an interpolation of the detached student and the teacher, "
                           "--taid_*), akl (AKL: forward and reverse KL weighted by the head/tail gap, --akl_mu).")
    loss.add_argument("--kd_beta", type=float, default=0.5,
                      help="jsd: the teacher's weight in the mixture, in [0, 1]; 0 is fkl and 1 is rkl (TRL's ends).")
    loss.add_argument("--kd_skew", type=float, default=0.1, help="skew_fkl / skew_rkl: the skew alpha, in (0, 1).")
    loss.add_argument("--taid_t_start", type=float, default=0.4,
                      help="taid: the interpolation weight of the teacher at the first step (0: the student itself).")
    loss.add_argument("--taid_t_end", type=float, default=1.0,
                      help="taid: the weight the linear path reaches at the last step (1: the teacher itself).")
    loss.add_argument("--taid_alpha", type=float, default=5e-4,
                      help="taid: the rate at which t moves ahead of the linear path while the loss falls (0: linear).")
    loss.add_argument("--taid_beta", type=float, default=0.99,
                      help="taid: momentum of the relative change of the loss that drives t, in [0, 1).")
    loss.add_argument("--akl_mu", type=float, default=0.5,
                      help="akl: the teacher's probability mass that makes the head, in (0, 1).")
    loss.add_argument("--alpha_clm", type=float, help="Next-token cross-entropy on the data.")
    loss.add_argument("--alpha_mse", type=float, help="MSE between student and teacher logits.")
    loss.add_argument("--alpha_cos", type=float, help="1 - cosine of the last hidden states (a learned projection "
                      "maps a narrower student to the teacher's width).")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--freeze_pos_embs", action="store_true", help="Keep the student's position embeddings fixed.")
    opt.add_argument("--n_epoch", type=int, default=3)
    opt.add_argument("--max_steps", type=int, default=0, help="Optimizer steps to run; overrides --n_epoch when > 0.")
    opt.add_argument("--batch_size", type=int, help="Sequences per micro-batch per process.")
    opt.add_argument("--group_by_size", action=argparse.BooleanOptionalAction, default=True,
                     help="Batch sequences of similar length together (on by default).")
    opt.add_argument("--gradient_accumulation_steps", type=int, help="Micro-batches per optimizer step.")
    opt.add_argument("--warmup_prop", type=float, help="Fraction of the steps used for linear warm-up.")
    opt.add_argument("--weight_decay", type=float, help="AdamW weight decay of the matrices (not biases, not norms).")
    opt.add_argument("--learning_rate", type=float)
    opt.add_argument("--adam_epsilon", type=float, default=1e-6)
    opt.add_argument("--max_grad_norm", type=float, default=5.0)
    opt.add_argument("--max_nonfinite", type=int, default=10,
                     help="Stop after this many consecutive steps with non-finite gradients (each is skipped).")
    parser.set_defaults(**RECIPE)

    hw = parser.add_argument_group("hardware and precision")
    hw.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="auto (default): bf16 on a GPU that supports it, else fp32. bf16 holds the teacher in "
                         "bfloat16; fp16 uses a gradient scaler.")
    hw.add_argument("--bf16", action="store_true", help="Alias of --precision bf16.")
    hw.add_argument("--fp16", action="store_true", help="Alias of --precision fp16.")
    hw.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the student, the teacher and the fused loss (default: on with CUDA, off on the CPU).")
    hw.add_argument("--compile_mode", choices=COMPILE_MODES, default=None,
                    help="torch.compile's mode (default: torch's default).")
    hw.add_argument("--fused_loss", action=argparse.BooleanOptionalAction, default=True,
                    help="LM-head matmul and the KD/CLM/MSE terms with their gradient in one chunked pass: no "
                         "batch x seq x vocab logits (on by default).")
    hw.add_argument("--pad_multiple", type=int, default=64,
                    help="Pad each micro-batch's length up to a multiple of this (capped at the longest "
                         "sequence), so compiled graphs are reused; 1 pads to the longest row only.")
    hw.add_argument("--num_workers", type=int, default=None,
                    help="DataLoader worker processes (default: 2 with CUDA, 0 on the CPU); batches are the same.")
    hw.add_argument("--n_gpu", type=int, default=1, help="GPUs (processes) per node; 0 trains on the CPU.")
    hw.add_argument("--shard_teacher", action="store_true",
                    help="Split the frozen teacher's decoder blocks between the processes of each node (FSDP2), "
                         "for a teacher too large for one GPU; the student stays DDP (README, Scaling).")
    hw.add_argument("--seed", type=int, default=56)

    rec = parser.add_argument_group("records")
    rec.add_argument("--log_interval", type=int, default=100, help="Optimizer steps between log lines.")
    rec.add_argument("--checkpoint_interval", type=int, default=2000,
                     help="Optimizer steps between checkpoints (0: only at the end).")
    rec.add_argument("--keep_checkpoints", type=int, default=3, help="Newest checkpoints kept on disk.")
    rec.add_argument("--eval_data", nargs="+", default=None,
                     help="Held-out text (tokenized like binarize.py) or binarize.py output: the student's "
                          "perplexity goes to tensorboard (eval/perplexity) and dump_path/eval_results.json.")
    rec.add_argument("--eval_interval", type=int, default=0,
                     help="Optimizer steps between evaluations on --eval_data (0: only at the end).")
    rec.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                     help="Draw the loss terms and held-out perplexity against tokens seen to "
                          "dump_path/curves.png at each evaluation and at the end (on by default; "
                          "without matplotlib: one warning, no plots).")
    return parser


def resolve_precision(choice: str | None, bf16: bool, fp16: bool, n_gpu: int) -> str:
    """--precision with its aliases; `auto` is bf16 on a GPU that has it, fp32 elsewhere."""
    aliases = [name for name, given in (("bf16", bf16), ("fp16", fp16)) if given]
    if len(aliases) > 1:
        raise UsageError("--fp16 and --bf16 exclude each other")
    if aliases and choice not in (None, aliases[0]):
        raise UsageError(f"--{aliases[0]} contradicts --precision {choice}")
    choice = aliases[0] if aliases else (choice or "auto")
    if choice != "auto":
        return choice
    return "bf16" if n_gpu > 0 and native_bf16() else "fp32"  # fp16 is opt-in: it needs loss scaling


def native_bf16() -> bool:
    """Whether this process's GPU computes in bf16 natively (Ampere and newer).

    Read from the device properties of LOCAL_RANK's GPU: no CUDA context is created (on GPU 0 by
    every rank, say) and emulated bf16 on older cards, slower than fp32, does not count.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        return False  # init_distributed says what is wrong
    return torch.cuda.get_device_capability(local_rank)[0] >= 8


def check_arguments(params) -> None:
    alphas = {k: getattr(params, k) for k in LOSS_FLAGS}
    if any(a < 0 for a in alphas.values()) or sum(alphas.values()) <= 0:
        raise UsageError(f"loss weights must be >= 0 with a positive sum, got {alphas}")
    needs_teacher = [f"--{k}" for k in ("alpha_ce", "alpha_mse", "alpha_cos") if alphas[k] > 0]
    if params.teacher_logits is not None:
        if params.teacher_name is not None:
            raise UsageError("--teacher_logits and --teacher_name exclude each other: the dumped logits are the teacher")
        needs_model = [f"--{k}" for k in ("alpha_mse", "alpha_cos") if alphas[k] > 0]
        if needs_model:
            raise UsageError(f"{', '.join(needs_model)} need the teacher model, which --teacher_logits replaces: "
                             "set them to 0")
    if params.shard_teacher and params.teacher_name is None:
        raise UsageError("--shard_teacher needs a teacher model (--teacher_name)")
    no_teacher = params.teacher_name is None and params.teacher_logits is None
    if no_teacher and needs_teacher:
        raise UsageError(f"{', '.join(needs_teacher)} need a teacher: pass --teacher_name (or --teacher_logits) "
                         "or set them to 0")
    if no_teacher and params.tokenizer_name is None:
        raise UsageError("without a teacher, name the tokenizer with --tokenizer_name")
    try:
        kd_spec(params), taid_schedule(params)  # they check their own ranges
    except ValueError as err:
        raise UsageError(str(err)) from None
    if params.compile_mode is not None and params.compile is False:
        raise UsageError("--compile_mode needs compilation: drop --no-compile")
    if params.resume and params.force:
        raise UsageError("--resume continues --dump_path, --force deletes it: pick one")
    for name in ("batch_size", "gradient_accumulation_steps", "log_interval", "max_nonfinite", "keep_checkpoints",
                 "pad_multiple"):
        if getattr(params, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if params.num_workers is not None and params.num_workers < 0:
        raise UsageError("--num_workers must be >= 0")
    if params.n_gpu < 0:
        raise UsageError("--n_gpu must be >= 0")
    if not 0 <= params.warmup_prop < 1:
        raise UsageError("--warmup_prop must be in [0, 1)")
    if params.max_steps <= 0 and params.n_epoch < 1:
        raise UsageError("give --n_epoch >= 1 or --max_steps > 0")
    if params.eval_interval < 0 or (params.eval_interval > 0 and not params.eval_data):
        raise UsageError("--eval_interval must be >= 0 and needs --eval_data")


def parse_config(argv=None) -> argparse.Namespace:
    """Parse, check and resolve train.py's flags: the settings of the run, as parameters.json records them."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    bf16, fp16 = args.bf16, args.fp16
    del args.bf16, args.fp16  # aliases: the resolved --precision is what the run (and parameters.json) has
    args.precision = resolve_precision(args.precision, bf16, fp16, args.n_gpu)
    on_gpu = args.n_gpu > 0
    if args.compile is None:
        args.compile = on_gpu
    if args.num_workers is None:
        args.num_workers = 2 if on_gpu else 0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if restarted and (Path(args.dump_path) / "parameters.json").exists():
        args.resume, args.force = True, False  # torchrun restarted this worker: continue the run
    return args


def kd_spec(params) -> KdSpec:
    """The KD objective of the run's flags."""
    return KdSpec(params.kd_loss, params.temperature, params.kd_beta, params.kd_skew, params.akl_mu)


def taid_schedule(params) -> TaidSchedule | None:
    """TAID's schedule of t, for --kd_loss taid (None otherwise)."""
    if params.kd_loss != "taid":
        return None
    return TaidSchedule(params.taid_t_start, params.taid_t_end, params.taid_alpha, params.taid_beta)


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def saved_settings(dump_path) -> dict:
    """parameters.json of a run, with the precision of runs recorded before --precision existed."""
    saved = json.loads((Path(dump_path) / "parameters.json").read_text())
    if "precision" not in saved and ("bf16" in saved or "fp16" in saved):
        saved["precision"] = "bf16" if saved.pop("bf16", False) else "fp16" if saved.pop("fp16", False) else "fp32"
    return saved
