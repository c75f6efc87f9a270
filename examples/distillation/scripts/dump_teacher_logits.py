#!/usr/bin/env python
"""Run a teacher once over the training sequences and keep its top-k log-probabilities: an offline teacher.

    python examples/distillation/scripts/dump_teacher_logits.py --teacher rinna/japanese-gpt2-medium \
        --data_file data/binarized --output_dir data/teacher-top64 --top_k 64
    torchrun --nproc_per_node 4 examples/distillation/scripts/dump_teacher_logits.py --n_gpu 4 ...
    python examples/distillation/train.py --teacher_logits data/teacher-top64 --alpha_cos 0 ...

The sequences are exactly those train.py trains on: the --data_file shards, cut to --max_len (default:
the teacher's context; train.py uses the dump's, and refuses a student with a shorter context) and
filtered by the same code. Under torchrun each rank dumps a contiguous share of them into its own shard,
and rank 0 writes the manifest last. The format is described in teacher_logits.py; the tokenizer is
--tokenizer_name (default: the teacher's), saved into the output folder for train.py.

A teacher of another tokenizer (--teacher_tokenizer, default the teacher's own, differs from
--tokenizer_name, the student's): the data must be binarized with binarize.py --teacher_tokenizer;
the teacher runs on its own ids, and each student position aligned with a teacher position gets that
position's top k, in the teacher's ids (teacher_logits.py); with --char_classes, the top k of its
next-character distribution instead (what train.py --cross_kd chars reads).

Exit status: 0 done, 1 bad data, 2 bad arguments or models.
"""

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

import losses  # noqa: E402
import models  # noqa: E402
import teacher_logits  # noqa: E402
from config import PRECISIONS, amp_dtype, resolve_n_gpu, resolve_precision  # noqa: E402
from distil_ja import outputs, shards  # noqa: E402
from distil_ja.cli import ArgumentParser, DataError, UsageError, first_line, run_command  # noqa: E402
from distil_ja.tokenization import load_tokenizer  # noqa: E402
from lm_seqs_dataset import MIN_SEQ_LEN, LmSeqsDataset, read_corpus  # noqa: E402
from token_cache import write_cache  # noqa: E402
from utils import attempt, init_distributed, logger, raise_first_error, setup_logging  # noqa: E402
from vocab import (check_cross_manifest, check_manifest, cross_tokenizer, own_tokenizer, save_tokenizer,  # noqa: E402
                   special_ids_of)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Teacher causal LM: hub name or folder (any family).")
    parser.add_argument("--tokenizer_name", default=None, help="Tokenizer: hub name or folder (default: the teacher's).")
    parser.add_argument("--teacher_tokenizer", default=None,
                        help="The teacher's tokenizer (default: the teacher's own); when it is not --tokenizer_name's, "
                             "the dump is cross-tokenizer (the data binarized with binarize.py --teacher_tokenizer).")
    parser.add_argument("--data_file", nargs="+", required=True,
                        help="What train.py's --data_file will be: a binarize.py output directory or .pickle shards.")
    parser.add_argument("--output_dir", required=True, help="The dump (train.py --teacher_logits).")
    parser.add_argument("--force", action="store_true", help="Delete an existing --output_dir first.")
    parser.add_argument("--train_on_prompt", action="store_true",
                        help="A chat corpus: rows for every position, as train.py --train_on_prompt needs (default: "
                             "only the positions that predict an assistant token, as train.py counts them).")
    parser.add_argument("--top_k", type=int, default=64, help="Token ids (and log-probabilities) kept per position.")
    parser.add_argument("--within_pieces", action=argparse.BooleanOptionalAction, default=False,
                        help="A teacher of another tokenizer: also the rows train.py --within_pieces reads, one "
                             "character into teacher pieces (its aligned rows are those of a dump without).")
    parser.add_argument("--char_classes", action=argparse.BooleanOptionalAction, default=False,
                        help="A teacher of another tokenizer: keep the top k of the teacher's next-character "
                             "distribution (train.py --cross_kd chars' target) instead of its top k pieces; k classes "
                             "hold more of its mass. Such a dump trains --cross_kd chars only.")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="Of the teacher's softmax; train.py must use the same --temperature.")
    parser.add_argument("--max_len", type=int, default=None,
                        help="Cut sequences to this many tokens, as train.py does (default: the teacher's context).")
    parser.add_argument("--logprobs_dtype", choices=teacher_logits.LOGPROB_DTYPES, default="float16",
                        help="float16 (rounded down; 2 bytes) or float32 (4 bytes) per log-probability.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per teacher forward, per process.")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="The teacher's dtype: auto (bf16 on a GPU that has it, else fp32), bf16, fp16, fp32.")
    parser.add_argument("--n_gpu", type=int, default=None,
                        help="GPUs (processes) per node; 0 runs on the CPU. Default: one GPU per process torchrun "
                             "started on this node (1 without torchrun) where a GPU is visible, else 0.")
    return parser


def check_arguments(args) -> None:
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0")
    if args.max_len is not None and args.max_len < MIN_SEQ_LEN:
        raise UsageError(f"--max_len must be >= {MIN_SEQ_LEN} (shorter sequences are dropped)")
    if args.n_gpu < 0:
        raise UsageError("--n_gpu must be >= 0")


def check_output_dir(folder: Path, force: bool) -> None:
    """The deletion rule of every --force (distil_ja.outputs): a marked earlier output or an empty folder."""
    outputs.will_replace(folder, force, "--force", "--output_dir")


def load_teacher(args, ids, vocab_size: int, runtime, n_classes: int = 0):
    """The frozen teacher in its dtype on this rank's device, its identity (rank 0) and the max_len
    (ids None: a teacher of another tokenizer, whose vocab_size is its tokenizer's; n_classes: the
    next-character classes a --char_classes row holds)."""
    teacher = models.load_causal_lm(args.teacher, "teacher")
    max_len = teacher_logits.check_teacher(teacher.config, ids, vocab_size, args.top_k, args.max_len,
                                           within=args.within_pieces, classes=n_classes)
    identity = teacher_logits.teacher_identity(teacher, args.teacher) if runtime.is_master else None
    teacher.requires_grad_(False)
    teacher.eval()
    dtype = amp_dtype(args.precision)
    if dtype is not None:
        teacher.to(dtype)
    teacher.to(runtime.device)
    return teacher, identity, max_len


def load_sequences(args, tokenizer, source: str, ids, max_len: int, cross=None, teacher_max_len=None):
    """Rank 0: the sequences train.py trains on with this max_len, and the binarize manifest; returns
    the error instead of raising it (every rank raises it). cross: a teacher of another tokenizer
    (vocab.CrossTokenizer), whose ids and alignment the data must carry."""
    try:
        if cross is not None:
            check_cross_manifest(shards.shard_paths(args.data_file)[1], cross)  # before reading the shards
        sequences, binarized, aligned, loss_masks = read_corpus(args.data_file, True, cross is not None,
                                                                args.train_on_prompt)
        if binarized is not None:
            check_manifest(binarized, ids, len(tokenizer), source)
        dataset = LmSeqsDataset(sequences, max_len, ids, aligned, teacher_max_len, loss_masks)
        if len(dataset) == 0:
            raise DataError("no sequence is left after filtering (all too short or mostly <unk>)")
        max_id = max(int(s.max()) for s in dataset.sequences)
        if max_id >= len(tokenizer):
            raise DataError(f"the data holds token id {max_id}, beyond the tokenizer's {len(tokenizer)} ids")
        return dataset, binarized
    except (DataError, UsageError) as err:
        return err


def prepare_output(folder: Path, force: bool, dataset, tokenizer, source: str, cross=None) -> None:
    """Rank 0, once everything is checked: empty the folder (--force), then the sequences and the
    tokenizer (and a teacher of another tokenizer's)."""
    if force and folder.is_dir() and outputs.entries(folder):
        logger.info("--force: deleting what %s holds (an earlier dump)", folder)
        outputs.empty(folder)
    outputs.claim(folder, "dump_teacher_logits.py")
    write_cache(folder / teacher_logits.SEQUENCES, dataset.sequences, dataset.cache_extras())
    save_tokenizer(tokenizer, source, str(folder / teacher_logits.TOKENIZER))
    if cross is not None:
        save_tokenizer(load_tokenizer(cross.source), cross.source, str(folder / teacher_logits.TEACHER_TOKENIZER))


def gather(entry: dict) -> list[dict]:
    if not torch.distributed.is_initialized():
        return [entry]
    entries = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(entries, entry)
    return entries


def dump(args, runtime) -> None:
    folder = Path(args.output_dir)
    raise_first_error(attempt(lambda: check_output_dir(folder, args.force)))
    source = args.tokenizer_name or args.teacher
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {source!r}: {first_line(err)}") from err
    ids = special_ids_of(tokenizer)
    cross = cross_tokenizer(tokenizer, args.teacher_tokenizer or own_tokenizer(args.teacher, args.tokenizer_name),
                            depths=args.within_pieces)
    for flag in ("within_pieces", "char_classes"):
        if getattr(args, flag) and cross is None:
            raise UsageError(f"--{flag}: the teacher's tokenizer is the student's (it reads a teacher of another one)")
    vocab_size = len(tokenizer) if cross is None else cross.teacher_vocab_size  # the ids the rows hold
    n_classes = cross.classes[2] if args.char_classes else 0
    teacher, identity, max_len = load_teacher(args, ids if cross is None else None, vocab_size, runtime, n_classes)
    teacher_max_len = None if cross is None else models.max_positions(teacher.config)

    loaded = load_sequences(args, tokenizer, source, ids, max_len, cross, teacher_max_len) if runtime.is_master else None
    raise_first_error(loaded if isinstance(loaded, Exception) else None)
    if runtime.is_master:
        dataset, binarized = loaded
        sequences_sha256 = teacher_logits.sequences_sha256(dataset.sequences)
        prepare_output(folder, args.force, dataset, tokenizer, source, cross)
    if runtime.is_distributed:
        torch.distributed.barrier()  # the sequences are on disk before any rank maps them
    dataset = LmSeqsDataset.from_cache(folder / teacher_logits.SEQUENCES, ids)

    settings = teacher_logits.DumpSettings(args.top_k, args.temperature, vocab_size, args.batch_size,
                                           args.logprobs_dtype)
    offsets = teacher_logits.offsets_of(dataset.row_counts())  # a chat corpus's: the assistant's positions
    start, end = teacher_logits.rank_slice(offsets, args.batch_size, runtime.world_size, runtime.global_rank)
    logger.info("Teacher %s (%s) on %s: top %d at temperature %g of %d sequences (%d tokens, %d rows, max_len %d) "
                "over %d process(es)", args.teacher, args.precision, runtime.device, args.top_k, args.temperature,
                len(dataset), int(dataset.lengths.sum()), int(offsets[-1]), max_len, runtime.world_size)
    t0 = time.perf_counter()
    # inside a teacher piece: the next-character target's pieces, with the teacher's row read after s (chars)
    within = cross is not None and cross.depth_tables is not None
    vocab = None if not (within or args.char_classes) else losses.VocabMap.build(
        cross.student_ids, cross.teacher_ids, len(tokenizer), vocab_size, runtime.device, classes=cross.classes,
        depth_tables=cross.depth_tables)
    entry = teacher_logits.dump_shard(teacher, dataset, start, end, folder, runtime.global_rank, settings,
                                      runtime.device, progress=runtime.is_master, vocab=vocab,
                                      within=cross.depth_tables[2:] if within else None, classes=args.char_classes)
    entries = gather(entry)  # also waits for the slowest rank
    seconds = time.perf_counter() - t0
    if not runtime.is_master:
        return
    tokens, rows = int(dataset.lengths.sum()), int(offsets[-1])
    ids_dtype = teacher_logits.ids_dtype(vocab_size, within or args.char_classes)
    row_bytes = sum(e[k]["bytes"] for e in entries if e["sequences"] for k in ("ids", "logprobs"))
    teacher_logits.write_manifest(folder, {
        "dump_id": uuid.uuid4().hex, "top_k": args.top_k, "temperature": args.temperature, "max_len": max_len,
        "sequences": len(dataset), "tokens": tokens, "rows": rows, "assistant_only": dataset.loss_masks is not None,
        "sequences_sha256": sequences_sha256,
        "ids_dtype": ids_dtype.name, "logprobs_dtype": args.logprobs_dtype,
        "logprobs_rounding": "down" if args.logprobs_dtype == "float16" else "none",
        "precision": args.precision, "tokenizer": teacher_logits.tokenizer_identity(tokenizer, source, ids),
        "teacher": identity, "data": teacher_logits.data_identity(args.data_file, binarized),
        **({} if cross is None else {"teacher_tokenizer": cross.identity, "teacher_max_len": teacher_max_len}),
        **({"depths": teacher_logits.DEPTHS} if within else {}),
        **({"rows": teacher_logits.CLASS_ROWS} if args.char_classes else {}),
        "world_size": runtime.world_size, "shards": [e for e in entries if e["sequences"]],
        "bytes_per_token": row_bytes / tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
    })
    logger.info("Dumped %d tokens in %.1f s: %.0f tokens/s, %.1f bytes/token (top-%d ids %s, log-probs %s) in %s",
                tokens, seconds, tokens / seconds, row_bytes / tokens, args.top_k,
                ids_dtype.name, args.logprobs_dtype, folder)


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.n_gpu = resolve_n_gpu(args.n_gpu)
    check_arguments(args)
    args.precision = resolve_precision(args.precision, False, False, args.n_gpu)
    runtime = init_distributed(args.n_gpu)
    setup_logging(runtime.global_rank)
    try:
        dump(args, runtime)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    setup_logging(int(os.environ.get("RANK", 0)))
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
