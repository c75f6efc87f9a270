"""Tokenizer loading and the fast document encoder shared by binarize and evaluation.

rinna/japanese-gpt2-medium's tokenizer is a sentencepiece unigram model (``spiece.model``)
loaded as ``T5Tokenizer(extra_ids=0)``.  Its vocabulary is lowercase, but transformers
ignores its ``do_lower_case=True``, so text must be lowercased explicitly; calling the
tokenizer appends ``</s>`` and never adds ``<s>``.  rinna trained the teacher on documents
``<s>`` + ids of each line (each line encoded separately, concatenated) + ``</s>``.

``DocumentEncoder`` reproduces exactly that with sentencepiece directly (batch-encoded in
C++, no ``</s>`` appended, no special-token parsing of the text), and gives the same ids as
the transformers tokenizer called on ``normalize_text(line)`` minus its trailing ``</s>``.
"""
import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import unicodedata
import zlib

from distil_ja import hub
from distil_ja.cli import DataError, first_line

SPIECE = "spiece.model"


def normalize_text(text):
    """NFKC then lowercase: what the teacher's (lowercase) vocabulary expects.

    NFKC first, because it can produce uppercase letters (e.g. '℡' -> 'TEL').  For ordinary
    text this equals ``text.lower()`` up to NFKC, which sentencepiece's nmt_nfkc applies anyway.
    """
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).lower()


# ----------------------------------------------------------------------------------------
# reading text


def open_binary(path):
    """Open a plain, .gz, .xz or .bz2 file for binary reading."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".txt.bz2")


def expand_paths(path_or_paths, suffixes=TEXT_SUFFIXES):
    """Files named by path_or_paths; a directory contributes its text files in natural order
    (0.txt, 1.txt, ..., 10.txt).  Raises FileNotFoundError for a missing path."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    files = []
    for p in path_or_paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            names = sorted((n for n in os.listdir(p) if n.endswith(suffixes)), key=_natural_key)
            files.extend(os.path.join(p, n) for n in names)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return files


def find_inputs(inputs, suffixes=TEXT_SUFFIXES):
    """expand_paths for a command's --input, with its failures as DataError (exit 1): a missing
    path, or paths that name no input file, are bad data, not bad flags."""
    with reading_inputs():
        files = expand_paths(inputs, suffixes)
    if not files:
        names = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
        raise DataError(f"no input files ({', '.join(suffixes)}) in {', '.join(map(os.fspath, names))}")
    return files


@contextlib.contextmanager
def reading_inputs():
    """Reading errors of input files (missing, unreadable, truncated, corrupt) as DataError.

    The readers here raise OSError/ValueError, which examples/ code catches by those types;
    a command wraps its reading in this so its exit status says 'bad data' (1).
    """
    try:
        yield
    except (OSError, ValueError) as e:
        raise DataError(first_line(e)) from e


def iter_text_lines(path_or_paths, on_file=None):
    """Lines (without newline) of text files/directories; undecodable bytes become U+FFFD.

    on_file(path, lines, undecodable_lines), when given, is called as each file ends, before
    the next one is opened: its number of lines and how many of them were not valid UTF-8
    (text that already holds U+FFFD is valid UTF-8 and not counted).  It may raise to stop.
    Counting costs nothing on valid lines: the strict decode is tried first, as before.
    """
    for path in expand_paths(path_or_paths):
        lines = undecodable = 0
        try:
            with open_binary(path) as f:
                for lines, raw in enumerate(f, 1):
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("utf-8", errors="replace")
                        undecodable += 1
                    yield text.rstrip("\r\n")
        except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path} is truncated or corrupt: {e}") from e
        if on_file is not None:
            on_file(path, lines, undecodable)


def iter_documents(path_or_paths, on_file=None):
    """Documents of rinna-layout text (one sentence/paragraph per line, a blank line after
    each document): yields each document as a list of lines.  Documents never span files.
    on_file: as iter_text_lines (called before the file's last document is yielded)."""
    for path in expand_paths(path_or_paths):
        doc = []
        for line in iter_text_lines(path, on_file):
            if line.strip():
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc


# ----------------------------------------------------------------------------------------
# tokenizers


def load_tokenizer(name_or_dir):
    """A transformers tokenizer for a hub name or a local directory.

    AutoTokenizer first; for rinna-style directories (spiece.model without a usable config)
    falls back to ``T5Tokenizer(extra_ids=0)``.  Remember to lowercase text yourself.
    """
    from transformers import AutoTokenizer, T5Tokenizer

    hub.check_fetchable(name_or_dir, "tokenizer", "tokenizer_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as first:  # noqa: BLE001 - any failure: try the rinna-style loader
        if not os.path.isfile(os.path.join(name_or_dir, SPIECE)):
            raise  # elsewhere the fallback "succeeds" with a tokenizer of 4 tokens
        try:
            tok = T5Tokenizer.from_pretrained(name_or_dir, extra_ids=0)
        except Exception:
            raise first
    return fix_unigram_unk_id(tok)


def fix_unigram_unk_id(tok):
    """Point the backend Unigram model's unknown id at ``tok.unk_token_id``.

    transformers 5.x builds T5Tokenizer's Unigram model with ``unk_id=2`` (T5's layout), so
    with rinna's layout (<unk>=0, </s>=2) every unknown character would become ``</s>``.
    Returns tok (patched in place when needed).
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.unk_token_id is None:
        return tok
    import json

    from tokenizers.models import Unigram

    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") == "Unigram" and model.get("unk_id") != tok.unk_token_id:
        vocab = [(piece, score) for piece, score in model["vocab"]]
        backend.model = Unigram(vocab, unk_id=tok.unk_token_id, byte_fallback=model.get("byte_fallback", False))
    return tok


def resolve_spiece(name_or_dir):
    """Path of the sentencepiece model of a local directory, a model file, or a hub name."""
    if os.path.isfile(name_or_dir):
        return name_or_dir
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, SPIECE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name_or_dir} has no {SPIECE}")
        return path
    if hub.looks_local(name_or_dir):
        raise FileNotFoundError(f"no such tokenizer directory: {name_or_dir}")
    hub.check_fetchable(name_or_dir, "tokenizer", SPIECE)
    from huggingface_hub import hf_hub_download  # hub name, e.g. rinna/japanese-gpt2-medium

    try:
        return hf_hub_download(name_or_dir, SPIECE)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no spiece.model ...
        raise OSError(f"cannot get {SPIECE} of {name_or_dir!r} from the Hugging Face hub: {first_line(e)}") from e


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class DocumentEncoder:
    """Fast teacher-exact encoder: sentencepiece directly, lowercased input.

    encode_lines(lines) -> list[int]: each line normalized (NFKC + lowercase) and encoded
        separately, ids concatenated; no special tokens.
    encode_document(lines, unit='doc'|'line') -> list[list[int]]:
        'doc'  (rinna): one sequence [<s>] + encode_lines(lines) + [</s>]
        'line' (knok):  one [<s>] + ids + [</s>] per non-empty line.
    """

    def __init__(self, name_or_dir, lowercase=True, num_threads=1):
        import sentencepiece as spm

        self.name = os.fspath(name_or_dir)
        self.spiece_path = resolve_spiece(self.name)
        self.sp = spm.SentencePieceProcessor(model_file=self.spiece_path)
        self.lowercase = lowercase
        self.num_threads = num_threads
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {
            "unk": self.sp.unk_id(),
            "bos": self.sp.bos_id(),
            "eos": self.sp.eos_id(),
            "pad": self.sp.pad_id(),
        }
        for key, value in self.special_ids.items():
            if value < 0:
                raise ValueError(f"{self.spiece_path} defines no {key} id")
        self.bos_id = self.special_ids["bos"]
        self.eos_id = self.special_ids["eos"]
        self.unk_id = self.special_ids["unk"]
        self._sha256 = None

    @property
    def spiece_sha256(self):
        if self._sha256 is None:
            self._sha256 = sha256_file(self.spiece_path)
        return self._sha256

    def identity(self):
        """Tokenizer identity as recorded in binarize manifests."""
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_ids),
            "spiece_sha256": self.spiece_sha256,
            "lowercase": self.lowercase,
        }

    def preprocess(self, line):
        return normalize_text(line) if self.lowercase else line

    def encode_batch(self, lines):
        """ids of each line (normalized, encoded separately), as a list of lists."""
        if not lines:
            return []
        texts = [self.preprocess(line) for line in lines]
        return self.sp.encode(texts, num_threads=self.num_threads)

    def encode_line(self, line):
        """ids of one line, as encode_batch gives them, without a batch call's thread pool (about a
        millisecond a call: chat text comes in many short pieces)."""
        return self.sp.encode(self.preprocess(line))

    def encode_lines(self, lines):
        out = []
        for ids in self.encode_batch(list(lines)):
            out.extend(ids)
        return out

    def encode_document(self, lines, unit="doc"):
        if unit == "doc":
            return [[self.bos_id] + self.encode_lines(lines) + [self.eos_id]]
        if unit == "line":
            return [[self.bos_id] + ids + [self.eos_id] for ids in self.encode_batch(list(lines)) if ids]
        raise ValueError(f"unit must be 'doc' or 'line', got {unit!r}")
