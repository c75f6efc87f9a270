#!/usr/bin/env python
"""Tokenize rinna-layout text, or conversations, into upstream-compatible pickle shards, streaming, on all cores.

    python data_prep/binarize.py --input corpus/jawiki/doc_data corpus/cc100/doc_data \
        --tokenizer rinna/japanese-gpt2-medium --output_dir data/binarized --num_workers 16
    python data_prep/binarize.py --input chat.jsonl --tokenizer tok/chat --output_dir data/chat

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

Conversations (docs/data-preparation.md, "Conversation data"; rendering and the mask: distil_ja/chat.py):
inputs named *.jsonl (.gz, .xz, .bz2), or folders of them, hold one conversation a line, {"messages":
[{"role", "content"}, ...]} or {"prompt", "completion"} (strings, or message lists) as TRL reads them.
Each is rendered by the tokenizer's chat template (--chat_template FILE overrides; a tokenizer without
one is refused, exit 2), encoded with the same DocumentEncoder recipe between the template's special
tokens, and cut at turn starts into `<s> ... </s>` sequences of at most --max_len tokens (a turn that
alone does not fit is cut at max_len - 2 tokens: logged, and counted in totals.cut_turns). Each shard
gets the extra `NNNNN.loss_mask.pickle`: per sequence a uint8 array as long as its ids, 1 on the tokens
an assistant must produce (its content and the template's end-of-turn token(s) after it), 0 on the rest
(<s>, system and user turns, role headers, the generation prompt, an appended </s>). The manifest then
also has
        unit            "conversation"
        chat_template   {"sha256" of the template text, "source": "tokenizer" | the FILE}
        max_len         the cut length
        shards          each with "assistant_tokens" and "extras": {"loss_mask": {"file", "bytes", "sha256"}}
        totals          with "conversations", "assistant_tokens", "cut_turns"
and tokenizer.vocab_size is len(tokenizer) (the chat markers it added included). A malformed line is
refused as `error: FILE:LINE: what` (exit 1).

Exit status (distil_ja/cli.py): 0 done; 1 an input is missing, unreadable, truncated, holds no
document, is bad text (see above; no manifest.json is written) or holds a malformed conversation;
2 bad flags, a tokenizer that does not load (or, for conversations, has no chat template), an output
folder in the way (not empty, no --overwrite) or not writable; 130 interrupted (the output has no
manifest.json: incomplete).
"""
import collections
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
import typing
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja import alignment, chat, outputs, shards, workers
from distil_ja.cli import DISK_FULL, ArgumentParser, DataError, UsageError, first_line, run_command, setup_logging
from distil_ja.text_checks import TextChecks
from distil_ja.tokenization import (TEXT_SUFFIXES, DocumentEncoder, find_inputs, iter_documents, iter_text_lines,
                                    load_tokenizer, reading_inputs)

logger = logging.getLogger("binarize")

UNITS = ("doc", "line")
CONVERSATION = "conversation"  # the manifest's unit of .jsonl input
MAX_CUT_WARNINGS = 20  # cut turns logged one by one; all are counted (totals.cut_turns)

# Bad text (see the module docstring): refused unless allow_bad_text.
ALLOW_HINT = "or pass --allow_bad_text to binarize it anyway"


# ----------------------------------------------------------------------------------------
# worker side

_ENCODER = None
_TEACHER = None  # --teacher_tokenizer: distil_ja.alignment.TeacherEncoder
_CHAT = None  # .jsonl input: (distil_ja.chat.ChatEncoder, max_len)


class Encoded(typing.NamedTuple):
    """An encoded chunk, as raw arrays (bytes) so the parent controls dtypes.

    tokens          all sequences concatenated, each [bos] + ids + [eos]
    lengths         int64 length of each sequence
    unk             int64 <unk> count of each sequence
    doc_counts      int64 number of sequences of each document (conversation)
    side            None, or each extra's per-sequence arrays: {name: (concatenated bytes, dtype name,
                    int64 lengths as bytes, or None when laid out as tokens)}
    cuts            conversations only: (FILE:LINE, message index, its tokens) of each turn cut at max_len
    """

    tokens: bytes
    lengths: bytes
    unk: bytes
    doc_counts: bytes
    side: dict | None = None
    cuts: tuple = ()


def _init_worker(tokenizer, lowercase, teacher_tokenizer=None, chat_setup=None):
    """Workers ignore Ctrl-C and die of SIGTERM: the parent alone handles them (one message, then it ends
    the pool, with SIGTERM). chat_setup: (template, max_len) of .jsonl input."""
    global _ENCODER, _TEACHER, _CHAT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _ENCODER = DocumentEncoder(tokenizer, lowercase=lowercase)
    _TEACHER = None if teacher_tokenizer is None else alignment.TeacherEncoder(teacher_tokenizer)
    if chat_setup is not None:
        template, max_len = chat_setup
        _CHAT = (chat.ChatEncoder(_ENCODER, load_tokenizer(tokenizer), template), max_len)


def encode_chunk(docs, unit, encoder=None, teacher=None):
    """Encode a list of documents into an Encoded chunk (side None; with a teacher tokenizer see
    encode_aligned_chunk)."""
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
    return Encoded(out.tobytes(), seq_lengths.tobytes(), seq_unk.astype(np.int64).tobytes(), doc_seq_counts.tobytes())


def encode_aligned_chunk(docs, unit, enc, teacher):
    """encode_chunk with the teacher's ids of each sequence's original text (its lines joined by a
    newline, int32, lengths of their own), the alignment and the depth (distil_ja.alignment.within_pieces:
    int32 and uint8, laid out as the tokens) as the extras "teacher_ids", "alignment" and "depth". The
    student's ids are those of encode_chunk."""
    dtype = shards.dtype_for_vocab(enc.vocab_size)
    seqs, t_seqs, aligned, depths, doc_counts = [], [], [], [], []
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
            s_ends = alignment.student_sequence_ends(encoded, lines)
            found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, teacher.surfaces,
                                                   alignment.align(s_ends, t_ends))
            aligned.append(found)
            depths.append(depth)
            count += 1
        doc_counts.append(count)
    side = {"teacher_ids": (_joined(t_seqs, np.int32), "int32", _lengths(t_seqs)),
            "alignment": (_joined(aligned, np.int32), "int32", None),
            "depth": (_joined(depths, np.uint8), "uint8", None)}
    return Encoded(_joined(seqs, dtype), _lengths(seqs), _unk_counts(seqs, enc.unk_id),
                   np.asarray(doc_counts, dtype=np.int64).tobytes(), side)


def encode_chat_chunk(conversations, chat_encoder, max_len):
    """Encode (FILE:LINE, JSONL line) conversations (distil_ja.chat): each into one or more sequences of at
    most max_len tokens, with the extra "loss_mask" (uint8, laid out as the tokens: 1 where the token is
    an assistant's). Malformed lines are a DataError naming FILE:LINE."""
    dtype = shards.dtype_for_vocab(chat_encoder.vocab_size)
    seqs, masks, doc_counts, cuts = [], [], [], []
    for where, text in conversations:
        conv = chat.parse_line(text, where)
        ids, mask, starts = chat_encoder.encode(conv, where)
        pieces, cut_turns = chat.cut(ids, mask, starts, max_len, chat_encoder.bos_id, chat_encoder.eos_id)
        seqs += [p_ids.astype(dtype) for p_ids, _ in pieces]
        masks += [p_mask for _, p_mask in pieces]
        doc_counts.append(len(pieces))
        cuts += [(where, message, tokens) for message, tokens in cut_turns]
    return Encoded(_joined(seqs, dtype), _lengths(seqs), _unk_counts(seqs, chat_encoder.unk_id),
                   np.asarray(doc_counts, dtype=np.int64).tobytes(),
                   {"loss_mask": (_joined(masks, np.uint8), "uint8", None)}, tuple(cuts))


def _joined(arrays, dtype) -> bytes:
    return (np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)).tobytes()


def _lengths(arrays) -> bytes:
    return np.fromiter((len(x) for x in arrays), dtype=np.int64, count=len(arrays)).tobytes()


def _unk_counts(arrays, unk_id) -> bytes:
    return np.fromiter((np.count_nonzero(x == unk_id) for x in arrays), dtype=np.int64, count=len(arrays)).tobytes()


def _start_method():
    """distil_ja.workers.start_method; BINARIZE_MP_START overrides."""
    return workers.start_method("BINARIZE_MP_START")


def _encode_in_worker(args):
    docs, unit = args
    if unit == CONVERSATION:
        return encode_chat_chunk(docs, *_CHAT)
    return encode_chunk(docs, unit)


# ----------------------------------------------------------------------------------------
# parent side


def iter_chunks(documents, lines_per_chunk, lines_of=len):
    """Lists of documents of about lines_per_chunk lines; documents are (input index, lines)
    pairs, and each chunk is (documents' lines, their input indices). lines_of: a document's
    lines (a conversation is one line)."""
    chunk, inputs, n = [], [], 0
    for index, doc in documents:
        chunk.append(doc)
        inputs.append(index)
        n += lines_of(doc)
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
        lengths, unk, doc_counts = result.lengths, result.unk, result.doc_counts
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
        self.extras = {}  # name -> each sequence's array (teacher_ids and alignment, or loss_mask)

    def add_chunk(self, result):
        flat = np.frombuffer(result.tokens, dtype=self.dtype)
        lengths = np.frombuffer(result.lengths, dtype=np.int64)
        unk = np.frombuffer(result.unk, dtype=np.int64)
        doc_counts = np.frombuffer(result.doc_counts, dtype=np.int64)
        bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        side = {name: split_extra(value, bounds) for name, value in (result.side or {}).items()}
        seq = 0
        for count in doc_counts.tolist():
            for k in range(seq, seq + count):
                self.seqs.append(flat[bounds[k]:bounds[k + 1]])
                for name, arrays in side.items():
                    self.extras.setdefault(name, []).append(arrays[k])
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
                 "tokens": self.tokens, "unk_tokens": self.unk, **written, **self.extra_counts()}
        if self.extras:
            entry["extras"] = shards.write_extras(self.output_dir, name, self.extras)
        self.shards.append(entry)
        self._reset()

    def extra_counts(self):
        """The shard's counts of its extras: the alignment's, or the assistant tokens of a loss mask."""
        if "alignment" in self.extras:
            teacher_ids, alignments, depths = (self.extras[k] for k in ("teacher_ids", "alignment", "depth"))
            return {"teacher_tokens": sum(len(t) for t in teacher_ids),
                    "teacher_alignable": sum(len(t) - 1 for t in teacher_ids),  # all but each eos
                    "aligned": sum(int(np.count_nonzero((a >= 0) & (d == 0))) for a, d in zip(alignments, depths)),
                    "within": sum(int(np.count_nonzero(d)) for d in depths),
                    "alignable": self.tokens - len(self.seqs)}  # every position but each </s>
        if "loss_mask" in self.extras:
            return {"assistant_tokens": sum(int(np.count_nonzero(m)) for m in self.extras["loss_mask"])}
        return {}


def split_extra(value, bounds):
    """One extra of an Encoded chunk as per-sequence arrays: cut by its own lengths, or like the tokens."""
    flat, dtype, lengths = value
    flat = np.frombuffer(flat, dtype=dtype)
    if lengths is not None:
        bounds = np.concatenate(([0], np.cumsum(np.frombuffer(lengths, dtype=np.int64))))
    return [flat[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]


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
    if unit is not None and unit not in UNITS:
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


def is_chat_input(files):
    """Whether the inputs are conversations (every file *.jsonl[.gz|.xz|.bz2]) or text (none is);
    both at once is a UsageError."""
    chat_files = [f for f in files if f.endswith(chat.CHAT_SUFFIXES)]
    if chat_files and len(chat_files) < len(files):
        raise UsageError(f"--input mixes conversations ({chat_files[0]}) with text "
                         f"({next(f for f in files if f not in chat_files)}): binarize them separately")
    return bool(chat_files)


def check_chat_options(is_chat, unit, teacher_tokenizer, chat_template, max_len):
    """The flags that belong to one kind of input only (UsageError for the others)."""
    if is_chat and unit is not None:
        raise UsageError("--unit is for text input: each conversation is its own sequence(s)")
    if is_chat and teacher_tokenizer is not None:
        raise UsageError("--teacher_tokenizer does not take conversations (.jsonl) yet")
    if not is_chat and (chat_template is not None or max_len is not None):
        raise UsageError(f"{'--chat_template' if chat_template is not None else '--max_len'} is for "
                         "conversations (.jsonl input); text documents are cut by the distiller")
    if max_len is not None and max_len < 3:
        raise UsageError("--max_len must be at least 3 (<s>, a token, </s>)")


def load_chat_job(encoder, tokenizer, chat_template=None, max_len=None):
    """The ChatJob of conversation input: the transformers tokenizer of the same folder (for its
    template and added tokens), the template (UsageError when there is none) and max_len (default:
    distil_ja.chat.default_max_len)."""
    try:
        hf_tokenizer = load_tokenizer(tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load tokenizer {os.fspath(tokenizer)!r}: {first_line(e)}") from e
    template, source = chat.chat_template(hf_tokenizer, chat_template)
    try:
        import jinja2  # noqa: F401 - transformers renders templates with it, and does not require it
    except ImportError as e:
        raise UsageError("conversations need jinja2 to render the chat template: pip install jinja2") from e
    chat_encoder = chat.ChatEncoder(encoder, hf_tokenizer, template)
    return ChatJob(chat_encoder, template, source, max_len or chat.default_max_len(hf_tokenizer))


def read_documents(files, counts=None):
    """(input index, document) of every file, its reading errors (unreadable, truncated, corrupt
    input) as DataError; counts (InputCounts) checks each file as soon as it has been read."""
    with reading_inputs():
        for index, path in enumerate(files):
            on_file = None if counts is None else functools.partial(counts.file_read, index)
            for doc in iter_documents(path, on_file):
                yield index, doc


def read_conversations(files, counts=None):
    """(input index, (FILE:LINE, line)) of every non-blank line of JSONL files, as read_documents."""
    with reading_inputs():
        for index, path in enumerate(files):
            on_file = None if counts is None else functools.partial(counts.file_read, index)
            for number, line in enumerate(iter_text_lines(path, on_file), 1):
                if line.strip():
                    yield index, (f"{path}:{number}", line)


@dataclasses.dataclass
class ChatJob:
    """What conversation (.jsonl) input needs beyond plain text's: the ChatEncoder, its template (and
    where it came from) and the cut length; it counts and logs the turns cut at max_len."""

    encoder: chat.ChatEncoder
    template: str
    source: str
    max_len: int
    cut_turns: int = 0

    def note_cuts(self, cuts):
        for where, message, tokens in cuts:
            self.cut_turns += 1
            if self.cut_turns <= MAX_CUT_WARNINGS:
                logger.warning("%s: message %d is %d tokens, more than fit in --max_len %d with <s> and </s>: "
                               "cut into pieces of %d tokens", where, message + 1, tokens, self.max_len,
                               self.max_len - 2)

    def log_summary(self):
        if self.cut_turns > MAX_CUT_WARNINGS:
            logger.warning("%d turns in all were cut at --max_len %d (the first %d logged above)", self.cut_turns,
                           self.max_len, MAX_CUT_WARNINGS)


def write_shards(writer, files, encoder, unit, num_workers, lines_per_chunk, progress, counts=None, teacher=None,
                 chat_job=None):
    """Encode every document of files (in num_workers processes when more than 1) into writer's
    shards, in input order; DataError when there is no document at all.  The parent reads the
    text (and counts it in counts, an InputCounts); workers only encode.  chat_job (a ChatJob):
    the files are conversations, one per line, and unit is ignored."""
    counts = counts if counts is not None else InputCounts(files, allow_bad_text=True)
    chunk_inputs = collections.deque()  # input indices of the chunks read and not yet written
    if chat_job is not None:
        unit, documents, lines_of = CONVERSATION, read_conversations(files, counts), (lambda conversation: 1)
    else:
        documents, lines_of = read_documents(files, counts), len

    def read_chunks():
        for docs, inputs in iter_chunks(documents, lines_per_chunk, lines_of):
            chunk_inputs.append(inputs)
            yield docs, unit

    chunks = read_chunks()
    pool = bar = None
    try:
        if num_workers <= 1 and chat_job is not None:
            results = (encode_chat_chunk(docs, chat_job.encoder, chat_job.max_len) for docs, _ in chunks)
        elif num_workers <= 1:
            results = (encode_chunk(docs, u, encoder, teacher) for docs, u in chunks)
        else:  # workers first: tqdm may start a monitor thread, and fork must come before threads
            ctx = multiprocessing.get_context(_start_method())
            chat_setup = None if chat_job is None else (chat_job.template, chat_job.max_len)
            pool = ctx.Pool(num_workers, initializer=_init_worker,
                            initargs=(encoder.name, encoder.lowercase, None if teacher is None else teacher.name,
                                      chat_setup))
            results = _ordered_bounded_map(pool, _encode_in_worker, chunks, 2 * num_workers)
        bar = tqdm(total=sum(os.path.getsize(f) for f in files), desc="binarize", unit="B", unit_scale=True,
                   disable=not progress, mininterval=1.0)
        done_bytes, tokens = list(itertools.accumulate((os.path.getsize(f) for f in files), initial=0)), 0
        for result in results:
            inputs = chunk_inputs.popleft()
            counts.add_encoded(result, inputs)
            tokens += writer.add_chunk(result)
            if chat_job is not None:
                chat_job.note_cuts(result.cuts)
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
        raise DataError(f"no {'conversations' if chat_job else 'documents'} in {', '.join(files)}")


def totals_of(shard_entries):
    totals = {"shards": len(shard_entries)}
    for key in ("documents", "sequences", "tokens", "unk_tokens"):
        totals[key] = sum(s[key] for s in shard_entries)
    if shard_entries and "aligned" in shard_entries[0]:
        for key in ("teacher_tokens", "aligned", "within", "alignable", "teacher_alignable"):
            totals[key] = sum(s[key] for s in shard_entries)
        totals["aligned_share"] = totals["aligned"] / max(totals["alignable"], 1)
        totals["within_share"] = totals["within"] / max(totals["alignable"], 1)
        totals["boundary_agreement"] = totals["aligned"] / max(min(totals["alignable"], totals["teacher_alignable"]), 1)
    if shard_entries and "assistant_tokens" in shard_entries[0]:
        totals["conversations"] = totals["documents"]
        totals["assistant_tokens"] = sum(s["assistant_tokens"] for s in shard_entries)
    return totals


def check_aligned_share(totals, teacher_name):
    """Refuse (DataError, before manifest.json) a pair of tokenizers whose boundaries agree too rarely."""
    agreement = totals.get("boundary_agreement")
    if agreement is None:
        return
    logger.info("%d of %d positions (%.1f%%) aligned with a position of the teacher tokenizer %s (%d positions); "
                "boundary agreement %.3f; %d more (%.1f%%) inside a teacher piece (depth 1-%d)", totals["aligned"],
                totals["alignable"], 100 * totals["aligned_share"], teacher_name, totals["teacher_alignable"], agreement,
                totals["within"], 100 * totals["within_share"], alignment.MAX_DEPTH)
    if agreement < alignment.MIN_BOUNDARY_AGREEMENT:
        raise DataError(f"only {agreement:.1%} of the boundaries agree with the teacher tokenizer {teacher_name} "
                        f"(at least {alignment.MIN_BOUNDARY_AGREEMENT:.0%} needed, distil_ja/alignment.py): "
                        "a wrong --teacher_tokenizer, or text one side's normaliser rewrites?")


def binarize(inputs, tokenizer, output_dir, *, num_workers=None, unit=None, shard_size=20_000_000,
             lines_per_chunk=2048, overwrite=False, lowercase=True, progress=True, allow_bad_text=False,
             teacher_tokenizer=None, chat_template=None, max_len=None):
    """Binarize rinna-layout text, or conversations (.jsonl); returns the manifest dict (also written
    to output_dir). unit: "doc" (default) or "line", text only; chat_template (a template file) and
    max_len: conversations only.

    Raises DataError for unusable inputs (bad text too, unless allow_bad_text) and UsageError for
    bad options, tokenizers and output folders (see the module docstring); an interrupt is
    re-raised saying the output is incomplete.
    """
    check_options(unit, shard_size, lines_per_chunk, num_workers)
    outputs.will_replace(output_dir, overwrite, "--overwrite", "--output_dir")  # refused before any reading
    files = find_inputs(inputs, TEXT_SUFFIXES + chat.CHAT_SUFFIXES)
    is_chat = is_chat_input(files)
    check_chat_options(is_chat, unit, teacher_tokenizer, chat_template, max_len)
    encoder = load_encoder(tokenizer, lowercase)
    job = load_chat_job(encoder, tokenizer, chat_template, max_len) if is_chat else None
    teacher = None if teacher_tokenizer is None else alignment.TeacherEncoder(teacher_tokenizer)
    vocab_size = encoder.vocab_size if job is None else job.encoder.vocab_size
    t0 = time.time()
    try:
        prepare_output_dir(output_dir, overwrite)
        writer = ShardWriter(output_dir, shard_size, shards.dtype_for_vocab(vocab_size))
        counts = InputCounts(files, allow_bad_text)
        write_shards(writer, files, encoder, unit or "doc", num_workers or os.cpu_count() or 1, lines_per_chunk,
                     progress, counts, teacher, job)
        counts.check_unk()  # refused: the shards stay, without a manifest (incomplete)
        totals = totals_of(writer.shards)
        check_aligned_share(totals, teacher_tokenizer)
        totals.update(lines=int(counts.lines.sum()), undecodable_lines=int(counts.undecodable.sum()))
        if job is not None:
            totals["cut_turns"] = job.cut_turns
        manifest = shards.write_manifest(output_dir, {
            "tokenizer": {**encoder.identity(), "vocab_size": vocab_size},
            "unit": CONVERSATION if job else unit or "doc", "dtype": writer.dtype.name, "shard_size": shard_size,
            "inputs": files, "input_counts": counts.manifest_entries(), "bad_text": counts.settings(),
            "shards": writer.shards, "totals": totals,
            **({} if job is None else {"chat_template": chat.template_identity(job.template, job.source),
                                       "max_len": job.max_len}),
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
    if job is not None:
        job.log_summary()
    return manifest


def log_summary(totals, elapsed):
    logger.info(
        "%d documents, %d sequences, %d tokens (%d <unk>, %.4f%%) in %d shards; %d lines (%d not valid UTF-8); "
        "%.1fs, %.0f tokens/s",
        totals["documents"], totals["sequences"], totals["tokens"], totals["unk_tokens"],
        100.0 * totals["unk_tokens"] / max(totals["tokens"], 1), totals["shards"], totals.get("lines", 0),
        totals.get("undecodable_lines", 0), elapsed, totals["tokens"] / max(elapsed, 1e-9),
    )
    if "conversations" in totals:
        logger.info("%d conversations: %d assistant tokens (%.1f%% of the tokens, the loss mask's 1s); %d turns cut "
                    "at max_len", totals["conversations"], totals["assistant_tokens"],
                    100.0 * totals["assistant_tokens"] / max(totals["tokens"], 1), totals.get("cut_turns", 0))


def build_parser():
    parser = ArgumentParser(description="Binarize rinna-layout text (see module docstring).")
    parser.add_argument("--input", nargs="+", required=True,
                        help="doc_data directories or .txt files; or conversations: .jsonl files (or folders of them)")
    parser.add_argument("--tokenizer", required=True, help="hub name (rinna/japanese-gpt2-medium) or directory")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--unit", choices=UNITS, default=None,
                        help="text only. doc (default): <s> document </s> (rinna); line: <s> line </s> (knok)")
    parser.add_argument("--shard_size", type=int, default=20_000_000,
                        help="tokens per shard (approx.; the parent holds one shard: ~4 bytes/token of RAM)")
    parser.add_argument("--lines_per_chunk", type=int, default=2048, help="lines per worker task")
    parser.add_argument("--no_lowercase", action="store_true", help="do not lowercase (not for rinna)")
    parser.add_argument("--teacher_tokenizer", default=None,
                        help="a teacher's tokenizer of another vocabulary (hub name or folder): also write the teacher's "
                             "ids of the same text, as written, and the alignment of the two (cross-tokenizer KD)")
    parser.add_argument("--chat_template", default=None, metavar="FILE",
                        help="conversations: a Jinja chat template file, instead of the tokenizer's own")
    parser.add_argument("--max_len", type=int, default=None,
                        help="conversations: the longest sequence, cut at turn starts (default: the tokenizer's "
                             f"model_max_length, or {chat.DEFAULT_MAX_LEN})")
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
             teacher_tokenizer=args.teacher_tokenizer, chat_template=args.chat_template, max_len=args.max_len)


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
