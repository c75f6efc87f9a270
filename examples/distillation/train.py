"""Distil a causal-LM teacher into a small student (or train the student alone with --alpha_clm only).

    torchrun --nproc_per_node 4 examples/distillation/train.py --n_gpu 4 --data_file DIR \
        --student_config CONFIG.json --teacher_name TEACHER

The flags and their defaults (the recommended recipe) are in config.py; the loop in distiller.py.
Teacher and student may be of any causal-LM family (models.py), different ones too, as long
as they share the tokenizer. This file checks everything that can be checked (flags, dump path,
tokenizer, models, data) before anything on disk changes, then trains. Exit status
(distil_ja.cli): 0 done, 1 bad data, 2 bad arguments or models, 3 training stopped (non-finite losses).
"""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import models  # noqa: E402
import teacher_logits  # noqa: E402
import token_cache  # noqa: E402
from config import RESUMABLE_CHANGES, amp_dtype, eval_task_specs, parse_config, saved_settings  # noqa: E402
from distil_ja import fileio, outputs, shards  # noqa: E402
from distil_ja.cli import DataError, UsageError, first_line, run_command  # noqa: E402
from distil_ja.tokenization import load_tokenizer  # noqa: E402
from distiller import Distiller  # noqa: E402
from lm_seqs_dataset import LmSeqsDataset, SpecialIds, read_corpus  # noqa: E402
from node_local import check_same_sequences, claim_dump_path, forget_marker  # noqa: E402
from perplexity import load_encoder, read_eval_data  # noqa: E402
from sharding import check_shardable, shard_teacher  # noqa: E402
from tasks import load_task_def, prepare_task  # noqa: E402
from utils import (DumpPathLock, Runtime, attempt, git_log, init_distributed, logger, raise_first_error,  # noqa: E402
                   set_seed, setup_logging)
from vocab import (CrossTokenizer, check_cross_manifest, check_manifest, cross_tokenizer, own_tokenizer,  # noqa: E402
                   save_tokenizer, special_ids_of)

TOKEN_CACHE = "token_cache"  # in dump_path: the training sequences, memory-mapped by every rank
TEACHER_LOGITS = "teacher_logits.json"  # in dump_path: the manifest of --teacher_logits, for --resume to compare


def check_dump_path(params, settings: dict, runtime: Runtime) -> None:
    """Refuse a dump path that a live run holds, an overwrite, or a resume with settings the run
    cannot continue under. Changes nothing (collective: every rank checks its own lock)."""
    dump_path = Path(params.dump_path)
    outputs.check_folder(dump_path, "--dump_path")
    raise_first_error(attempt(DumpPathLock(dump_path, runtime.global_rank).check))
    if params.resume:
        if not (dump_path / "parameters.json").is_file():
            raise UsageError(f"--resume: {dump_path} holds no parameters.json, so there is no run to resume")
        saved = saved_settings(dump_path)
        changed = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(settings)).items()
                   if k in saved and saved[k] != v}
        refused = sorted(set(changed) - RESUMABLE_CHANGES)
        if refused:
            details = "; ".join(f"--{k} was {changed[k][0]!r}, now {changed[k][1]!r}" for k in refused)
            raise UsageError(f"cannot resume with changed settings ({details}); only "
                             f"{', '.join(sorted(RESUMABLE_CHANGES - {'resume', 'force'}))} may change")
        for k in sorted(set(changed) - {"resume", "force"}):
            logger.info("Resuming with --%s changed from %r to %r", k, *changed[k])
    elif not params.force and dump_path.is_dir() and outputs.is_marked(dump_path) and outputs.entries(dump_path):
        raise UsageError(f"{dump_path} exists and is not empty; pass --resume to continue it or --force to overwrite it")
    elif not outputs.is_marked(dump_path) and (dump_path / "parameters.json").is_file():
        raise UsageError(f"{dump_path} holds a run of train.py from before outputs were marked ({outputs.MARKER}): "
                         "pass --resume to continue it, or delete it yourself to start afresh; nothing was deleted")
    else:  # what --force may delete: distil_ja.outputs' rule, for every command
        outputs.will_replace(dump_path, params.force, "--force", "--dump_path")


def prepare_dump_path(params, runtime: Runtime) -> tuple[Runtime, DumpPathLock]:
    """Lock --dump_path for this run, then empty it (--force) or clear a killed run's leftovers.

    Every rank has checked everything before anything changes; a dump path that another live run
    holds is refused before --force could delete it. The writer of each folder (rank 0, or the first
    process of a node with a folder of its own: node_local.py) changes it. Returns the runtime, which
    now says whether this process writes its folder, and the lock: `with` it, and it is held for the
    block (released at its end even when an error keeps this frame alive in a traceback).
    """
    dump_path = Path(params.dump_path)
    lock = DumpPathLock(dump_path, runtime.global_rank)
    raise_first_error(attempt(lock.check))  # again, after the loading; collective: also the barrier before
    writes = claim_dump_path(dump_path, runtime)  # collective: creates the folder(s)
    runtime = replace(runtime, writes_node_copy=writes and not runtime.is_master)
    if writes:
        forget_marker(dump_path)
        if params.force and outputs.entries(dump_path):
            logger.info("--force: deleting what %s holds (an earlier output of this toolkit)", dump_path)
            outputs.empty(dump_path)
        outputs.claim(dump_path, "train.py", adopt=params.resume)  # a resumed run predating markers
        remove_leftovers(dump_path)
    if runtime.is_distributed:
        torch.distributed.barrier()  # the folder exists (and --force emptied it) before any rank locks it
    raise_first_error(attempt(lock.acquire))
    return runtime, lock


def remove_leftovers(dump_path: Path) -> None:
    """What a killed run left half-written: `checkpoint_stepN.tmp/` folders and `NAME.tmp` files."""
    for path in sorted(dump_path.rglob(f"*{fileio.TMP_SUFFIX}")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        logger.info("Removed %s, left half-written by an earlier run", path)


def load_student(params):
    config = models.load_config(params.student_config, params.student_type)
    student = models.build_student(config, params.student_type, params.student_pretrained_weights)
    if params.student_pretrained_weights is not None:
        logger.info("Student initialised from %s", params.student_pretrained_weights)
    if params.freeze_pos_embs and models.position_embeddings(student) is None:
        raise UsageError(f"--freeze_pos_embs: the {config.model_type!r} student has no learned position embeddings "
                         "(its positions are rotary or fixed)")
    models.check_split_forward(student, "student")
    return student


def load_teacher(params):
    """The frozen teacher (None without --teacher_name), read straight into the autocast dtype under
    bf16/fp16 (a multi-billion-parameter teacher never exists in float32 in memory)."""
    if params.teacher_name is None:
        return None
    dtype = amp_dtype(params.precision) or torch.float32
    teacher = models.load_pretrained(params.teacher_name, params.teacher_type, "teacher", dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    models.check_split_forward(teacher, "teacher")
    return teacher


def check_compatibility(student, teacher, ids: SpecialIds, vocab_size: int, sequences) -> None:
    """Refuse models, tokenizer and data that disagree on the vocabulary or the special ids."""
    configs = {"student": student.config} | ({"teacher": teacher.config} if teacher is not None else {})
    for who, config in configs.items():
        if config.vocab_size < vocab_size:
            raise UsageError(f"{who} vocab_size {config.vocab_size} < tokenizer's {vocab_size}")
        for name, expected in (("bos_token_id", ids.bos), ("eos_token_id", ids.eos)):
            if not models.special_id_agrees(getattr(config, name, None), expected):
                raise UsageError(f"{who} config {name}={getattr(config, name, None)} but the tokenizer's is {expected}")
    if teacher is not None:
        check_shared_vocabulary(student.config.vocab_size, teacher.config.vocab_size, vocab_size)
    max_id = max((int(s.max()) for s in sequences if len(s)), default=-1)
    if max_id >= student.config.vocab_size:
        raise DataError(f"the data holds token id {max_id}, beyond the model vocabulary ({student.config.vocab_size})")


def check_shared_vocabulary(student_vocab: int, teacher_vocab: int, tokenizer_size: int) -> None:
    """tokenizer <= student <= teacher vocab_size (the first is checked for both models above).

    A teacher whose embedding matrix is padded beyond the tokenizer (32,000 -> 32,128 for faster
    matmuls) distils as it is: its rows from the student's vocab_size on are never a token of the
    data (the student's vocab_size is at least the tokenizer's), and the distiller drops their
    logits. A student with more rows than the teacher has ids the teacher cannot score.
    """
    if student_vocab > teacher_vocab:
        raise UsageError(f"student vocab_size {student_vocab} > teacher's {teacher_vocab}: teacher and student "
                         "must share the tokenizer")
    if teacher_vocab > student_vocab:
        logger.info("The teacher's vocabulary is padded to %d rows: its logits from %d on (beyond the tokenizer's %d "
                    "tokens) are dropped", teacher_vocab, student_vocab, tokenizer_size)


def load_eval_data(params, tokenizer_source: str):
    """--eval_data as token sequences with their text's size (perplexity.EvalData, as evaluate.py), or None."""
    if not params.eval_data:
        return None
    try:
        return read_eval_data(params.eval_data, tokenizer_source,
                                   allow_hint="or binarize it (binarize.py --allow_bad_text) and pass that folder")
    except (DataError, UsageError) as err:
        raise type(err)(f"--eval_data: {err}") from err


def load_eval_tasks(params, tokenizer_source: str) -> list:
    """--eval_tasks read and tokenized once (tasks.prepare_task, as evaluate.py --task), or []."""
    specs = eval_task_specs(params.eval_tasks)
    if not specs:
        return []
    try:
        encoder = load_encoder(tokenizer_source)
        loaded = [prepare_task(load_task_def(task), path, encoder) for task, path in specs]
    except (DataError, UsageError) as err:
        raise type(err)(f"--eval_tasks: {err}") from err
    names = [data.task.name for data in loaded]
    if len(set(names)) != len(names):
        raise UsageError(f"--eval_tasks: two tasks of one name ({', '.join(names)}): each is recorded under its name")
    return loaded


def context_length(student, teacher) -> int:
    """The longest training sequence: the shorter context of the two models (longer data is split), or
    one model's (teacher None: a teacher of another tokenizer has a context of its own, in its tokens)."""
    limits = [models.max_positions(m.config) for m in (student, teacher) if m is not None]
    limits = [n for n in limits if n is not None]
    if not limits:
        raise UsageError(f"no model config names a context length ({', '.join(models.POSITION_LIMITS)})")
    return min(limits)


def check_cross(params, tokenizer, teacher, topk) -> CrossTokenizer | None:
    """The teacher's tokenizer against the student's: a CrossTokenizer when they differ (train across
    tokenizers), None when they are the same (the same-tokenizer path, unchanged)."""
    depths = params.cross_kd == "chars" and params.within_pieces  # the depth tables only where the loss reads them
    if topk is not None:
        cross = cross_tokenizer(tokenizer, teacher_logits.teacher_tokenizer_of(params.teacher_logits, topk.manifest),
                                depths)
    elif teacher is not None:
        cross = cross_tokenizer(tokenizer, params.teacher_tokenizer or own_tokenizer(params.teacher_name,
                                                                                     params.tokenizer_name), depths)
    else:
        return None
    if cross is None:
        return None
    if topk is not None and topk.manifest.get("rows") == teacher_logits.CLASS_ROWS and params.cross_kd != "chars":
        raise UsageError(f"{params.teacher_logits} holds next-character classes (dump_teacher_logits.py "
                         f"--char_classes): it trains --cross_kd chars only, not --cross_kd {params.cross_kd}")
    position_terms = [f"--{k}" for k in ("alpha_mse", "alpha_cos") if getattr(params, k) > 0]
    if position_terms:
        raise UsageError(f"{', '.join(position_terms)} compare the two models position by position over one "
                         "vocabulary: with a teacher of another tokenizer set them to 0")
    if teacher is not None and teacher.config.vocab_size < cross.teacher_vocab_size:
        raise UsageError(f"teacher vocab_size {teacher.config.vocab_size} < its tokenizer's {cross.teacher_vocab_size}")
    if depths and topk is not None and topk.manifest.get("depths") != teacher_logits.DEPTHS:
        # its rows inside teacher pieces are zeros, or (2026-12-03) the row before the piece alone
        logger.warning("%s was dumped without --within_pieces (or before 2026-12-04): --within_pieces reaches the "
                       "aligned positions only; dump it again with --within_pieces to reach the others",
                       params.teacher_logits)
        cross = replace(cross, depth_tables=None)
    return cross


def open_teacher_logits(params, tokenizer, tokenizer_source: str, ids: SpecialIds, student):
    """--teacher_logits, memory-mapped, once checked against this run: temperature, tokenizer, student
    context, and on --resume the dump the run started from. None without it."""
    if params.teacher_logits is None:
        return None
    manifest = teacher_logits.load_manifest(params.teacher_logits)
    teacher_logits.check_training(manifest, params.teacher_logits, temperature=params.temperature,
                                  tokenizer=teacher_logits.tokenizer_identity(tokenizer, tokenizer_source, ids),
                                  student_context=models.max_positions(student.config))
    saved = Path(params.dump_path) / TEACHER_LOGITS
    if params.resume and saved.is_file():
        teacher_logits.check_same_dump(json.loads(saved.read_text()), manifest, params.teacher_logits)
    return teacher_logits.TopKLogits(params.teacher_logits, manifest)


def load_dataset(params, world_size: int, tokenizer, tokenizer_source: str, ids: SpecialIds, student,
                 teacher, topk=None, cross: CrossTokenizer | None = None) -> LmSeqsDataset | DataError | UsageError:
    """Rank 0 reads, checks, splits and filters the shards; returns the error instead of raising it.
    With an offline teacher (topk) they are cut to its max_len and must be the sequences it was dumped from;
    with a teacher of another tokenizer (cross) they carry its ids and the alignment, cut at aligned positions."""
    try:
        if cross is not None:
            check_cross_manifest(shards.shard_paths(params.data_file)[1], cross)  # before reading the shards
        sequences, manifest, aligned, loss_masks = read_corpus(params.data_file, params.verify == "full",
                                                               cross is not None, params.train_on_prompt)
        if topk is not None:
            teacher_logits.check_rows(topk.manifest, params.teacher_logits, loss_masks is not None)
        check_compatibility(student, teacher if cross is None else None, ids, len(tokenizer), sequences)
        if manifest is not None:
            check_manifest(manifest, ids, len(tokenizer), tokenizer_source)
        teacher_max_len = None
        if topk is not None:  # the dump's cut (open_teacher_logits: within the student's context)
            max_len = topk.manifest["max_len"]
            teacher_max_len = topk.manifest.get("teacher_max_len")
        else:
            max_len = context_length(student, teacher if cross is None else None)
            teacher_max_len = None if cross is None else context_length(teacher, None)
        dataset = LmSeqsDataset(sequences, max_len, ids, aligned, teacher_max_len, loss_masks)
        if params.on_policy_fraction > 0 and loss_masks is None:
            raise UsageError("--on_policy_fraction needs a chat corpus (binarize.py on conversations), read with its "
                             "loss masks (no --train_on_prompt): the student answers its prompts")
        if topk is not None:
            teacher_logits.check_sequences(topk.manifest, params.teacher_logits, dataset.sequences)
            teacher_logits.verify_files(params.teacher_logits, topk.manifest, full=params.verify == "full")
        if len(dataset) == 0:
            raise DataError("no sequence is left after filtering (all too short or mostly <unk>)")
        if len(dataset) < world_size:
            raise DataError(f"{len(dataset)} sequence(s) cannot be shared between {world_size} processes")
        return dataset
    except (DataError, UsageError) as err:
        return err


def run(argv=None) -> None:
    """Train as argv says; raises DataError, UsageError or TrainingError (see main)."""
    setup_logging(int(os.environ.get("RANK", 0)))
    params = parse_config(argv)
    try:
        train(params)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (cli.Terminated): say what is kept
        if not (Path(params.dump_path) / "parameters.json").is_file():
            raise
        said = f"{err}: " if str(err) else ""
        raise type(err)(f"{said}{params.dump_path} keeps its newest checkpoint; rerun with --resume to continue "
                        "from it") from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(params) -> None:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and params.resume:
        logger.warning("torchrun restarted this worker: resuming from the newest checkpoint")
    runtime = init_distributed(params.n_gpu)
    setup_logging(runtime.global_rank)
    settings = {**vars(params), "world_size": runtime.world_size}
    check_dump_path(params, settings, runtime)
    set_seed(params.seed)
    logger.info("Precision %s, compile %s, %d DataLoader worker(s) per process", params.precision,
                "on" if params.compile else "off", params.num_workers)
    if runtime.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        logger.info("CPU run on %d thread(s) per process: set OMP_NUM_THREADS to the cores you mean to use (small "
                    "models often run fastest on 1: docs/training.md)", torch.get_num_threads())

    tokenizer_source = params.tokenizer_name or params.teacher_name or \
        str(Path(params.teacher_logits) / teacher_logits.TOKENIZER)
    try:
        tokenizer = load_tokenizer(tokenizer_source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {tokenizer_source!r}: {first_line(err)}") from err
    ids = special_ids_of(tokenizer)
    teacher = load_teacher(params)
    student = load_student(params)
    topk = open_teacher_logits(params, tokenizer, tokenizer_source, ids, student)
    cross = check_cross(params, tokenizer, teacher, topk)
    if cross is not None and params.on_policy_fraction > 0:
        raise UsageError("--on_policy_fraction with a teacher of another tokenizer is not supported yet")
    # A resumed run trains on the sequences it started with: its token cache, written (and its shards read
    # and verified against their sha256) once, at the first start.
    reuse_cache = params.resume and token_cache.is_complete(Path(params.dump_path) / TOKEN_CACHE)
    dataset = None
    if runtime.is_master and not reuse_cache:
        dataset = load_dataset(params, runtime.world_size, tokenizer, tokenizer_source, ids, student, teacher, topk,
                               cross)
    raise_first_error(dataset if isinstance(dataset, Exception) else None)  # rank 0's data error, on every rank
    eval_sequences = load_eval_data(params, tokenizer_source)
    eval_tasks = load_eval_tasks(params, tokenizer_source)
    if params.shard_teacher:
        raise_first_error(attempt(lambda: check_shardable(teacher, runtime)))
        shard_teacher(teacher, runtime)

    runtime, lock = prepare_dump_path(params, runtime)
    with lock:  # checked above before anything on disk changes; locked from here
        cache = Path(params.dump_path) / TOKEN_CACHE
        reuse_cache = params.resume and token_cache.is_complete(cache)  # this node's own folder's, if it has one
        if runtime.writes_node_copy and not reuse_cache:  # a node with a folder of its own reads the data itself
            dataset = load_dataset(params, runtime.world_size, tokenizer, tokenizer_source, ids, student, teacher,
                                   topk, cross)
        raise_first_error(dataset if isinstance(dataset, Exception) else None)
        if reuse_cache and runtime.writes_training_state:
            logger.info("Resuming: the token cache %s is reused (the shards were read and checked against their "
                        "manifest when the run started)", cache)
        if runtime.writes_training_state:  # what a resume on this node reads back
            fileio.write_json(Path(params.dump_path) / "parameters.json", settings)
        if runtime.writes_training_state and not reuse_cache:
            token_cache.write_cache(cache, dataset.sequences, dataset.cache_extras())
            if topk is not None:
                fileio.write_json(Path(params.dump_path) / TEACHER_LOGITS, topk.manifest)
        if runtime.is_master:
            git_log(params.dump_path)
            save_tokenizer(tokenizer, tokenizer_source, params.dump_path)
        if runtime.is_distributed:
            torch.distributed.barrier()
        dataset = LmSeqsDataset.from_cache(cache, ids, topk)  # every rank of a node maps one file: one copy in memory
        check_same_sequences(dataset.lengths, runtime)
        logger.info("Student: %.1fM parameters; teacher: %s", student.num_parameters() / 1e6,
                    f"offline, top {topk.top_k} from {params.teacher_logits}" if topk is not None else
                    "none" if teacher is None else f"{teacher.num_parameters() / 1e6:.1f}M parameters")
        distiller = Distiller(params, runtime, dataset, student, teacher, eval_sequences, eval_tasks, cross=cross)
        if params.resume and not distiller.resume():
            logger.warning("--resume: no checkpoint in %s yet: starting from the first step, with the earlier "
                           "attempt's metrics.jsonl and eval_results.json cleared", params.dump_path)
            distiller.log.clear()
        distiller.train()


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
