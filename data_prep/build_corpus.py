#!/usr/bin/env python
"""Build rinna-layout training text from a Wikipedia CirrusSearch dump, CC-100 or plain text.

    python data_prep/build_corpus.py --source jawiki-cirrus \
        --input jawiki-20240101-cirrussearch-content.json.gz --output_dir corpus/jawiki --dev_docs 2000
    python data_prep/build_corpus.py --source cc100 --input ja.txt.xz --output_dir corpus/cc100
    python data_prep/build_corpus.py --source text --input my.txt --output_dir corpus/mine

Output (rinna's layout):
    DIR/doc_data/0.txt, 1.txt, ...  ~--lines_per_file lines each; one sentence (jawiki) or
                                    paragraph (cc100, text) per line; a blank line after each
                                    document; a document never spans two files.
    DIR/dev_data/0.txt              --dev_docs documents held out (seeded reservoir sample).
    DIR/stats.json                  the summary counts (also logged).

Sources:
    jawiki-cirrus  *.json.gz CirrusSearch content dump (JSON lines alternating index headers
                   and documents with a "text" field).  Cleaned as rinna did: NFKC, control
                   characters removed, citation marks ([12], [注 3]) and notes ([要出典],
                   [リンク切れ] ...) removed, leftover {{...}} templates removed, leading
                   breadcrumbs/hatnotes and footnote/reference tails cut, whitespace collapsed;
                   split into sentences (data_prep/text_clean.py: rule-based, quote/bracket
                   aware); sentences outside --min_chars..--max_chars (1..1024) and maths
                   (\\displaystyle) dropped.
    cc100          CC-100 ja.txt or ja.txt.xz: a paragraph per line, a blank line between documents.
    text           UTF-8 text, a blank line between documents (or --doc_per_line).

Parallel (--num_workers N, default: the cores this process may use minus one, at least 1):
one reader in the parent decompresses and cuts the text into chunks of about --chunk_kb at
document boundaries; N worker processes clean, split and filter the chunks; the parent writes
their documents in input order.  The output (doc_data/, dev_data/, stats.json) is byte-identical
whatever N: a chunk is cut only where the documents before and after it are the same as in one
pass (jawiki-cirrus, --doc_per_line: any line end; otherwise before a non-blank line that follows
a blank one).  At most 2 chunks per worker are in flight, so memory stays flat in corpus size.
A multi-block .xz (as `xz -T0` writes, or concatenated .xz files) is decompressed by the workers
themselves, one block each (data_prep/xz_blocks.py), so the reader is no longer the limit.

Bad input never crashes: undecodable bytes are replaced (lines counted), unparsable JSON
lines are skipped (counted), empty documents are dropped (counted).  A truncated or corrupt
.gz/.xz keeps what was read (of a multi-block .xz: the blocks before the damaged one), and the
run ends with an error naming the file (exit status 1).

Exit status (distil_ja/cli.py): 0 done; 1 an input is missing, truncated, corrupt or unreadable
(what was read is kept), or the inputs hold no document; 2 bad flags, an output folder in the way
(doc_data/ or dev_data/ exists, no --overwrite) or not writable; 4 a worker process died (killed,
out of memory); 130 interrupted.  stats.json is written last: an output without it is incomplete
(interrupted, a worker died); a doc_data/N.txt is renamed into place only once complete.
"""
import collections
import concurrent.futures
import contextlib
import gzip
import json
import logging
import lzma
import multiprocessing
import os
import queue
import random
import re
import resource
import signal
import sys
import threading
import time
import zlib
from pathlib import Path

from tqdm import tqdm

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import xz_blocks
from data_prep.text_clean import clean_wiki_text, has_math, normalize_line, split_sentences
from distil_ja import fileio, outputs, workers
from distil_ja.cli import (DISK_FULL, ArgumentParser, DataError, UsageError, WorkerError, first_line, run_command,
                           setup_logging)
from distil_ja.tokenization import find_inputs

logger = logging.getLogger("build_corpus")

SOURCES = ("jawiki-cirrus", "cc100", "text")
_TRUNCATION_ERRORS = (EOFError, lzma.LZMAError, zlib.error, OSError)
CHUNK_KB = 4096  # text per worker task
READ_SIZE = 1 << 18  # bytes asked of a decompressor at a time
MP_START_ENV = "BUILD_CORPUS_MP_START"  # fork / spawn / forkserver: overrides the start method


class Stats(collections.Counter):
    """Summary counters plus the list of damaged input files."""

    def __init__(self):
        super().__init__()
        self.damaged = []


def default_num_workers():
    """The cores this process may use minus one (the parent reads and writes), at least 1."""
    return max(1, workers.usable_cores() - 1)


# ----------------------------------------------------------------------------------------
# where a chunk may be cut: the documents on both sides are the same as in one pass

_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a whitespace-only line with the newline before it
MORE, NO_CUT = -1, -2  # first_cut: the data seen so far cannot tell / the data has no cut


def _opens_document(raw_line):
    return bool(normalize_line(raw_line.decode("utf-8", errors="replace")))


def first_cut(data, paragraphs, complete):
    """The first position in data where a chunk may start, or MORE (more data could tell; only when
    not complete) or NO_CUT.

    A line source (jawiki-cirrus, --doc_per_line) may be cut after any newline.  A paragraph
    source only before a line that is not blank after normalization and follows a whitespace-only
    line: there no document is open, and the line resets the run of empty documents, so the
    worker starting there is in the state a single pass would be in.  The rule looks at data from
    its start only, so two workers scanning the same block (one to start, one to end its chunk)
    find the same cut.
    """
    if not paragraphs:
        at = data.find(b"\n")
        return at + 1 if at >= 0 else (NO_CUT if complete else MORE)
    for m in _BLANK_LINE.finditer(data):
        end = data.find(b"\n", m.end())
        if end < 0:
            break
        if _opens_document(data[m.end():end]):
            return m.end()
    return NO_CUT if complete else MORE


def last_cut(data, paragraphs, tail=1 << 16):
    """The last position in data (all of it known) where a chunk may end, or NO_CUT.  The last
    `tail` bytes are searched first (a match found from any position is a real blank line), the
    rest only when they hold no cut."""
    if not paragraphs:
        at = data.rfind(b"\n")
        return at + 1 if at >= 0 else NO_CUT
    for start in (max(0, len(data) - tail), 0):
        for m in reversed(list(_BLANK_LINE.finditer(data, start))):
            end = data.find(b"\n", m.end())
            if end >= 0 and _opens_document(data[m.end():end]):
                return m.end()
        if start == 0:
            break
    return NO_CUT


# ----------------------------------------------------------------------------------------
# worker side: a chunk of raw text -> its cleaned documents


def split_lines(data, stats):
    """Decoded lines of raw text (as iterating a binary file gives them); bad bytes replaced."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the text ends with a newline
    for raw in lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            stats["lines_with_bad_bytes"] += 1
        stats["input_lines"] += 1
        yield line.rstrip("\r")


def _sentences(text, stats, min_chars, max_chars):
    out = []
    for sentence in split_sentences(text):
        if has_math(sentence):
            stats["sentences_dropped_math"] += 1
        elif not (min_chars <= len(sentence) <= max_chars):
            stats["sentences_dropped_length"] += 1
        else:
            out.append(sentence)
    return out


def iter_cirrus_docs(lines, stats, min_chars=1, max_chars=1024):
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            stats["json_lines_skipped"] += 1
            continue
        if not isinstance(obj, dict) or "index" in obj:
            continue
        text = obj.get("text")
        if not isinstance(text, str):
            stats["json_lines_skipped"] += 1
            continue
        if obj.get("namespace", 0) != 0:
            stats["docs_skipped_namespace"] += 1
            continue
        stats["docs_read"] += 1
        yield _sentences(clean_wiki_text(text), stats, min_chars, max_chars)


def iter_paragraph_docs(lines, stats, doc_per_line=False, split=False, min_chars=1, max_chars=None):
    """Blank-line separated documents (cc100, text) or one document per line."""
    doc = []
    counted_empty = True  # a run of extra blank lines counts as one empty document
    for line in lines:
        line = normalize_line(line)
        if not line:
            if doc_per_line:
                continue
            if doc:
                stats["docs_read"] += 1
                yield doc
                doc = []
                counted_empty = False
            elif not counted_empty:
                stats["docs_dropped_empty"] += 1
                counted_empty = True
            continue
        counted_empty = False
        if split:
            doc.extend(_sentences(line, stats, min_chars, max_chars or 10**9))
        else:
            doc.append(line)
        if doc_per_line:
            stats["docs_read"] += 1
            yield doc
            doc = []
    if doc:
        stats["docs_read"] += 1
        yield doc


class Options(collections.namedtuple("Options", "source doc_per_line split min_chars max_chars")):
    """What a worker needs to clean a chunk."""

    @property
    def paragraphs(self):
        """Documents run over several lines (and a chunk may be cut only between them)."""
        return self.source != "jawiki-cirrus" and not self.doc_per_line


ChunkResult = collections.namedtuple("ChunkResult", "text doc_ends doc_lines counts damaged")
"""A cleaned chunk: its documents' UTF-8 text ("\\n"-joined lines) back to back, where each ends,
their line counts, the counters (dict) and, for a damaged block, the error (else None)."""


def clean_chunk(data, options, damaged=None):
    """The documents of one chunk of raw text, as a ChunkResult (documents with no line are counted
    as empty and left out)."""
    stats = collections.Counter()
    lines = split_lines(data, stats)
    if options.source == "jawiki-cirrus":
        docs = iter_cirrus_docs(lines, stats, options.min_chars, options.max_chars)
    else:
        docs = iter_paragraph_docs(lines, stats, doc_per_line=options.doc_per_line, split=bool(options.split),
                                   min_chars=options.min_chars,
                                   max_chars=options.max_chars if options.split else None)
    parts, doc_ends, doc_lines, size = [], [], [], 0
    for doc in docs:
        if not doc:
            stats["docs_dropped_empty"] += 1
            continue
        text = "\n".join(doc).encode("utf-8")
        parts.append(text)
        size += len(text)
        doc_ends.append(size)
        doc_lines.append(len(doc))
    return ChunkResult(b"".join(parts), doc_ends, doc_lines, dict(stats), damaged)


_BLOCKS = {}  # path -> its xz blocks, read once per worker process


def read_block_chunk(path, index, paragraphs):
    """(text, error) of the chunk that starts in block `index` of a multi-block .xz: from the
    block's first cut (the file's start for block 0) to the first cut of a later block (or the
    end).  error is the first damage met (what was decompressed before it is returned)."""
    blocks = _BLOCKS.get(path) or _BLOCKS.setdefault(path, xz_blocks.read_blocks(path))
    parts = []
    try:
        with open(path, "rb") as f:
            data = xz_blocks.BlockReader(f, blocks[index]).read_all()
            start = 0 if index == 0 else first_cut(data, paragraphs, complete=True)
            if start == NO_CUT:
                return b"", None  # the chunk of an earlier block runs through this one
            parts = [memoryview(data)[start:]]
            for block in blocks[index + 1:]:
                head, cut = _block_head(f, block, paragraphs)
                parts.append(head if cut == NO_CUT else head[:cut])
                if cut != NO_CUT:
                    break
    except _TRUNCATION_ERRORS as e:
        return b"".join(parts), _damage(path, e)
    return b"".join(parts), None


def _damage(path, err):
    """How a damaged or unreadable input is named in the log, the error line and stats.json."""
    return f"{path}: {type(err).__name__}: {first_line(err)}"


def _block_head(f, block, paragraphs):
    """(decompressed text, its first cut) of a block, decompressing only as far as the cut."""
    reader = xz_blocks.BlockReader(f, block)
    head, size = bytearray(), 1 << 16
    while True:
        head += reader.read(size)
        cut = first_cut(head, paragraphs, complete=reader.remaining == 0)
        if cut != MORE:
            return bytes(head), cut
        size *= 2


def clean_task(task, options):
    """A worker's job: a chunk given as text, or as a block of an .xz to decompress first."""
    if task[0] == "text":
        return clean_chunk(task[1], options)
    _, path, index = task
    data, damaged = read_block_chunk(path, index, options.paragraphs)
    return clean_chunk(data, options, damaged)


def _init_worker():
    """Workers ignore Ctrl-C: the parent alone handles it (one message, then it ends the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------
# parent side: the reader


class _CountingFile:
    """A raw file that counts the (compressed) bytes read from it, for the progress bar."""

    def __init__(self, f):
        self.f, self.bytes_read = f, 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.bytes_read += len(data)
        return data

    def read1(self, size=-1):
        data = self.f.read1(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        self.bytes_read += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def _open_text_stream(raw, path):
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".xz"):
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_tasks(files, options, chunk_bytes):
    """The reader: (task, file index, compressed bytes read for it) in input order.  A task is
    ("text", raw text), ("block", path, block index), or ("damaged", message) after the last chunk
    read of a damaged file."""
    for index, path in enumerate(files):
        blocks = xz_blocks.blocks(path)
        if blocks:
            logger.info("%s: %d xz blocks, decompressed by the workers", path, len(blocks))
            for b, block in enumerate(blocks):
                yield ("block", path, b), index, block.compressed_size
        else:
            yield from _stream_tasks(path, index, options.paragraphs, chunk_bytes)


def _stream_tasks(path, index, paragraphs, chunk_bytes):
    """Chunks of one file decompressed here, cut at safe places (see first_cut)."""
    try:
        raw_file = open(path, "rb")
    except OSError as e:  # unreadable: damaged, like a truncated file
        yield ("damaged", _damage(path, e)), index, 0
        return
    with raw_file:
        raw = _CountingFile(raw_file)
        stream, buf, scan_at, reported = _open_text_stream(raw, path), bytearray(), chunk_bytes, 0
        damaged = None
        while True:
            try:
                data = stream.read1(READ_SIZE)  # one decompression step: damage loses little
            except _TRUNCATION_ERRORS as e:
                damaged = _damage(path, e)  # logged when its turn to be written comes
                del buf[buf.rfind(b"\n") + 1:]  # a line cut by the damage is not kept
                data = b""
            if not data:
                break
            buf += data
            if len(buf) >= scan_at:
                cut = last_cut(buf, paragraphs)
                if cut == NO_CUT:
                    scan_at = 2 * len(buf)  # a document longer than a chunk: look again at twice the size
                    continue
                yield ("text", bytes(buf[:cut])), index, raw.bytes_read - reported
                reported = raw.bytes_read
                del buf[:cut]
                scan_at = chunk_bytes
        if buf:
            yield ("text", bytes(buf)), index, raw.bytes_read - reported
        elif raw.bytes_read > reported:
            yield ("text", b""), index, raw.bytes_read - reported
        if damaged:
            yield ("damaged", damaged), index, 0


class Reader(threading.Thread):
    """Runs iter_tasks in a thread (decompression releases the GIL) into a bounded queue; the
    parent's main thread submits and writes meanwhile.  An exception (a bug, an unreadable file)
    is handed over and raised in the main thread."""

    END = object()

    def __init__(self, tasks, maxsize):
        super().__init__(daemon=True, name="build_corpus-reader")
        self.cpu_seconds = 0.0  # the thread's CPU time, once it has read everything
        self.tasks, self.queue, self.stopped = tasks, queue.Queue(maxsize), threading.Event()

    def run(self):
        try:
            for item in self.tasks:
                if not self._put(item):
                    return
            self.cpu_seconds = time.thread_time()
            self._put(self.END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self._put(e)

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self.END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self):
        self.stopped.set()


# ----------------------------------------------------------------------------------------
# parent side: workers and the ordered write


def _done(result):
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


def ordered_results(tasks, executor, options, max_in_flight):
    """(result, file index, compressed bytes) per task, in task order, never more than
    max_in_flight tasks submitted and not yet handed back (flat memory)."""
    pending = collections.deque()
    for task, index, size in tasks:
        if task[0] == "damaged":  # no work: the marker goes through in its place
            future = _done(ChunkResult(b"", [], [], {}, task[1]))
        else:
            future = executor.submit(clean_task, task, options)
        pending.append((future, index, size))
        if len(pending) >= max_in_flight:
            yield _result(*pending.popleft())
    while pending:
        yield _result(*pending.popleft())


def _result(future, index, size):
    try:
        return future.result(), index, size
    except concurrent.futures.process.BrokenProcessPool as e:
        raise WorkerError("a worker process died (killed, or out of memory?); rerun, perhaps with fewer "
                          "--num_workers") from e


class DocDataWriter:
    """Writes documents to DIR/N.txt files of about lines_per_file lines; each file is written as
    N.txt.tmp and renamed when complete (an interrupted run leaves no torn N.txt)."""

    def __init__(self, directory, lines_per_file):
        self.directory = directory
        self.lines_per_file = lines_per_file
        os.makedirs(directory, exist_ok=True)
        self.file_index = -1
        self.handle = None
        self.lines_in_file = 0
        self.documents = 0
        self.lines = 0

    def write(self, doc, n_lines):
        """Write one document: its UTF-8 text (lines joined by newlines) and its number of lines."""
        if self.handle is None or self.lines_in_file >= self.lines_per_file:
            self._next_file()
        self.handle.write(doc)
        self.handle.write(b"\n\n")
        self.lines_in_file += n_lines
        self.lines += n_lines
        self.documents += 1

    def _path(self, index):
        return os.path.join(self.directory, f"{index}.txt")

    def _next_file(self):
        self.close()
        self.file_index += 1
        self.handle = open(self._path(self.file_index) + fileio.TMP_SUFFIX, "wb")
        self.lines_in_file = 0

    def close(self):
        """Finish the open file (renamed to N.txt)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            os.replace(self._path(self.file_index) + fileio.TMP_SUFFIX, self._path(self.file_index))

    def abandon(self):
        """Stop without finishing the open file: its .tmp is removed, wherever an interrupt struck
        (even between closing it and renaming it)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.file_index >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(self.file_index) + fileio.TMP_SUFFIX)

    @property
    def files(self):
        return self.file_index + 1


INPUT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".json.gz", ".json")


def check_options(source, lines_per_file, num_workers=1, chunk_kb=CHUNK_KB):
    """Refuse bad options before anything is read or written (UsageError, exit 2)."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if lines_per_file < 1:
        raise UsageError("--lines_per_file must be positive")
    if num_workers is not None and num_workers < 0:
        raise UsageError("--num_workers must be 0 (the default: usable cores minus one) or more")
    if chunk_kb < 1:
        raise UsageError("--chunk_kb must be positive")


def prepare_output(output_dir, overwrite):
    """(train_dir, dev_dir): an earlier run's folders are refused (UsageError) or, with overwrite,
    emptied, so no file of an earlier run is mixed into this one. Each is deleted only under
    distil_ja.outputs' rule (it holds this toolkit's marker, or nothing): a doc_data/ of your own
    is refused, however it got there."""
    dirs = (os.path.join(output_dir, "doc_data"), os.path.join(output_dir, "dev_data"))
    for d in dirs:
        if outputs.will_replace(d, overwrite, "--overwrite"):
            outputs.empty(d)
        outputs.claim(d, "build_corpus.py")
    return dirs


def check_output(output_dir, overwrite):
    """Everything prepare_output would refuse, refused before anything is read or written."""
    outputs.check_folder(output_dir, "--output_dir")
    for d in ("doc_data", "dev_data"):
        outputs.will_replace(os.path.join(output_dir, d), overwrite, "--overwrite")


class Reservoir:
    """A seeded reservoir sample of `size` documents; offer() returns the document to train on
    (None while the sample fills; an evicted one goes to training)."""

    def __init__(self, size, seed):
        self.size, self.rng, self.seen, self.docs = size, random.Random(seed), 0, []

    def offer(self, doc):
        if self.size <= 0:
            return doc
        self.seen += 1
        if len(self.docs) < self.size:
            self.docs.append(doc)
            return None
        j = self.rng.randrange(self.seen)
        if j < self.size:
            self.docs[j], doc = doc, self.docs[j]
        return doc


def write_documents(results, writer, stats, reservoir, bar):
    """Write the results' documents in order, holding back the reservoir's sample; a damaged input's
    later results are dropped (what was read before the damage is kept)."""
    damaged_files = set()
    for result, index, size in results:
        bar.update(size)
        if index in damaged_files:
            continue
        stats.update(result.counts)
        text, start = memoryview(result.text), 0
        for end, n_lines in zip(result.doc_ends, result.doc_lines):
            piece = text[start:end] if reservoir.size <= 0 else bytes(text[start:end])  # kept: not a view
            doc = reservoir.offer((piece, n_lines))
            if doc is not None:
                writer.write(*doc)
            start = end
        if result.damaged:
            damaged_files.add(index)
            stats.damaged.append(result.damaged)
            logger.error("%s: truncated or corrupt; kept what was read before the damage", result.damaged)


def write_dev(reservoir, dev_dir, lines_per_file):
    if reservoir.docs:
        dev = DocDataWriter(dev_dir, lines_per_file)
        for doc in reservoir.docs:
            dev.write(*doc)
        dev.close()


def summarize(stats, writer, reservoir, extra):
    """stats.json's content: the counters, the damaged inputs, the run's settings."""
    stats["train_documents"] = writer.documents
    stats["train_lines"] = writer.lines
    stats["train_files"] = writer.files
    stats["dev_documents"] = len(reservoir.docs)
    stats["dev_lines"] = sum(n for _, n in reservoir.docs)
    summary = dict(sorted(stats.items()))
    summary["damaged_inputs"] = stats.damaged
    summary.update(extra)
    return summary


def check_inputs_were_usable(stats, stats_path):
    """DataError, after the output is written, when an input was damaged (what was read is kept)
    or no document was found at all."""
    if stats.damaged:
        more = f" (and {len(stats.damaged) - 1} more, see {stats_path})" if len(stats.damaged) > 1 else ""
        raise DataError(f"truncated or corrupt input, kept what was read: {stats.damaged[0]}{more}")
    if not stats["train_documents"] + stats["dev_documents"]:
        raise DataError(f"no documents in the inputs (counts in {stats_path})")


def start_workers(num_workers):
    """The worker pool, its processes started now: fork must come before the reader thread and
    tqdm's monitor thread exist."""
    ctx = multiprocessing.get_context(workers.start_method(MP_START_ENV))
    executor = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker)
    executor.submit(int).result()  # starts the processes (all at once under fork)
    return executor


def build_corpus(source, inputs, output_dir, *, lines_per_file=1_000_000, dev_docs=0, seed=42,
                 doc_per_line=False, split=None, min_chars=1, max_chars=1024, overwrite=False,
                 progress=True, num_workers=0, chunk_kb=CHUNK_KB):
    """Run the whole build; returns the Stats.

    Raises UsageError for bad options or an output folder in the way (or not writable), and
    DataError for missing inputs, and (after writing all that was read, stats.json included)
    for damaged inputs or inputs without a document; WorkerError when a worker process dies and
    KeyboardInterrupt (saying the output is incomplete) on Ctrl-C.
    """
    check_options(source, lines_per_file, num_workers, chunk_kb)
    check_output(output_dir, overwrite)
    files = find_inputs(inputs, suffixes=INPUT_SUFFIXES)
    num_workers = num_workers or default_num_workers()
    options = Options(source, doc_per_line, split, min_chars, max_chars)
    stats = Stats()
    stats_path = os.path.join(output_dir, "stats.json")
    try:
        train_dir, dev_dir = prepare_output(output_dir, overwrite)
        if os.path.exists(stats_path):  # an earlier run's: this output is not complete until rewritten
            os.remove(stats_path)
        writer = DocDataWriter(train_dir, lines_per_file)
        reservoir = Reservoir(dev_docs, seed)
        reader_cpu = _run_workers(files, options, num_workers, chunk_kb * 1024, writer, stats, reservoir, progress)
        write_dev(reservoir, dev_dir, lines_per_file)
        summary = summarize(stats, writer, reservoir,
                            {"source": source, "inputs": files, "seed": seed, "lines_per_file": lines_per_file})
        fileio.write_json(stats_path, summary)
    except OSError as e:  # input reading errors are counted in stats.damaged: this is the output
        if e.errno in DISK_FULL:  # exit 1 and the disk-full line (cli.run_command), not a usage error
            raise
        raise UsageError(f"cannot write {output_dir}: {first_line(e)}") from e
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{output_dir} is incomplete (no stats.json)") from None
    except WorkerError as e:
        raise WorkerError(f"{e}; {output_dir} is incomplete (no stats.json)") from e
    logger.info("summary: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    parent, children = _cpu_seconds()
    logger.info("cpu: parent (reader, writer) %.2fs, of which the reader thread %.2fs; workers %.2fs", parent,
                reader_cpu, children)
    check_inputs_were_usable(stats, stats_path)
    return stats


def _cpu_seconds():
    """(this process's, its finished children's) CPU time, user + system: what the stages cost
    whatever else the machine runs (bench/corpus_bench.py reads them from the log)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _run_workers(files, options, num_workers, chunk_bytes, writer, stats, reservoir, progress):
    """Read, clean in num_workers processes and write, in order; on any failure the open file is
    abandoned (no torn N.txt) and the workers and the reader are stopped.  Returns the reader
    thread's CPU seconds."""
    executor = start_workers(num_workers)
    reader = Reader(iter_tasks(files, options, chunk_bytes), maxsize=num_workers + 1)
    total = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total, desc="build_corpus", unit="B", unit_scale=True, disable=not progress,
               mininterval=1.0)
    finished = False
    try:
        reader.start()
        write_documents(ordered_results(reader, executor, options, 2 * num_workers), writer, stats, reservoir, bar)
        finished = True
        return reader.cpu_seconds
    finally:
        bar.close()
        reader.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        if finished:
            writer.close()
        else:
            writer.abandon()


def build_parser():
    parser = ArgumentParser(description="Build rinna-layout training text (see module docstring).")
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--input", nargs="+", required=True, help="input files or directories")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--lines_per_file", type=int, default=1_000_000)
    parser.add_argument("--dev_docs", type=int, default=0, help="documents held out to dev_data/ (seeded)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--doc_per_line", action="store_true", help="text: each line is a document")
    parser.add_argument("--split_sentences", action="store_true",
                        help="cc100/text: split paragraphs into sentences (always on for jawiki-cirrus)")
    parser.add_argument("--min_chars", type=int, default=1)
    parser.add_argument("--max_chars", type=int, default=1024)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="cleaning processes (default 0: the usable cores minus one, at least 1)")
    parser.add_argument("--chunk_kb", type=int, default=CHUNK_KB, help="text per worker task (KiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(argv):
    args = build_parser().parse_args(argv)
    build_corpus(
        args.source, args.input, args.output_dir, lines_per_file=args.lines_per_file,
        dev_docs=args.dev_docs, seed=args.seed, doc_per_line=args.doc_per_line,
        split=args.split_sentences, min_chars=args.min_chars, max_chars=args.max_chars,
        overwrite=args.overwrite, progress=not args.quiet, num_workers=args.num_workers,
        chunk_kb=args.chunk_kb,
    )


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
