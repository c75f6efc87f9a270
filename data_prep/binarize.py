#!/usr/bin/env python
"""Tokenize rinna-layout text into upstream-compatible pickle shards, streaming, on all cores.

    python data_prep/binarize.py --input corpus/jawiki/doc_data corpus/cc100/doc_data \
        --tokenizer rinna/japanese-gpt2-medium --output_dir data/binarized --num_workers 16

Tokenization is exactly the teacher's training recipe (distil_ja.tokenization.DocumentEncoder):
NFKC + explicit lowercasing (transformers ignores rinna's do_lower_case), each line encoded
separately and the ids concatenated, and each document (--unit doc, rinna, default) or each
line (--unit line, knok) wrapped in <s> ... </s>.  No </s> is appended by a tokenizer call
and special-token strings in the text are never parsed as special tokens.  Documents are not
cut here: sequences longer than the model's context are split by the distiller's dataset.

Output directory (the format is distil_ja/shards.py's, which every reader uses):
    NNNNN.pickle   pickled Python list of 1-D numpy arrays, one per sequence (uint16 when
                   the vocabulary has fewer than 65,536 ids, else int32), like upstream's
                   binarized_data.py.  A shard closes at the first document boundary after
                   --shard_size tokens, so shards never split a document.
    manifest.json  written last and atomically (partial output has no manifest):
        format          "distil-ja/binarized/v1"
        tokenizer       {"name", "vocab_size", "special_ids": {"unk","bos","eos","pad"},
                         "spiece_sha256", "lowercase"}
        unit            "doc" | "line"
        dtype           "uint16" | "int32"
        shard_size      target tokens per shard
        inputs          the input text files, in order
        input_counts    [{"file", "lines", "undecodable_lines", "documents", "tokens", "unk_tokens"}],
                        one per input in the order of "inputs" (undecodable_lines: lines that
                        were not valid UTF-8, their bad bytes read as U+FFFD, i.e. <unk>)
        bad_text        {"allowed", "max_undecodable_line_fraction", "max_unk_token_fraction",
                         "unk_check_min_tokens"}: the limits below and whether --allow_bad_text
        shards          [{"file", "documents", "sequences", "tokens", "unk_tokens", "bytes", "sha256"}]
        totals          {"shards", "documents", "sequences", "tokens", "unk_tokens", "lines",
                         "undecodable_lines"}
    Shards are byte-identical for the same input whatever --num_workers (chunks are processed
    in parallel but assembled in input order); nothing is shuffled.

Bad text (e.g. a cp932/Shift-JIS file, or a script the vocabulary lacks) is refused, not
binarized into <unk>: an input with more than 1% of its lines not valid UTF-8 is refused as soon
as that file has been read (before the next file is opened, so a large corpus fails within one
file of the bad one), and an overall <unk> rate over 5% of tokens (checked on at least 1,000
tokens) when all input is encoded, before manifest.json is written.  Either is one line
`error: ...` (exit 1) naming the file(s) and the numbers; --allow_bad_text binarizes such
input anyway (with a warning).  The counts are logged and kept in manifest.json either way.

Memory stays flat whatever the corpus size: documents are streamed, at most 2 chunks per
worker are in flight, and only the current shard is held.

Exit status (distil_ja/cli.py): 0 done; 1 an input is missing, unreadable, truncated, holds no
document, or is bad text (see above; no manifest.json is written); 2 bad flags, a tokenizer that
does not load, an output folder in the way (not empty, no --overwrite) or not writable; 130
interrupted (the output has no manifest.json: incomplete).
"""
import collections
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja import alignment, outputs, shards, workers
from distil_ja.cli import DISK_FULL, ArgumentParser, DataError, UsageError, first_line, run_command, setup_logging
from distil_ja.text_checks import TextChecks
from distil_ja.tokenization import DocumentEncoder, find_inputs, iter_documents, reading_inputs

logger = logging.getLogger("binarize")

UNITS = ("doc", "line")

# Bad text (see the module docstring): refused unless allow_bad_text.
ALLOW_HINT = "or pass --allow_bad_text to binarize it anyway"


# ----------------------------------------------------------------------------------------
# worker side

_ENCODER = None
_TEACHER = None  # --teacher_tokenizer: distil_ja.alignment.TeacherEncoder


def _init_worker(tokenizer, lowercase, teacher_tokenizer=None):
    """Workers ignore Ctrl-C and die of SIGTERM: the parent alone handles them (one message, then it ends
    the pool, with SIGTERM)."""
    global _ENCODER, _TEACHER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _ENCODER = DocumentEncoder(tokenizer, lowercase=lowercase)
    _TEACHER = None if teacher_tokenizer is None else alignment.TeacherEncoder(teacher_tokenizer)


def encode_chunk(docs, unit, encoder=None, teacher=None):
    """Encode a list of documents; returns raw arrays (bytes) so the parent controls dtypes.

    Returns (tokens, seq_lengths, seq_unk, doc_seq_counts, teacher_side):
      tokens          all sequences concatenated, each [bos] + ids + [eos]
      seq_lengths     int64 length of each sequence
      seq_unk         int64 <unk> count of each sequence
      doc_seq_counts  int64 number of sequences of each document
      teacher_side    None, or with a teacher tokenizer (encode_aligned_chunk) the teacher's sequences
                      concatenated (int32), their int64 lengths, and the alignment of every student
                      position (int32, laid out as tokens)
    """
    enc = encoder or _ENCODER
    teacher = teacher or _TEACHER
    if teacher is not None:
        return encode_aligned_chunk(docs, unit, enc, teacher)
    dtype = shards.dtype_for_vocab(enc.vocab_size)
    lines = list(itertools.chain.from_iterable(docs))
    encoded = enc.encode_batch(lines)
    line_lens = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    body = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(line_lens.sum()))
    lines_per_doc = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if unit == "doc":
        line_doc = np.repeat(np.arange(len(docs)), lines_per_doc)
        seq_body = np.bincount(line_doc, weights=line_lens, minlength=len(docs)).astype(np.int64)
        doc_seq_counts = np.ones(len(docs), dtype=np.int64)
    elif unit == "line":
        keep = line_lens > 0  # a line that encodes to nothing gives no sequence
        seq_body = line_lens[keep]
        line_doc = np.repeat(np.arange(len(docs)), lines_per_doc)[keep]
        doc_seq_counts = np.bincount(line_doc, minlength=len(docs)).astype(np.int64)
    else:
        raise ValueError(f"unit must be 'doc' or 'line', got {unit!r}")
    n_seq = len(seq_body)
    seq_lengths = seq_body + 2
    out = np.empty(int(seq_lengths.sum()), dtype=dtype)
    seq_starts = np.zeros(n_seq, dtype=np.int64)
    np.cumsum(seq_lengths[:-1], out=seq_starts[1:])
    # destination of each body token: its index + 2 per preceding sequence + 1 for its <s>
    token_seq = np.repeat(np.arange(n_seq), seq_body)
    out[np.arange(len(body)) + 2 * token_seq + 1] = body
    out[seq_starts] = enc.bos_id
    out[seq_starts + seq_lengths - 1] = enc.eos_id
    is_unk = (out == enc.unk_id).astype(np.int64)
    seq_unk = np.add.reduceat(is_unk, seq_starts) if n_seq else np.zeros(0, dtype=np.int64)
    return out.tobytes(), seq_lengths.tobytes(), seq_unk.astype(np.int64).tobytes(), doc_seq_counts.tobytes(), None


def encode_aligned_chunk(docs, unit, enc, teacher):
    """encode_chunk with the teacher's ids of each sequence's original text (its lines joined by a
    newline) and the alignment (distil_ja.alignment). The student's ids are those of encode_chunk."""
    dtype = shards.dtype_for_vocab(enc.vocab_size)
    seqs, t_seqs, aligned, doc_counts = [], [], [], []
    for doc in docs:
        count = 0
        for lines in ([doc] if unit == "doc" else [[line] for line in doc]):
            encoded = alignment.student_lines(enc, lines)
            ids = [i for line_ids, _ in encoded for i in line_ids]
            if unit == "line" and not ids:
                continue
            t_ids, t_ends = teacher.sequence("\n".join(lines))
            seqs.append(np.asarray([enc.bos_id, *ids, enc.eos_id], dtype=dtype))
            t_seqs.append(t_ids)
            aligned.append(alignment.align(alignment.student_sequence_ends(encoded, lines), t_ends))
            count += 1
        doc_counts.append(count)
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=dtype)
    unk = np.fromiter((np.count_nonzero(x == enc.unk_id) for x in seqs), dtype=np.int64, count=len(seqs))
    t_lengths = np.fromiter((len(x) for x in t_seqs), dtype=np.int64, count=len(t_seqs))
    join = (lambda arrays: np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32))
    side = (join(t_seqs).tobytes(), t_lengths.tobytes(), join(aligned).tobytes())
    return tokens.tobytes(), lengths.tobytes(), unk.tobytes(), np.asarray(doc_counts, dtype=np.int64).tobytes(), side


def _start_method():
    """distil_ja.workers.start_method; BINARIZE_MP_START overrides."""
    return workers.start_method("BINARIZE_MP_START")


def _encode_in_worker(args):
    docs, unit = args
    return encode_chunk(docs, unit)


# ----------------------------------------------------------------------------------------
# parent side


def iter_chunks(documents, lines_per_chunk):
    """Lists of documents of about lines_per_chunk lines; documents are (input index, lines)
    pairs, and each chunk is (documents' lines, their input indices)."""
    chunk, inputs, n = [], [], 0
    for index, doc in documents:
        chunk.append(doc)
        inputs.append(index)
        n += len(doc)
        if n >= lines_per_chunk:
            yield chunk, inputs
            chunk, inputs, n = [], [], 0
    if chunk:
        yield chunk, inputs


class InputCounts(TextChecks):
    """Per-input counts (lines, undecodable lines, documents, tokens, <unk>) and the bad-text
    checks (distil_ja.text_checks): a file is checked as soon as it has been read, the <unk> rate
    once all is encoded."""

    def __init__(self, files, allow_bad_text=False):
        super().__init__(files, allow_bad_text, ALLOW_HINT)
        self.documents = np.zeros(len(self.files), dtype=np.int64)

    def add_encoded(self, result, inputs):
        """Token and <unk> counts of an encoded chunk (encode_chunk's result), by input."""
        _, lengths, unk, doc_counts = result[:4]
        inputs = np.asarray(inputs, dtype=np.int64)  # non-decreasing: documents come in input order
        ids, n_docs = np.unique(inputs, return_counts=True)
        self.documents[ids] += n_docs
        seq_input = np.repeat(inputs, np.frombuffer(doc_counts, dtype=np.int64))
        if len(seq_input):
            ids, first = np.unique(seq_input, return_index=True)
            self.tokens[ids] += np.add.reduceat(np.frombuffer(lengths, dtype=np.int64), first)
            self.unk[ids] += np.add.reduceat(np.frombuffer(unk, dtype=np.int64), first)

    def manifest_entries(self):
        return [{"file": f, "lines": int(self.lines[i]), "undecodable_lines": int(self.undecodable[i]),
                 "documents": int(self.documents[i]), "tokens": int(self.tokens[i]), "unk_tokens": int(self.unk[i])}
                for i, f in enumerate(self.files)]


def _ordered_bounded_map(pool, fn, items, max_pending):
    """Like pool.imap, but never reads more than max_pending items ahead (flat memory)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ShardWriter:
    """Collects encoded documents and writes a shard at the first document boundary after
    shard_size tokens (shards never split a document); self.shards are the manifest entries."""

    def __init__(self, output_dir, shard_size, dtype):
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.dtype = dtype
        self.shards = []
        self._reset()

    def _reset(self):
        self.seqs, self.documents, self.tokens, self.unk = [], 0, 0, 0
        self.teacher_ids, self.alignments = [], []  # with a teacher tokenizer: each sequence's extras

    def add_chunk(self, result):
        tokens, lengths, unk, doc_counts, side = result
        flat = np.frombuffer(tokens, dtype=self.dtype)
        lengths = np.frombuffer(lengths, dtype=np.int64)
        unk = np.frombuffer(unk, dtype=np.int64)
        doc_counts = np.frombuffer(doc_counts, dtype=np.int64)
        bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        if side is not None:
            t_flat, t_lengths, align_flat = (np.frombuffer(side[0], dtype=np.int32),
                                             np.frombuffer(side[1], dtype=np.int64), np.frombuffer(side[2], dtype=np.int32))
            t_bounds = np.concatenate(([0], np.cumsum(t_lengths)))
        seq = 0
        for count in doc_counts.tolist():
            for k in range(seq, seq + count):
                self.seqs.append(flat[bounds[k]:bounds[k + 1]])
                if side is not None:
                    self.teacher_ids.append(t_flat[t_bounds[k]:t_bounds[k + 1]])
                    self.alignments.append(align_flat[bounds[k]:bounds[k + 1]])
            self.tokens += int(bounds[seq + count] - bounds[seq])
            self.unk += int(unk[seq:seq + count].sum())
            self.documents += 1
            seq += count
            if self.tokens >= self.shard_size:
                self.flush()
        return int(bounds[-1])

    def flush(self):
        if not self.documents:
            return
        name = f"{len(self.shards):05d}.pickle"
        written = shards.write_shard(os.path.join(self.output_dir, name), self.seqs)
        entry = {"file": name, "documents": self.documents, "sequences": len(self.seqs),
                 "tokens": self.tokens, "unk_tokens": self.unk, **written}
        if self.alignments:
            entry.update(teacher_tokens=sum(len(t) for t in self.teacher_ids),
                         teacher_alignable=sum(len(t) - 1 for t in self.teacher_ids),  # all but each eos
                         aligned=sum(int(np.count_nonzero(a >= 0)) for a in self.alignments),
                         alignable=self.tokens - len(self.seqs),  # every position but each </s>
                         extras=shards.write_extras(self.output_dir, name, {"teacher_ids": self.teacher_ids,
                                                                              "alignment": self.alignments}))
        self.shards.append(entry)
        self._reset()


def prepare_output_dir(output_dir, overwrite):
    """An empty output folder, or (--overwrite) an earlier output of this toolkit, emptied.

    What --overwrite may delete is distil_ja.outputs' rule (checked by check_output_dir before
    anything is read). The old manifest goes first, so an interrupted overwrite never looks complete again.
    """
    if outputs.will_replace(output_dir, overwrite, "--overwrite", "--output_dir"):
        manifest = os.path.join(output_dir, shards.MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)
        outputs.empty(output_dir)
    outputs.claim(output_dir, "binarize.py")


def check_options(unit, shard_size, lines_per_chunk, num_workers):
    """Refuse bad options before anything is read or written (UsageError, exit 2)."""
    if unit not in UNITS:
        raise UsageError(f"--unit must be doc or line, got {unit!r}")
    if shard_size < 1:
        raise UsageError("--shard_size must be positive")
    if lines_per_chunk < 1:
        raise UsageError("--lines_per_chunk must be positive")
    if num_workers is not None and num_workers < 0:
        raise UsageError("--num_workers must be 0 (all cores) or more")


def load_encoder(tokenizer, lowercase):
    """The DocumentEncoder; a tokenizer that does not load is a bad --tokenizer (UsageError)."""
    try:
        return DocumentEncoder(tokenizer, lowercase=lowercase)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load tokenizer {os.fspath(tokenizer)!r}: {first_line(e)}") from e


def read_documents(files, counts=None):
    """(input index, document) of every file, its reading errors (unreadable, truncated, corrupt
    input) as DataError; counts (InputCounts) checks each file as soon as it has been read."""
    with reading_inputs():
        for index, path in enumerate(files):
            on_file = None if counts is None else functools.partial(counts.file_read, index)
            for doc in iter_documents(path, on_file):
                yield index, doc


def write_shards(writer, files, encoder, unit, num_workers, lines_per_chunk, progress, counts=None, teacher=None):
    """Encode every document of files (in num_workers processes when more than 1) into writer's
    shards, in input order; DataError when there is no document at all.  The parent reads the
    text (and counts it in counts, an InputCounts); workers only encode."""
    counts = counts if counts is not None else InputCounts(files, allow_bad_text=True)
    chunk_inputs = collections.deque()  # input indices of the chunks read and not yet written

    def read_chunks():
        for docs, inputs in iter_chunks(read_documents(files, counts), lines_per_chunk):
            chunk_inputs.append(inputs)
            yield docs, unit

    chunks = read_chunks()
    pool = bar = None
    try:
        if num_workers <= 1:
            results = (encode_chunk(docs, u, encoder, teacher) for docs, u in chunks)
        else:  # workers first: tqdm may start a monitor thread, and fork must come before threads
            ctx = multiprocessing.get_context(_start_method())
            pool = ctx.Pool(num_workers, initializer=_init_worker,
                            initargs=(encoder.name, encoder.lowercase, None if teacher is None else teacher.name))
            results = _ordered_bounded_map(pool, _encode_in_worker, chunks, 2 * num_workers)
        bar = tqdm(total=sum(os.path.getsize(f) for f in files), desc="binarize", unit="B", unit_scale=True,
                   disable=not progress, mininterval=1.0)
        done_bytes, tokens = list(itertools.accumulate((os.path.getsize(f) for f in files), initial=0)), 0
        for result in results:
            inputs = chunk_inputs.popleft()
            counts.add_encoded(result, inputs)
            tokens += writer.add_chunk(result)
            bar.update(done_bytes[inputs[0]] - bar.n)  # the files before this chunk's first are done
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
        bar.update(bar.total - bar.n)
        writer.flush()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if not writer.shards:
        raise DataError(f"no documents in {', '.join(files)}")


def totals_of(shard_entries):
    totals = {"shards": len(shard_entries)}
    for key in ("documents", "sequences", "tokens", "unk_tokens"):
        totals[key] = sum(s[key] for s in shard_entries)
    if shard_entries and "aligned" in shard_entries[0]:
        for key in ("teacher_tokens", "aligned", "alignable", "teacher_alignable"):
            totals[key] = sum(s[key] for s in shard_entries)
        totals["aligned_share"] = totals["aligned"] / max(totals["alignable"], 1)
        totals["boundary_agreement"] = totals["aligned"] / max(min(totals["alignable"], totals["teacher_alignable"]), 1)
    return totals


def check_aligned_share(totals, teacher_name):
    """Refuse (DataError, before manifest.json) a pair of tokenizers whose boundaries agree too rarely."""
    agreement = totals.get("boundary_agreement")
    if agreement is None:
        return
    logger.info("%d of %d positions (%.1f%%) aligned with a position of the teacher tokenizer %s (%d positions); "
                "boundary agreement %.3f", totals["aligned"], totals["alignable"], 100 * totals["aligned_share"],
                teacher_name, totals["teacher_alignable"], agreement)
    if agreement < alignment.MIN_BOUNDARY_AGREEMENT:
        raise DataError(f"only {agreement:.1%} of the boundaries agree with the teacher tokenizer {teacher_name} "
                        f"(at least {alignment.MIN_BOUNDARY_AGREEMENT:.0%} needed, distil_ja/alignment.py): "
                        "a wrong --teacher_tokenizer, or text one side's normaliser rewrites?")


def binarize(inputs, tokenizer, output_dir, *, num_workers=None, unit="doc", shard_size=20_000_000,
             lines_per_chunk=2048, overwrite=False, lowercase=True, progress=True, allow_bad_text=False,
             teacher_tokenizer=None):
    """Binarize rinna-layout text; returns the manifest dict (also written to output_dir).

    Raises DataError for unusable inputs (bad text too, unless allow_bad_text) and UsageError for
    bad options, tokenizers and output folders (see the module docstring); an interrupt is
    re-raised saying the output is incomplete.
    """
    check_options(unit, shard_size, lines_per_chunk, num_workers)
    outputs.will_replace(output_dir, overwrite, "--overwrite", "--output_dir")  # refused before any reading
    files = find_inputs(inputs)
    encoder = load_encoder(tokenizer, lowercase)
    teacher = None if teacher_tokenizer is None else alignment.TeacherEncoder(teacher_tokenizer)
    t0 = time.time()
    try:
        prepare_output_dir(output_dir, overwrite)
        writer = ShardWriter(output_dir, shard_size, shards.dtype_for_vocab(encoder.vocab_size))
        counts = InputCounts(files, allow_bad_text)
        write_shards(writer, files, encoder, unit, num_workers or os.cpu_count() or 1, lines_per_chunk, progress,
                     counts, teacher)
        counts.check_unk()  # refused: the shards stay, without a manifest (incomplete)
        totals = totals_of(writer.shards)
        check_aligned_share(totals, teacher_tokenizer)
        totals.update(lines=int(counts.lines.sum()), undecodable_lines=int(counts.undecodable.sum()))
        manifest = shards.write_manifest(output_dir, {
            "tokenizer": encoder.identity(), "unit": unit, "dtype": writer.dtype.name, "shard_size": shard_size,
            "inputs": files, "input_counts": counts.manifest_entries(), "bad_text": counts.settings(),
            "shards": writer.shards, "totals": totals,
            **({} if teacher is None else {"teacher_tokenizer": alignment.tokenizer_identity(teacher.tokenizer,
                                                                                            teacher.name)})})
    except OSError as e:  # reading errors are DataError by now: this is the output folder
        if e.errno in DISK_FULL:  # exit 1 and the disk-full line (cli.run_command), not a usage error
            raise
        raise UsageError(f"cannot write {output_dir}: {first_line(e)}") from e
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (cli.Terminated): the same type, saying what is left
        said = f"{err}: " if str(err) else ""
        raise type(err)(f"{said}{output_dir} is incomplete (no {shards.MANIFEST})") from None
    log_summary(manifest["totals"], time.time() - t0)
    return manifest


def log_summary(totals, elapsed):
    logger.info(
        "%d documents, %d sequences, %d tokens (%d <unk>, %.4f%%) in %d shards; %d lines (%d not valid UTF-8); "
        "%.1fs, %.0f tokens/s",
        totals["documents"], totals["sequences"], totals["tokens"], totals["unk_tokens"],
        100.0 * totals["unk_tokens"] / max(totals["tokens"], 1), totals["shards"], totals.get("lines", 0),
        totals.get("undecodable_lines", 0), elapsed, totals["tokens"] / max(elapsed, 1e-9),
    )


def build_parser():
    parser = ArgumentParser(description="Binarize rinna-layout text (see module docstring).")
    parser.add_argument("--input", nargs="+", required=True, help="doc_data directories or .txt files")
    parser.add_argument("--tokenizer", required=True, help="hub name (rinna/japanese-gpt2-medium) or directory")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--unit", choices=UNITS, default="doc",
                        help="doc: <s> document </s> (rinna); line: <s> line </s> (knok)")
    parser.add_argument("--shard_size", type=int, default=20_000_000,
                        help="tokens per shard (approx.; the parent holds one shard: ~4 bytes/token of RAM)")
    parser.add_argument("--lines_per_chunk", type=int, default=2048, help="lines per worker task")
    parser.add_argument("--no_lowercase", action="store_true", help="do not lowercase (not for rinna)")
    parser.add_argument("--teacher_tokenizer", default=None,
                        help="a teacher's tokenizer of another vocabulary (hub name or folder): also write the teacher's "
                             "ids of the same text, as written, and the alignment of the two (cross-tokenizer KD)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--allow_bad_text", action="store_true",
                        help="binarize anyway an input with over 1%% of its lines not UTF-8, or over 5%% <unk> "
                             "tokens overall (refused by default; the counts are in manifest.json either way)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(argv):
    args = build_parser().parse_args(argv)
    binarize(args.input, args.tokenizer, args.output_dir, num_workers=args.num_workers, unit=args.unit,
             shard_size=args.shard_size, lines_per_chunk=args.lines_per_chunk, overwrite=args.overwrite,
             lowercase=not args.no_lowercase, progress=not args.quiet, allow_bad_text=args.allow_bad_text,
             teacher_tokenizer=args.teacher_tokenizer)


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
