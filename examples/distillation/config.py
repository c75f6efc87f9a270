"""train.py's flags, read once into one settings object that nothing changes afterwards.

The defaults ARE the recommended recipe (docs/training.md, "Recommended recipe"): `RECIPE` below is the one
place it is written. run_distill.sh passes only what its user sets, and the benchmarks import
`RECIPE` instead of restating it; tests/examples/distillation/test_config.py and tests/test_run_distill.py
fail if any of them drift apart.

`parse_config(argv)` reads a recipe file (--config FILE.yaml: keys are flag names, flags on the
command line override them) once, parses, checks every flag that can be checked without loading
anything, and resolves the automatic ones (GPUs, precision, compile, DataLoader workers, a torchrun
restart turning into --resume) so that the namespace it returns says what the run does.
"""

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch
import yaml

from distil_ja.cli import ArgumentParser, UsageError
from losses import CROSS_KD, KD_LOSSES, KdSpec, TaidSchedule
from on_policy import Sampling
from models import AUTO, TYPE_CHOICES

# The recommended recipe (bench/quality.py --size tiny over 3 seeds; docs/training.md "Recommended recipe").
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
RESUMABLE_CHANGES = {"resume", "force", "config", "dump_path", "max_steps", "n_epoch", "log_interval",
                     "checkpoint_interval", "keep_checkpoints", "max_nonfinite", "eval_interval", "num_workers",
                     "compile", "compile_mode", "student_type", "teacher_type", "plots", "shard_teacher", "verify"}
VERIFY_CHOICES = ("full", "size")


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
    io.add_argument("--config", default=None, metavar="FILE.yaml",
                    help="A recipe file: keys are these flags' names (alpha_ce: 5.0); a flag given on the command "
                         "line overrides its key (see recipes/).")
    io.add_argument("--dump_path", default="checkpoints/distilgpt2-ja", help="Output directory.")
    io.add_argument("--force", action="store_true", help="Delete an existing --dump_path and start afresh.")
    io.add_argument("--resume", action="store_true",
                    help="Continue the run in --dump_path exactly from its newest checkpoint.")
    io.add_argument("--data_file", nargs="+", required=True,
                    help="binarize.py output directory (manifest + shards), or one or more .pickle shards.")
    io.add_argument("--train_on_prompt", action="store_true",
                    help="A chat corpus (binarize.py on conversations): count every position in every loss term, "
                         "the prompt's too (default: only those that predict an assistant token).")
    io.add_argument("--verify", choices=VERIFY_CHOICES, default="full",
                    help="How the shards and --teacher_logits are checked against their manifests before training: "
                         "full (default) = sizes and sha256 of every byte, size = sizes only. Paid once: a resume "
                         "reuses the run's token cache.")

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
    models.add_argument("--teacher_tokenizer", default=None,
                        help="The teacher's tokenizer (default: the teacher's own). When its vocabulary is not the "
                             "student's (--tokenizer_name), training distils across tokenizers: the data must be "
                             "binarized with binarize.py --teacher_tokenizer of the same tokenizer.")

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
    loss.add_argument("--cross_kd", choices=CROSS_KD, default="chars",
                      help="A teacher of another tokenizer: chars (default) compares the two next-character "
                           "distributions (each character's probability summed over the pieces beginning with it); "
                           "pieces compares the shared pieces exactly plus ULD on the rest (--uld_weight).")
    loss.add_argument("--uld_weight", type=float, default=1.0,
                      help="--cross_kd pieces: the weight of the ULD term (sorted-probability gap) on the pieces the "
                           "two vocabularies do not share, beside the exact divergence on the shared ones.")
    loss.add_argument("--within_pieces", action=argparse.BooleanOptionalAction, default=False,
                      help="--cross_kd chars: the KD term also at the positions that end one character into a "
                           "teacher piece: the teacher's pieces that begin with that character, and the row read "
                           "after it (data binarized with depths; offline, a dump_teacher_logits.py --within_pieces "
                           "dump). Off by default: not yet a gain beyond the seed spread.")
    loss.add_argument("--alpha_clm", type=float, help="Next-token cross-entropy on the data.")
    loss.add_argument("--on_policy_fraction", type=float, default=0.0,
                      help="A chat corpus: the share of optimizer steps on which the student samples the answers to "
                           "the batch's prompts and the KD term is taken on its samples (on-policy distillation, "
                           "GKD; 0, the default: never). Needs a teacher model (--teacher_name).")
    loss.add_argument("--gen_temperature", type=float, default=1.0, help="On-policy steps: sampling temperature.")
    loss.add_argument("--gen_top_p", type=float, default=1.0,
                      help="On-policy steps: nucleus sampling's mass, in (0, 1] (1: the whole distribution).")
    loss.add_argument("--max_new_tokens", type=int, default=128, help="On-policy steps: the longest sampled answer.")
    loss.add_argument("--alpha_mse", type=float, help="MSE between student and teacher logits.")
    loss.add_argument("--alpha_cos", type=float, help="1 - cosine of the last hidden states (a learned projection "
                      "maps a narrower student to the teacher's width).")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--freeze_pos_embs", action="store_true", help="Keep the student's position embeddings fixed.")
    opt.add_argument("--n_epoch", type=int, default=3)
    opt.add_argument("--max_steps", type=int, default=None,
                     help="Optimizer steps to run (>= 1); overrides --n_epoch. Unset: --n_epoch decides.")
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
    hw.add_argument("--n_gpu", type=int, default=None,
                    help="GPUs (processes) per node; 0 trains on the CPU. Default: one GPU per process torchrun "
                         "started on this node (1 without torchrun) where a GPU is visible, else 0.")
    hw.add_argument("--shard_teacher", action="store_true",
                    help="Split the frozen teacher's decoder blocks between the processes of each node (FSDP2), "
                         "for a teacher too large for one GPU; the student stays DDP (docs/scaling.md).")
    hw.add_argument("--seed", type=int, default=56)

    rec = parser.add_argument_group("records")
    rec.add_argument("--log_interval", type=int, default=100, help="Optimizer steps between log lines.")
    rec.add_argument("--checkpoint_interval", type=int, default=2000,
                     help="Optimizer steps between checkpoints (0: only at the end).")
    rec.add_argument("--keep_checkpoints", type=int, default=3, help="Newest checkpoints kept on disk.")
    rec.add_argument("--eval_data", nargs="+", default=None,
                     help="Held-out text (tokenized like binarize.py) or binarize.py output: the student's "
                          "perplexity, and for text its bits per character and per byte, go to tensorboard "
                          "(eval/perplexity, eval/bits_per_char, eval/bits_per_byte) and dump_path/eval_results.json.")
    rec.add_argument("--eval_tasks", default=None, metavar="TASK=FILE[,TASK=FILE...]",
                     help="Multiple-choice tasks scored like evaluate.py --task (zero-shot): TASK is a built-in "
                          "task (jcommonsenseqa, jnli) or a task definition JSON file, FILE its JSON lines; "
                          "accuracy goes to tensorboard (eval/TASK/acc, eval/TASK/acc_norm) and eval_results.json.")
    rec.add_argument("--eval_interval", type=int, default=0,
                     help="Optimizer steps between evaluations on --eval_data and --eval_tasks (0: only at the end).")
    rec.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                     help="Draw the loss terms and held-out perplexity (and bits per character) against tokens seen to "
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


def sampling(params) -> Sampling:
    """On-policy steps' sampling settings (on_policy.Sampling checks their ranges)."""
    return Sampling(params.gen_temperature, params.gen_top_p, params.max_new_tokens)


def check_arguments(params) -> None:
    """Refuse bad flags, before anything is loaded or written (UsageError, exit 2)."""
    non_finite = [f"--{k} {v}" for k, v in sorted(vars(params).items()) if isinstance(v, float) and not math.isfinite(v)]
    if non_finite:
        raise UsageError(f"{', '.join(non_finite)}: every number must be finite")
    alphas = {k: getattr(params, k) for k in LOSS_FLAGS}
    if any(a < 0 for a in alphas.values()) or sum(alphas.values()) <= 0:
        raise UsageError(f"loss weights must be >= 0 with a positive sum, got {alphas}")
    needs_teacher = [f"--{k}" for k in ("alpha_ce", "alpha_mse", "alpha_cos") if alphas[k] > 0]
    if params.teacher_logits is not None:
        if params.teacher_name is not None:
            raise UsageError("--teacher_logits and --teacher_name exclude each other: the dumped logits are the teacher")
        needs_model = [f"--{k}" for k in ("alpha_mse", "alpha_cos") if alphas[k] > 0]
        if needs_model:
            raise UsageError(f"{', '.join(needs_model)} {verb(needs_model)} the teacher model, which "
                             f"--teacher_logits replaces: set {pronoun(needs_model)} to 0")
    if params.teacher_tokenizer is not None and params.teacher_name is None:
        raise UsageError("--teacher_tokenizer names the tokenizer of a teacher model (--teacher_name); a dump "
                         "(--teacher_logits) records its own")
    if not 0 <= params.on_policy_fraction <= 1:
        raise UsageError(f"--on_policy_fraction must be in [0, 1], got {params.on_policy_fraction}")
    if params.on_policy_fraction > 0:
        if params.teacher_logits is not None:
            raise UsageError("--on_policy_fraction needs a teacher model to score the student's samples; "
                             "--teacher_logits holds the teacher's rows of the corpus only")
        if params.teacher_name is None or params.alpha_ce <= 0:
            raise UsageError("--on_policy_fraction needs a teacher (--teacher_name) and the KD term (--alpha_ce > 0)")
        try:
            sampling(params)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if params.shard_teacher and params.teacher_name is None:
        raise UsageError("--shard_teacher needs a teacher model (--teacher_name)")
    no_teacher = params.teacher_name is None and params.teacher_logits is None
    if no_teacher and needs_teacher:
        raise UsageError(f"{', '.join(needs_teacher)} {verb(needs_teacher)} a teacher: pass --teacher_name "
                         f"(or --teacher_logits) or set {pronoun(needs_teacher)} to 0")
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
    if params.max_steps is not None and params.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1, got {params.max_steps} (leave it unset to train --n_epoch epochs)")
    if params.max_steps is None and params.n_epoch < 1:
        raise UsageError("give --n_epoch >= 1 or --max_steps >= 1")
    for name in ("learning_rate", "adam_epsilon", "max_grad_norm"):
        if not getattr(params, name) > 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(params, name)}")
    if not params.weight_decay >= 0:
        raise UsageError(f"--weight_decay must be >= 0, got {params.weight_decay}")
    if params.eval_interval < 0 or (params.eval_interval > 0 and not (params.eval_data or params.eval_tasks)):
        raise UsageError("--eval_interval must be >= 0 and needs --eval_data or --eval_tasks")
    eval_task_specs(params.eval_tasks)


def eval_task_specs(text: str | None) -> list[tuple[str, str]]:
    """--eval_tasks `TASK=FILE,TASK=FILE` as (task, file) pairs (none when not given)."""
    if text is None:
        return []
    pairs = []
    for spec in text.split(","):
        task, sep, path = spec.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise UsageError(f"--eval_tasks: {spec!r} is not TASK=FILE (e.g. jcommonsenseqa=valid-v1.3.json)")
        pairs.append((task.strip(), path.strip()))
    return pairs


def verb(flags: list[str]) -> str:
    """'needs' after one flag, 'need' after several."""
    return "needs" if len(flags) == 1 else "need"


def pronoun(flags: list[str]) -> str:
    return "it" if len(flags) == 1 else "them"


def parse_config(argv=None) -> argparse.Namespace:
    """Parse, check and resolve train.py's flags: the settings of the run, as parameters.json records them.

    With --config FILE.yaml the file is read first and its keys become the flags' defaults, so a flag
    on the command line overrides its own key. A key and a flag that name one setting differently
    (precision: fp32 in the file, --bf16 here) contradict each other and are refused, as --bf16
    --precision fp32 is; `config` then holds the file's absolute path.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe_path = recipe_file_of(argv)
    recipe = use_recipe(parser, recipe_path) if recipe_path is not None else {}
    args = parser.parse_args(argv)
    if recipe_path is not None:
        args.config = str(Path(recipe_path).resolve())
        log_overrides(recipe, args, recipe_path)
    args.n_gpu = resolve_n_gpu(args.n_gpu)
    check_arguments(args)
    if args.max_steps is None:
        args.max_steps = 0  # recorded as before: 0 = the steps of --n_epoch epochs
    bf16, fp16 = args.bf16, args.fp16
    del args.bf16, args.fp16  # aliases: the resolved --precision is what the run (and parameters.json) has
    try:
        args.precision = resolve_precision(args.precision, bf16, fp16, args.n_gpu)
    except UsageError as err:
        from_file = [k for k in ("precision", "bf16", "fp16") if k in recipe]
        if from_file:
            raise UsageError(f"{err} ({', '.join(from_file)} from {recipe_path})") from None
        raise
    on_gpu = args.n_gpu > 0
    if args.compile is None:
        args.compile = on_gpu
    if args.num_workers is None:
        args.num_workers = 2 if on_gpu else 0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if restarted and (Path(args.dump_path) / "parameters.json").exists():
        args.resume, args.force = True, False  # torchrun restarted this worker: continue the run
    return args


def resolve_n_gpu(n_gpu: int | None) -> int:
    """--n_gpu's default, torchrun's convention of one process per GPU: where a GPU is visible, the
    processes torchrun started on this node (LOCAL_WORLD_SIZE; 1 without torchrun), else 0, the CPU.

    init_distributed checks the result against the GPUs there are, as it checks an explicit --n_gpu.
    """
    if n_gpu is not None:
        return n_gpu
    if not torch.cuda.is_available():
        return 0
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


# ---- recipe files (--config) -------------------------------------------------------------------

class RecipeLoader(yaml.SafeLoader):
    """YAML with the numbers a command line takes: PyYAML follows YAML 1.1, which reads 5e-4
    (no dot) as a string; here it is the float it is on the command line."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def recipe_file_of(argv: list[str]) -> str | None:
    """The last --config value in argv (None without one); the full parse reports a malformed one."""
    found = None
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word.startswith("--config="):
            found = word.split("=", 1)[1]
        elif word == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def use_recipe(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read the recipe file and make its values the parser's defaults (a flag given overrides its key)."""
    recipe = read_recipe(path, parser)
    parser.set_defaults(**recipe)
    for action in parser._actions:
        if action.dest in recipe:
            action.required = False  # the file gives it
    return recipe


def read_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    """The recipe file as flag defaults, each key a flag of `parser` with a value of its type.

    Unknown keys, values of the wrong type or outside the choices, and unreadable or malformed
    files are one line each (UsageError: exit 2), naming the file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from err
    try:
        values = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{line} ({getattr(err, 'problem', None) or err})") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    flags = {a.dest: a for a in parser._actions
             if f"--{a.dest}" in a.option_strings and a.dest not in ("config", "help")}
    recipe = {}
    for key, value in values.items():
        if key == "config":
            raise UsageError(f"--config {path}: a recipe cannot name another recipe (key 'config')")
        if key not in flags:
            close = difflib.get_close_matches(str(key), flags, n=1)
            hint = f"; did you mean {close[0]}?" if close else " (keys are train.py's flag names, without --)"
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        recipe[key] = recipe_value(flags[key], value, f"--config {path}: {key}")
    return recipe


def recipe_value(action: argparse.Action, value, where: str):
    """`value` as `action` takes it, or UsageError naming what was expected."""
    def wrong(expected: str) -> UsageError:
        return UsageError(f"{where}: expected {expected}, got {value!r}")

    if action.nargs == 0:  # --flag / --no-flag
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if action.nargs == "+":
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise wrong("a path or a list of paths")
        return values
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif not isinstance(value, str):
        raise wrong("a string")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def log_overrides(recipe: dict, args: argparse.Namespace, path: str) -> None:
    """Say which of the file's keys the command line replaced."""
    changed = {k: (v, getattr(args, k)) for k, v in recipe.items() if getattr(args, k) != v}
    logger = logging.getLogger("distillation")
    logger.info("Recipe %s%s", path, "".join(f"; --{k} {new!r} overrides {old!r}" for k, (old, new) in changed.items()))


def kd_spec(params) -> KdSpec:
    """The KD objective of the run's flags."""
    return KdSpec(params.kd_loss, params.temperature, params.kd_beta, params.kd_skew, params.akl_mu,
                  params.uld_weight, params.cross_kd)


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
