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

Bad input never crashes: undecodable bytes are replaced (lines counted), unparsable JSON
lines are skipped (counted), empty documents are dropped (counted).  A truncated or corrupt
.gz/.xz keeps what was read, and the run ends with an error naming the file (exit status 1).

Exit status (distil_ja/cli.py): 0 done; 1 an input is missing, truncated, corrupt or unreadable
(what was read is kept), or the inputs hold no document; 2 bad flags, an output folder in the way
(doc_data/ or dev_data/ exists, no --overwrite) or not writable; 130 interrupted.
"""
import collections
import json
import logging
import lzma
import os
import random
import sys
import zlib
from pathlib import Path

from tqdm import tqdm

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.text_clean import clean_wiki_text, has_math, normalize_line, split_sentences
from distil_ja import fileio, outputs
from distil_ja.cli import DISK_FULL, ArgumentParser, DataError, UsageError, first_line, run_command, setup_logging
from distil_ja.tokenization import find_inputs, open_binary

logger = logging.getLogger("build_corpus")

SOURCES = ("jawiki-cirrus", "cc100", "text")
_TRUNCATION_ERRORS = (EOFError, lzma.LZMAError, zlib.error, OSError)


class Stats(collections.Counter):
    """Summary counters plus the list of damaged input files."""

    def __init__(self):
        super().__init__()
        self.damaged = []


def iter_lines(path, stats):
    """Decoded lines of one (possibly compressed) file; tolerant of bad bytes and truncation."""
    try:
        with open_binary(path) as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    stats["lines_with_bad_bytes"] += 1
                stats["input_lines"] += 1
                yield line.rstrip("\r\n")
    except _TRUNCATION_ERRORS as e:
        stats.damaged.append(f"{path}: {type(e).__name__}: {first_line(e)}")
        logger.error("%s is truncated or corrupt (%s); keeping what was read", path, e)


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


def iter_cirrus_docs(path, stats, min_chars=1, max_chars=1024):
    for line in iter_lines(path, stats):
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


def iter_paragraph_docs(path, stats, doc_per_line=False, split=False, min_chars=1, max_chars=None):
    """Blank-line separated documents (cc100, text) or one document per line."""
    doc = []
    counted_empty = True  # a run of extra blank lines counts as one empty document
    for line in iter_lines(path, stats):
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


class DocDataWriter:
    """Writes documents to DIR/N.txt files of about lines_per_file lines."""

    def __init__(self, directory, lines_per_file):
        self.directory = directory
        self.lines_per_file = lines_per_file
        os.makedirs(directory, exist_ok=True)
        self.file_index = -1
        self.handle = None
        self.lines_in_file = 0
        self.documents = 0
        self.lines = 0

    def write(self, doc):
        if self.handle is None or self.lines_in_file >= self.lines_per_file:
            self._next_file()
        self.handle.write("\n".join(doc))
        self.handle.write("\n\n")
        self.lines_in_file += len(doc)
        self.lines += len(doc)
        self.documents += 1

    def _next_file(self):
        if self.handle is not None:
            self.handle.close()
        self.file_index += 1
        self.handle = open(os.path.join(self.directory, f"{self.file_index}.txt"), "w", encoding="utf-8")
        self.lines_in_file = 0

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    @property
    def files(self):
        return self.file_index + 1


INPUT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".json.gz", ".json")


def check_options(source, lines_per_file):
    """Refuse bad options before anything is read or written (UsageError, exit 2)."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if lines_per_file < 1:
        raise UsageError("--lines_per_file must be positive")


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


def iter_source_docs(source, files, stats, *, doc_per_line, split, min_chars, max_chars):
    for path in files:
        if source == "jawiki-cirrus":
            yield from iter_cirrus_docs(path, stats, min_chars, max_chars)
        else:
            yield from iter_paragraph_docs(path, stats, doc_per_line=doc_per_line, split=bool(split),
                                           min_chars=min_chars, max_chars=max_chars if split else None)


def write_documents(docs, writer, stats, dev_docs, seed):
    """Write docs to writer, holding back a seeded reservoir sample of dev_docs documents
    (returned; an evicted one goes to training)."""
    rng = random.Random(seed)
    reservoir = []
    seen = 0
    for doc in docs:
        if not doc:
            stats["docs_dropped_empty"] += 1
            continue
        if dev_docs <= 0:
            writer.write(doc)
            continue
        seen += 1
        if len(reservoir) < dev_docs:
            reservoir.append(doc)
            continue
        j = rng.randrange(seen)
        if j < dev_docs:
            reservoir[j], doc = doc, reservoir[j]
        writer.write(doc)
    return reservoir


def write_dev(reservoir, dev_dir, lines_per_file):
    if reservoir:
        dev = DocDataWriter(dev_dir, lines_per_file)
        for doc in reservoir:
            dev.write(doc)
        dev.close()


def summarize(stats, writer, reservoir, extra):
    """stats.json's content: the counters, the damaged inputs, the run's settings."""
    stats["train_documents"] = writer.documents
    stats["train_lines"] = writer.lines
    stats["train_files"] = writer.files
    stats["dev_documents"] = len(reservoir)
    stats["dev_lines"] = sum(len(d) for d in reservoir)
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


def build_corpus(source, inputs, output_dir, *, lines_per_file=1_000_000, dev_docs=0, seed=42,
                 doc_per_line=False, split=None, min_chars=1, max_chars=1024, overwrite=False,
                 progress=True):
    """Run the whole build; returns the Stats.

    Raises UsageError for bad options or an output folder in the way (or not writable), and
    DataError for missing inputs, and (after writing all that was read, stats.json included)
    for damaged inputs or inputs without a document.
    """
    check_options(source, lines_per_file)
    check_output(output_dir, overwrite)
    files = find_inputs(inputs, suffixes=INPUT_SUFFIXES)
    stats = Stats()
    stats_path = os.path.join(output_dir, "stats.json")
    try:
        train_dir, dev_dir = prepare_output(output_dir, overwrite)
        docs = iter_source_docs(source, files, stats, doc_per_line=doc_per_line, split=split,
                                min_chars=min_chars, max_chars=max_chars)
        writer = DocDataWriter(train_dir, lines_per_file)
        bar = tqdm(docs, desc="documents", unit="doc", disable=not progress, mininterval=1.0)
        try:
            reservoir = write_documents(bar, writer, stats, dev_docs, seed)
        finally:
            bar.close()
            writer.close()
        write_dev(reservoir, dev_dir, lines_per_file)
        summary = summarize(stats, writer, reservoir,
                            {"source": source, "inputs": files, "seed": seed, "lines_per_file": lines_per_file})
        fileio.write_json(stats_path, summary)
    except OSError as e:  # input reading errors are counted in stats.damaged: this is the output
        if e.errno in DISK_FULL:  # exit 1 and the disk-full line (cli.run_command), not a usage error
            raise
        raise UsageError(f"cannot write {output_dir}: {first_line(e)}") from e
    logger.info("summary: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    check_inputs_were_usable(stats, stats_path)
    return stats


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(argv):
    args = build_parser().parse_args(argv)
    build_corpus(
        args.source, args.input, args.output_dir, lines_per_file=args.lines_per_file,
        dev_docs=args.dev_docs, seed=args.seed, doc_per_line=args.doc_per_line,
        split=args.split_sentences, min_chars=args.min_chars, max_chars=args.max_chars,
        overwrite=args.overwrite, progress=not args.quiet,
    )


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
