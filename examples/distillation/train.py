"""Distil a GPT-2 teacher into a GPT-2 student (or train the student alone with --alpha_clm only).

    torchrun --nproc_per_node 4 examples/distillation/train.py --n_gpu 4 --dump_path ... --data_file ...

Exit status: 0 done, 1 bad data, 2 bad arguments, 3 training stopped (non-finite losses).
"""

import argparse
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data_prep

import torch  # noqa: E402

from distiller import Distiller, TrainingError  # noqa: E402
from lm_seqs_dataset import DataError, LmSeqsDataset, SpecialIds, load_sequences  # noqa: E402
from token_cache import write_cache  # noqa: E402
from utils import UsageError, git_log, init_distributed, logger, set_seed, setup_logging, write_json  # noqa: E402

EXIT_DATA, EXIT_USAGE, EXIT_TRAINING = 1, 2, 3
TOKEN_CACHE = "token_cache"  # in dump_path: the training sequences, memory-mapped by every rank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--dump_path", default="checkpoints/distilgpt2-ja", help="Output directory.")
    io.add_argument("--force", action="store_true", help="Delete an existing --dump_path and start afresh.")
    io.add_argument("--resume", action="store_true",
                    help="Continue the run in --dump_path exactly from its newest checkpoint.")
    io.add_argument("--data_file", nargs="+", required=True,
                    help="binarize.py output directory (manifest + shards), or one or more .pickle shards.")

    models = parser.add_argument_group("models")
    models.add_argument("--student_type", choices=["gpt2"], default="gpt2")
    models.add_argument("--student_config", required=True, help="GPT-2 config JSON of the student.")
    models.add_argument("--student_pretrained_weights", default=None,
                        help="Initial student weights: a state-dict file (scripts/extract.py) or a model directory.")
    models.add_argument("--teacher_type", choices=["gpt2"], default="gpt2")
    models.add_argument("--teacher_name", default=None,
                        help="Teacher: hub name or local directory. Omit to train the student without a teacher.")
    models.add_argument("--tokenizer_name", default=None, help="Tokenizer: hub name or directory (default: the teacher's).")

    loss = parser.add_argument_group("losses")
    loss.add_argument("--temperature", type=float, default=1.0,
                      help="Softmax temperature of the KD term (1 beat 2 in bench/quality.py).")
    loss.add_argument("--alpha_ce", type=float, default=0.5, help="KL(teacher || student) at the temperature.")
    loss.add_argument("--alpha_clm", type=float, default=0.5, help="Next-token cross-entropy on the data.")
    loss.add_argument("--alpha_mse", type=float, default=0.0, help="MSE between student and teacher logits.")
    loss.add_argument("--alpha_cos", type=float, default=0.0, help="Cosine loss on the last hidden states.")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--freeze_pos_embs", action="store_true", help="Keep the student's position embeddings fixed.")
    opt.add_argument("--n_epoch", type=int, default=3)
    opt.add_argument("--max_steps", type=int, default=0, help="Optimizer steps to run; overrides --n_epoch when > 0.")
    opt.add_argument("--batch_size", type=int, default=5, help="Sequences per micro-batch per process.")
    opt.add_argument("--group_by_size", action=argparse.BooleanOptionalAction, default=True,
                     help="Batch sequences of similar length together (on by default).")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=50, help="Micro-batches per optimizer step.")
    opt.add_argument("--warmup_prop", type=float, default=0.05, help="Fraction of the steps used for linear warm-up.")
    opt.add_argument("--weight_decay", type=float, default=0.0)
    opt.add_argument("--learning_rate", type=float, default=5e-4)
    opt.add_argument("--adam_epsilon", type=float, default=1e-6)
    opt.add_argument("--max_grad_norm", type=float, default=5.0)
    opt.add_argument("--max_nonfinite", type=int, default=10,
                     help="Stop after this many consecutive steps with non-finite gradients (each is skipped).")

    hw = parser.add_argument_group("hardware and precision")
    hw.add_argument("--fp16", action="store_true", help="float16 autocast with a gradient scaler.")
    hw.add_argument("--bf16", action="store_true", help="bfloat16 autocast (teacher held in bfloat16).")
    hw.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the student, the teacher and the fused loss (default: on with CUDA, off on the CPU).")
    hw.add_argument("--fused_loss", action=argparse.BooleanOptionalAction, default=True,
                    help="KD and CLM losses with their gradient in one chunked pass over the logits (on by default).")
    hw.add_argument("--num_workers", type=int, default=None,
                    help="DataLoader worker processes (default: 2 with CUDA, 0 on the CPU); batches are the same.")
    hw.add_argument("--n_gpu", type=int, default=1, help="GPUs (processes) per node; 0 trains on the CPU.")
    hw.add_argument("--seed", type=int, default=56)

    rec = parser.add_argument_group("records")
    rec.add_argument("--log_interval", type=int, default=100, help="Optimizer steps between log lines.")
    rec.add_argument("--checkpoint_interval", type=int, default=4000,
                     help="Optimizer steps between checkpoints (0: only at the end).")
    rec.add_argument("--keep_checkpoints", type=int, default=3, help="Newest checkpoints kept on disk.")
    rec.add_argument("--eval_data", nargs="+", default=None,
                     help="Held-out text (tokenized like binarize.py) or binarize.py output: the student's "
                          "perplexity goes to tensorboard (eval/perplexity) and dump_path/eval_results.json.")
    rec.add_argument("--eval_interval", type=int, default=0,
                     help="Optimizer steps between evaluations on --eval_data (0: only at the end).")
    return parser


# Settings a resumed run may change; any other difference from parameters.json is refused.
RESUMABLE_CHANGES = {"resume", "force", "dump_path", "max_steps", "n_epoch", "log_interval", "checkpoint_interval",
                     "keep_checkpoints", "max_nonfinite", "eval_interval", "num_workers", "compile"}


def check_arguments(params) -> None:
    if params.fp16 and params.bf16:
        raise UsageError("--fp16 and --bf16 exclude each other")
    alphas = {k: getattr(params, f"alpha_{k}") for k in ("ce", "clm", "mse", "cos")}
    if any(a < 0 for a in alphas.values()) or sum(alphas.values()) <= 0:
        raise UsageError(f"loss weights must be >= 0 with a positive sum, got {alphas}")
    needs_teacher = [f"--alpha_{k}" for k in ("ce", "mse", "cos") if alphas[k] > 0]
    if params.teacher_name is None and needs_teacher:
        raise UsageError(f"{', '.join(needs_teacher)} need a teacher: pass --teacher_name or set them to 0")
    if params.teacher_name is None and params.tokenizer_name is None:
        raise UsageError("without a teacher, name the tokenizer with --tokenizer_name")
    if params.temperature <= 0:
        raise UsageError("--temperature must be > 0")
    if params.resume and params.force:
        raise UsageError("--resume continues --dump_path, --force deletes it: pick one")
    for name in ("batch_size", "gradient_accumulation_steps", "log_interval", "max_nonfinite", "keep_checkpoints"):
        if getattr(params, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if params.num_workers is not None and params.num_workers < 0:
        raise UsageError("--num_workers must be >= 0")
    if not 0 <= params.warmup_prop < 1:
        raise UsageError("--warmup_prop must be in [0, 1)")
    if params.max_steps <= 0 and params.n_epoch < 1:
        raise UsageError("give --n_epoch >= 1 or --max_steps > 0")


def check_dump_path(params, settings: dict) -> None:
    """Refuse to overwrite a run, or to resume one with settings it cannot continue under. Changes nothing."""
    dump_path = Path(params.dump_path)
    if params.resume:
        saved_file = dump_path / "parameters.json"
        if not saved_file.is_file():
            raise UsageError(f"--resume: {dump_path} holds no parameters.json, so there is no run to resume")
        saved = json.loads(saved_file.read_text())
        changed = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(settings)).items()
                   if k in saved and saved[k] != v}
        refused = sorted(set(changed) - RESUMABLE_CHANGES)
        if refused:
            details = "; ".join(f"--{k} was {changed[k][0]!r}, now {changed[k][1]!r}" for k in refused)
            raise UsageError(f"cannot resume with changed settings ({details}); only "
                             f"{', '.join(sorted(RESUMABLE_CHANGES - {'resume', 'force'}))} may change")
        for k in sorted(set(changed) - {"resume", "force"}):
            logger.info("Resuming with --%s changed from %r to %r", k, *changed[k])
    elif dump_path.exists() and any(dump_path.iterdir()) and not params.force:
        raise UsageError(f"{dump_path} exists and is not empty; pass --resume to continue it or --force to overwrite it")


def prepare_dump_path(params) -> None:
    dump_path = Path(params.dump_path)
    if params.is_distributed:
        torch.distributed.barrier()  # every rank has checked everything before the master touches anything
    if params.is_master:
        if params.force and dump_path.exists():
            logger.info("--force: deleting %s", dump_path)
            shutil.rmtree(dump_path)
        dump_path.mkdir(parents=True, exist_ok=True)
    if params.is_distributed:
        torch.distributed.barrier()


def load_student(params):
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        config = GPT2Config.from_json_file(params.student_config)
    except (OSError, ValueError) as err:
        raise UsageError(f"{params.student_config}: unreadable student config ({err})") from err
    weights = params.student_pretrained_weights
    if weights is None:
        return GPT2LMHeadModel(config)
    from safetensors import SafetensorError

    try:
        student = load_student_weights(weights, config)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        detail = " ".join(str(err).split())  # load_state_dict's message spans lines
        raise UsageError(f"cannot load --student_pretrained_weights {weights!r}: {detail[:400]}") from err
    logger.info("Student initialised from %s", weights)
    return student


def load_student_weights(weights: str, config):
    """A student from a save_pretrained folder, a .safetensors file or a torch state dict (scripts/extract.py)."""
    from transformers import GPT2LMHeadModel

    if Path(weights).is_dir():
        return GPT2LMHeadModel.from_pretrained(weights, config=config)
    student = GPT2LMHeadModel(config)
    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embeddings
    if missing or unexpected:
        raise UsageError(f"{weights} does not fit the student config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return student


def load_teacher(params):
    if params.teacher_name is None:
        return None
    from transformers import GPT2LMHeadModel

    try:
        teacher = GPT2LMHeadModel.from_pretrained(params.teacher_name)
    except (OSError, ValueError) as err:  # transformers 4.x: HFValidationError (a ValueError) for a bad path
        raise UsageError(f"cannot load teacher {params.teacher_name!r}: {str(err).strip().splitlines()[0]}") from err
    teacher.requires_grad_(False)
    teacher.eval()
    if params.bf16:
        teacher.to(torch.bfloat16)
    elif params.fp16:
        teacher.to(torch.float16)
    return teacher


def special_ids_of(tokenizer) -> SpecialIds:
    ids = SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                     pad=tokenizer.pad_token_id, unk=tokenizer.unk_token_id)
    if None in (ids.bos, ids.eos, ids.pad, ids.unk):
        raise UsageError(f"the tokenizer must define <s>, </s>, [PAD] and <unk>; got {ids}")
    return ids


def check_compatibility(student, teacher, ids: SpecialIds, vocab_size: int, sequences) -> None:
    """Refuse models, tokenizer and data that disagree on the vocabulary or the special ids."""
    configs = {"student": student.config} | ({"teacher": teacher.config} if teacher is not None else {})
    for who, config in configs.items():
        if config.vocab_size < vocab_size:
            raise UsageError(f"{who} vocab_size {config.vocab_size} < tokenizer's {vocab_size}")
        for name, expected in (("bos_token_id", ids.bos), ("eos_token_id", ids.eos)):
            if getattr(config, name, None) != expected:
                raise UsageError(f"{who} config {name}={getattr(config, name, None)} but the tokenizer's is {expected}")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise UsageError(f"student vocab_size {student.config.vocab_size} != teacher's {teacher.config.vocab_size}")
    max_id = max((int(s.max()) for s in sequences if len(s)), default=-1)
    if max_id >= student.config.vocab_size:
        raise DataError(f"the data holds token id {max_id}, beyond the model vocabulary ({student.config.vocab_size})")


def check_manifest(manifest: dict, ids: SpecialIds, vocab_size: int, tokenizer_source: str) -> None:
    """The tokenizer recorded by binarize.py must be the one this run uses."""
    from data_prep.tokenization import resolve_spiece, sha256_file

    data_tok = manifest.get("tokenizer", {})
    if data_tok.get("vocab_size") not in (None, vocab_size):
        raise UsageError(f"the data was binarized with vocab_size {data_tok['vocab_size']}, the tokenizer has {vocab_size}")
    data_ids = data_tok.get("special_ids", {})
    for name in ("unk", "bos", "eos", "pad"):
        if data_ids.get(name) not in (None, getattr(ids, name)):
            raise UsageError(f"the data's {name} id is {data_ids[name]}, the tokenizer's is {getattr(ids, name)}")
    if data_tok.get("spiece_sha256"):
        try:
            ours = sha256_file(resolve_spiece(tokenizer_source))
        except OSError:
            return  # a tokenizer without its sentencepiece file: the checks above are all we can do
        if ours != data_tok["spiece_sha256"]:
            raise UsageError(f"the data was binarized with another sentencepiece model than {tokenizer_source!r} "
                             f"(sha256 {data_tok['spiece_sha256'][:12]}… vs {ours[:12]}…)")


def load_eval_data(params, tokenizer_source: str):
    """--eval_data as token sequences (evaluate.py's loader), or None."""
    if params.eval_interval < 0 or (params.eval_interval > 0 and not params.eval_data):
        raise UsageError("--eval_interval must be >= 0 and needs --eval_data")
    if not params.eval_data:
        return None
    from evaluate import EvalDataError, EvalError, load_eval_sequences

    try:
        return load_eval_sequences(params.eval_data, tokenizer_source)
    except EvalDataError as err:
        raise DataError(f"--eval_data: {err}") from err
    except EvalError as err:
        raise UsageError(f"--eval_data: {err}") from err


def save_tokenizer(tokenizer, source: str, dump_path: str) -> None:
    """The tokenizer beside the student, with its sentencepiece model so binarize.py and
    evaluate.py can use DUMP_PATH as a tokenizer too."""
    from data_prep.tokenization import resolve_spiece

    tokenizer.save_pretrained(dump_path)
    try:
        shutil.copyfile(resolve_spiece(source), Path(dump_path) / "spiece.model")
    except OSError as err:
        logger.warning("No spiece.model saved with the student (%s)", err)


def load_dataset(params, tokenizer, tokenizer_source: str, ids: SpecialIds, student,
                 teacher) -> LmSeqsDataset | DataError | UsageError:
    """Rank 0 reads, checks, splits and filters the shards; returns the error instead of raising it."""
    try:
        sequences, manifest = load_sequences(params.data_file)
        check_compatibility(student, teacher, ids, len(tokenizer), sequences)
        if manifest is not None:
            check_manifest(manifest, ids, len(tokenizer), tokenizer_source)
        max_len = min(m.config.n_positions for m in (student, teacher) if m is not None)
        dataset = LmSeqsDataset(sequences, max_len, ids)
        if len(dataset) == 0:
            raise DataError("no sequence is left after filtering (all too short or mostly <unk>)")
        if len(dataset) < params.world_size:
            raise DataError(f"{len(dataset)} sequence(s) cannot be shared between {params.world_size} processes")
        return dataset
    except (DataError, UsageError) as err:
        return err


def share_errors(params, loaded) -> None:
    """Raise rank 0's data error on every rank, so that none waits for the others forever."""
    error = loaded if isinstance(loaded, Exception) else None
    if params.is_distributed:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


def run(params) -> None:
    settings = dict(vars(params))
    check_arguments(params)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and (Path(params.dump_path) / "parameters.json").exists():
        logger.warning("torchrun restarted this worker: resuming from the newest checkpoint")
        params.resume, params.force = True, False
    init_distributed(params)
    setup_logging(params.global_rank)
    settings["world_size"] = params.world_size
    check_dump_path(params, settings)
    set_seed(params.seed)

    from data_prep.tokenization import load_tokenizer

    tokenizer_source = params.tokenizer_name or params.teacher_name
    try:
        tokenizer = load_tokenizer(tokenizer_source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {tokenizer_source!r}: {str(err).strip().splitlines()[0]}") from err
    ids = special_ids_of(tokenizer)
    teacher = load_teacher(params)
    student = load_student(params)
    dataset = load_dataset(params, tokenizer, tokenizer_source, ids, student, teacher) if params.is_master else None
    share_errors(params, dataset)
    eval_sequences = load_eval_data(params, tokenizer_source)

    prepare_dump_path(params)  # everything above is checked before anything on disk changes
    cache = Path(params.dump_path) / TOKEN_CACHE
    if params.is_master:
        write_json(Path(params.dump_path) / "parameters.json", settings)
        git_log(params.dump_path)
        save_tokenizer(tokenizer, tokenizer_source, params.dump_path)
        write_cache(cache, dataset.sequences)
    if params.is_distributed:
        torch.distributed.barrier()
    dataset = LmSeqsDataset.from_cache(cache, ids)  # every rank maps the same file: one copy in memory
    logger.info("Student: %.1fM parameters; teacher: %s", student.num_parameters() / 1e6,
                "none" if teacher is None else f"{teacher.num_parameters() / 1e6:.1f}M parameters")
    distiller = Distiller(params, dataset, student, teacher, eval_sequences)
    if params.resume and not distiller.resume():
        logger.info("--resume: no checkpoint in %s yet, starting from the first step", params.dump_path)
    distiller.train()


def main(argv=None) -> None:
    params = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    code = 0
    try:
        run(params)
    except UsageError as err:
        logger.error("%s", err)
        code = EXIT_USAGE
    except DataError as err:
        logger.error("%s", err)
        code = EXIT_DATA
    except TrainingError as err:
        logger.error("%s", err)
        code = EXIT_TRAINING
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
