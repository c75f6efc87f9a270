"""The bad-text rules every reader of raw text applies: binarize.py, evaluate.py, --eval_data, quality.py.

Text in another encoding (cp932, EUC-JP) decodes to U+FFFD and tokenizes to <unk>: it binarizes
and scores "fine" and means nothing. Two limits catch it:

- a file whose lines are more than MAX_UNDECODABLE_LINE_FRACTION invalid UTF-8 is refused as soon
  as it has been read (per file, so a bad file after a long good one is still caught);
- an overall <unk> rate over MAX_UNK_TOKEN_FRACTION (on at least UNK_CHECK_MIN_TOKENS tokens) is
  refused once everything is encoded, naming the files with the highest rates.

Both are a DataError (exit 1) naming the file and pointing to iconv, unless the command's own
override (`allow`) is given: then a warning says the same.
"""

import logging

import numpy as np

from distil_ja.cli import DataError

logger = logging.getLogger("distil_ja")

MAX_UNDECODABLE_LINE_FRACTION = 0.01  # of one input file's lines
MAX_UNK_TOKEN_FRACTION = 0.05  # of all tokens
UNK_CHECK_MIN_TOKENS = 1000  # a rate over fewer tokens says nothing about the text
ICONV = "e.g. iconv -f cp932 -t utf-8 IN > OUT"


def _percent(part, whole) -> str:
    return f"{100.0 * part / max(whole, 1):.2f}%"


class TextChecks:
    """Per-file counts (lines, undecodable lines, tokens, <unk>) and the two refusals.

    allow: the command's override was given (warn instead of refusing); allow_hint: how to give it,
    for the message, e.g. "or pass --allow_bad_text to binarize it anyway".
    """

    def __init__(self, files, allow: bool = False, allow_hint: str = ""):
        self.files = [str(f) for f in files]
        self.allow = allow
        self.allow_hint = allow_hint
        n = len(self.files)
        self.lines = np.zeros(n, dtype=np.int64)
        self.undecodable = np.zeros(n, dtype=np.int64)
        self.tokens = np.zeros(n, dtype=np.int64)
        self.unk = np.zeros(n, dtype=np.int64)

    def file_read(self, index: int, path, lines: int, undecodable: int) -> None:
        """iter_text_lines' on_file (with the file's index bound): record, and refuse a file over the limit."""
        self.lines[index], self.undecodable[index] = lines, undecodable
        if not undecodable:
            return
        over = undecodable > MAX_UNDECODABLE_LINE_FRACTION * lines
        message = f"{path}: {undecodable:,} of {lines:,} lines ({_percent(undecodable, lines)}) are not valid UTF-8"
        if over and not self.allow:
            raise DataError(f"{message} (limit {MAX_UNDECODABLE_LINE_FRACTION:.0%}): convert it to UTF-8 ({ICONV}) "
                            f"{self.allow_hint} (undecodable bytes become <unk>)")
        logger.warning("%s; their undecodable bytes become <unk>%s", message,
                       " (over the limit, allowed)" if over else "")

    def add_tokens(self, index: int, tokens: int, unk: int) -> None:
        self.tokens[index] += tokens
        self.unk[index] += unk

    def add_sequences(self, index: int, sequences, unk_id: int) -> None:
        """Count the tokens and <unk> of encoded sequences of file `index`."""
        for ids in sequences:
            ids = np.asarray(ids)
            self.add_tokens(index, len(ids), int(np.count_nonzero(ids == unk_id)))

    def check_unk(self) -> None:
        """Refuse (or, allowed, warn about) an overall <unk> rate over the limit."""
        tokens, unk = int(self.tokens.sum()), int(self.unk.sum())
        if tokens < UNK_CHECK_MIN_TOKENS or unk <= MAX_UNK_TOKEN_FRACTION * tokens:
            return
        rate = self.unk / np.maximum(self.tokens, 1)
        worst = [i for i in np.argsort(-rate, kind="stable")[:3].tolist() if self.unk[i]]
        most = ", ".join(f"{self.files[i]} {_percent(self.unk[i], self.tokens[i])} of {self.tokens[i]:,}"
                         for i in worst)
        message = (f"{unk:,} of {tokens:,} tokens ({_percent(unk, tokens)}) are <unk> (limit "
                   f"{MAX_UNK_TOKEN_FRACTION:.0%}); highest rates: {most}")
        if not self.allow:
            raise DataError(f"{message}: text in another encoding or a script the tokenizer lacks? Convert it to "
                            f"UTF-8 ({ICONV}) or use a tokenizer that covers it, {self.allow_hint}")
        logger.warning("%s (allowed)", message)

    def settings(self) -> dict:
        return {"allowed": self.allow, "max_undecodable_line_fraction": MAX_UNDECODABLE_LINE_FRACTION,
                "max_unk_token_fraction": MAX_UNK_TOKEN_FRACTION, "unk_check_min_tokens": UNK_CHECK_MIN_TOKENS}
