"""Two tokenizations of one text, lined up by character offsets; the pieces two vocabularies share.

A student (rinna-style sentencepiece, text NFKC-normalised and lowercased line by line) and a teacher
with another tokenizer (any transformers fast tokenizer, reading the text as it was written) cut the
same document differently. Position i of a sequence predicts what follows the text its tokens
0..i cover, so a student position and a teacher position predict the same next text exactly when
their prefixes end at the same character offset of the original text: they are *aligned*.

    text      "今日は雨"              (a document of one line)
    student   <s> ▁ 今日 は 雨 </s>    ends 0 0 2 3 4 -
    teacher   <bos> 今 日は 雨 <eos>    ends 0 1 3 4 -
    alignment  1 -> 0 (the last of the two student positions ending at 0: "▁" predicts 今日)
               3 -> 2 (は and 日は end at 3), 4 -> 3 (雨: both predict their end of text)
               <s> (0), 今日 (2) and </s> (5): -1

Rules, each tested:
- An end offset is counted in characters of the original text; a document is its lines joined by
  "\\n". The student never sees the newlines: the last token of a line ends after its newline.
- The student's offsets come from sentencepiece (byte offsets into the normalised line), mapped back
  to the original line cluster by cluster (a character with the combining marks or sound marks that
  compose with it): a normaliser that changes lengths ('㍻' -> '平成', 'ｶﾞ' -> 'ガ') maps the end of
  each cluster's normalised text to the end of the cluster, and every offset inside it to none. If
  normalising cluster by cluster does not give the line's normalisation, only the line's end aligns.
- The teacher's come from its pieces' bytes (GPT-2 byte-level pieces decoded by the byte table,
  sentencepiece "▁" as a space and <0xNN> pieces as bytes, a dummy leading space dropped); a piece
  that ends inside a character (part of its UTF-8 bytes) ends nowhere. When the pieces do not spell
  the text back, the tokenizer's offset mapping is used, conservatively: a token whose span overlaps
  the next token's ends nowhere.
- Where several positions of one side end at one offset (zero-width pieces such as a lone "▁"), only
  the last aligns: it is the one that predicts the next character. Byte-fallback pieces other than a
  character's last end inside it (sentencepiece reports them as empty spans at its start).
- The student's <s> ends at 0 and aligns with the teacher's bos, when the teacher has one; the two
  </s>/eos positions predict nothing and align with nothing.
"""

import hashlib
import json
import unicodedata
from functools import lru_cache

import numpy as np

from distil_ja.cli import UsageError, first_line
from distil_ja.tokenization import normalize_text

# Boundary agreement: aligned positions / the positions of the side with fewer (each side's </s> or
# eos excluded), i.e. the share of the coarser tokenization's boundaries that the finer one has too;
# 1 when one cuts wherever the other does. Unlike the share of student positions aligned (logged too,
# what the KD term sees), it does not fall merely because the teacher's pieces are longer. Measured by
# bench/alignment_share.py (bench/RESULTS.md, "cross-tokenizer alignment"): 0.92-0.99 on 2 MB of jawiki
# (0.86-0.95 on the sample text) for a unigram student against a unigram, cased unigram or byte-level BPE
# teacher. A corpus under this is refused:
# a pair this far apart means most characters are rewritten by one side's normaliser or merged into
# <unk> runs, and too few positions compare.
MIN_BOUNDARY_AGREEMENT = 0.5

_COMPOSING = {"\u3099", "\u309a", "\uff9e", "\uff9f"}  # kana sound marks, also half-width


def _follows(char: str) -> bool:
    """A character that NFKC may compose with the one before it."""
    return unicodedata.combining(char) != 0 or char in _COMPOSING or "\u1160" <= char <= "\u11ff"


def normalised_offsets(line: str, normalize) -> tuple[str, np.ndarray]:
    """(normalize(line), at): at[k] is the original offset where the normalised prefix of length k
    ends, or -1 where it ends inside a cluster's expansion (k = 0 .. len(normalised))."""
    norm = normalize(line)
    if line.isascii() and len(norm) == len(line):
        return norm, np.arange(len(line) + 1, dtype=np.int64)
    at, parts, start = [0], [], 0
    for end in range(1, len(line) + 1):
        if end < len(line) and _follows(line[end]):
            continue
        piece = normalize(line[start:end])
        parts.append(piece)
        if piece:
            at += [-1] * (len(piece) - 1) + [end]
        else:  # the cluster vanished: the boundary moves to its end
            at[-1] = end
        start = end
    if "".join(parts) != norm:  # composition across clusters: only the line's start and end are sure
        at = [0] + [-1] * (len(norm) - 1) + [len(line)] if norm else [0]
    return norm, np.asarray(at, dtype=np.int64)


def _char_at_byte(text: str) -> np.ndarray:
    """For each byte offset 0 .. len(utf8) of text, the character offset there, or -1 inside a character."""
    lengths = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
    out = np.full(int(lengths.sum()) + 1, -1, dtype=np.int64)
    out[np.concatenate(([0], np.cumsum(lengths)))] = np.arange(len(text) + 1)
    return out


def student_lines(encoder, lines: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """Each line's ids (as DocumentEncoder.encode_batch gives them) and each id's end offset in the
    original line (-1: inside a character or a cluster's expansion)."""
    if not lines:
        return []
    texts, maps = zip(*(normalised_offsets(line, encoder.preprocess) for line in lines))
    protos = encoder.sp.encode(list(texts), return_type="proto", num_threads=encoder.num_threads)
    out = []
    for text, at, proto in zip(texts, maps, protos):
        char_at = _char_at_byte(text)
        ids = [piece.id for piece in proto.pieces]
        chars = char_at[[piece.end for piece in proto.pieces]] if ids else np.zeros(0, dtype=np.int64)
        # sentencepiece gives the bytes of a byte-fallback character but the last an empty span at its
        # start: they end inside the character, not before it
        partial = np.array([p.begin == p.end and encoder.sp.is_byte(p.id) for p in proto.pieces], dtype=bool)
        ends = np.where((chars >= 0) & ~partial, at[chars.clip(min=0)], -1)
        out.append((ids, ends))
    return out


def student_sequence_ends(encoded: list[tuple[list[int], np.ndarray]], lines: list[str]) -> np.ndarray:
    """End offsets of a document's student sequence, <s> + every line's ids + </s>, in the text
    "\\n".join(lines): the newline after a line belongs to the token ending that line."""
    parts, start = [np.zeros(1, dtype=np.int64)], 0
    for k, ((_, ends), line) in enumerate(zip(encoded, lines)):
        last = k == len(lines) - 1
        shifted = np.where(ends >= 0, ends + start, -1)
        if not last:
            shifted = np.where(ends == len(line), start + len(line) + 1, shifted)
        parts.append(shifted)
        start += len(line) + 1
    parts.append(np.full(1, -1, dtype=np.int64))
    return np.concatenate(parts)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes: printable bytes stand for themselves, the others for
    the characters from U+0100 on, in order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    found = json.loads(backend.to_str())
    return "ByteLevel" in json.dumps(found.get("decoder")) or "ByteLevel" in json.dumps(found.get("pre_tokenizer"))


def piece_bytes(piece: str, byte_level: bool) -> bytes | None:
    """The bytes a piece stands for (None: not whole bytes of text, e.g. a special token)."""
    if byte_level:
        table = _byte_decoder()
        if not all(c in table for c in piece):
            return None
        return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return piece.replace("\u2581", " ").encode("utf-8")


class TeacherEncoder:
    """The teacher's ids of a text as it was written, and the end offset of each (alignment's rules).

    "As written" is as the teacher reads text: a tokenizer that declares rinna's recipe (`do_lower_case`
    in its config: rinna's and make_tokenizer.py's, which transformers itself ignores) was trained on
    NFKC-normalised, lowercased text, so it gets that, its offsets mapped back to the original text
    cluster by cluster as the student's are; any other tokenizer sees the text as it is, with its own
    normaliser (a cased teacher reads cased text). evaluate.py's TokenizerEncoder follows the same rule.
    """

    def __init__(self, name_or_dir):
        from distil_ja.tokenization import load_tokenizer

        self.name = str(name_or_dir)
        try:
            self.tokenizer = load_tokenizer(self.name)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load --teacher_tokenizer {self.name!r}: {first_line(err)}") from err
        if not getattr(self.tokenizer, "is_fast", False):
            raise UsageError(f"--teacher_tokenizer {self.name!r} is not a fast (Rust) tokenizer: no offsets")
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise UsageError(f"--teacher_tokenizer {self.name!r} defines no end-of-text token (eos)")
        self.byte_level = _is_byte_level(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.lowercase = bool(self.tokenizer.init_kwargs.get("do_lower_case", False))
        self.surfaces = piece_texts(self.tokenizer)  # within_pieces counts depths in these

    def encode(self, text: str) -> tuple[list[int], np.ndarray]:
        """Content ids of text (no special tokens added, none parsed from the text) and their ends in it."""
        if not self.lowercase:
            return self._encode(text)
        norm, at = normalised_offsets(text, normalize_text)
        ids, ends = self._encode(norm)
        return ids, np.where(ends >= 0, at[ends.clip(min=0)], -1)

    def _encode(self, text: str) -> tuple[list[int], np.ndarray]:
        if not text:
            return [], np.zeros(0, dtype=np.int64)
        found = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                               split_special_tokens=True)
        ids = list(found["input_ids"])
        ends = self._ends_from_bytes(text, ids)
        if ends is None:
            ends = _ends_from_offsets(found["offset_mapping"], self.tokenizer.convert_ids_to_tokens(ids))
        return ids, ends

    def _ends_from_bytes(self, text: str, ids: list[int]) -> np.ndarray | None:
        pieces = [piece_bytes(p, self.byte_level) for p in self.tokenizer.convert_ids_to_tokens(ids)]
        if any(p is None for p in pieces):
            return None
        data = text.encode("utf-8")
        spelled = b"".join(pieces)
        lead = 0
        if spelled != data:
            if spelled != b" " + data:
                return None
            lead = 1  # sentencepiece's dummy prefix
        byte_ends = np.cumsum([len(p) for p in pieces]) - lead
        return _char_at_byte(text)[byte_ends.clip(min=0)]

    def sequence(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """[bos] + ids + [eos] of a document's text, and the ends (bos at 0, eos -1)."""
        ids, ends = self.encode(text)
        head = [] if self.bos_id is None else [self.bos_id]
        t_ids = np.asarray(head + ids + [self.eos_id], dtype=np.int32)
        t_ends = np.concatenate((np.zeros(len(head), dtype=np.int64), ends, [-1]))
        return t_ids, t_ends


def _ends_from_offsets(offsets, pieces: list[str]) -> np.ndarray:
    """Ends from a (start, end) character offset mapping, where the pieces do not spell the text (a
    normaliser rewrote it). A whitespace piece overlapping the next token (sentencepiece's "▁", whose
    span the mapping smears over the next character) ends where the next starts; any other token
    overlapping the next (part of a character's bytes), or empty, ends nowhere."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = spans[:, 1].copy()
    for j in range(len(spans) - 1):
        if spans[j, 1] > spans[j + 1, 0]:
            blank = not pieces[j].replace("\u2581", "").replace("\u0120", "").strip()
            ends[j] = spans[j + 1, 0] if blank else -1
    ends[spans[:, 1] <= spans[:, 0]] = -1
    return ends


def align(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """For each student position, the teacher position whose prefix ends at the same offset, or -1.

    Of several positions of one side ending at one offset, only the last counts (module docstring).
    """
    teacher_last = {int(e): j for j, e in enumerate(teacher_ends) if e >= 0}
    student_last = {int(e): i for i, e in enumerate(student_ends) if e >= 0}
    out = np.full(len(student_ends), -1, dtype=np.int32)
    for offset, i in student_last.items():
        j = teacher_last.get(offset)
        if j is not None:
            out[i] = j
    return out


# Inside a teacher piece: a student position that ends k characters into a teacher piece (1 <= k <=
# MAX_DEPTH) predicts the next character of a text the teacher reads as one piece. The teacher's row
# before that piece, restricted to the pieces that begin with those k characters, and for the piece that
# is those k characters alone the row read after it, give the teacher's next-character distribution there
# (within_pieces; losses.char_buckets). Deeper positions are rare (a
# piece of over 16 characters) and stay unaligned; the depth is stored as uint8.
MAX_DEPTH = 15


def within_pieces(student_ends: np.ndarray, teacher_ends: np.ndarray, teacher_ids, surfaces,
                  aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alignment, depth): `aligned` (align's) with the student positions that end inside a teacher piece
    added, and per student position its depth, the characters it ends into that piece (0: at an end).

    For such a position the alignment holds the teacher position j before the piece (the last one ending
    before it), the piece being teacher_ids[j + 1]: row j's distribution over pieces, restricted to those
    that begin with the piece's first k characters, and the row read after the piece of those k
    characters alone, give the teacher's next-character distribution there (losses.char_buckets).

        text      "今日は"            student <s> ▁ 今 日 は </s>   ends 0 0 1 2 3 -
        teacher   <bos> 今日は <eos>   ends 0 3 -
        student 今 (end 1): depth 1 into 今日は, alignment 0 (the bos row); 日 (end 2): depth 2, alignment 0;
        は (end 3): aligned with 今日は's position (depth 0).

    Counted in the piece's surface characters (surfaces[id], piece_texts'), from its end: only a piece
    whose surface is as long as the text it covers, or begins with a space and is one longer (a dummy
    leading space), takes positions inside it (not one whose length a normaliser changed, nor one
    without a surface); nor does a piece after a position ending nowhere (part of a character), and no
    depth is over MAX_DEPTH.
    """
    alignment, depth = aligned.copy(), np.zeros(len(student_ends), dtype=np.uint8)
    teacher_last = {int(e): j for j, e in enumerate(teacher_ends) if e >= 0}
    offsets = np.array(sorted(teacher_last), dtype=np.int64)
    if not len(offsets):
        return alignment, depth
    student_last = {int(e): i for i, e in enumerate(student_ends) if e >= 0}
    for offset, i in student_last.items():
        if alignment[i] >= 0:
            continue
        before = int(np.searchsorted(offsets, offset)) - 1
        if before < 0:
            continue
        start = int(offsets[before])
        j = teacher_last[start]
        if j + 1 >= len(teacher_ends) or teacher_ends[j + 1] <= offset:
            continue
        end = int(teacher_ends[j + 1])
        surface = surfaces[int(teacher_ids[j + 1])] or ""
        extra = len(surface) - (end - start)
        k = len(surface) - (end - offset)
        if (extra == 0 or (extra == 1 and surface.startswith(" "))) and 1 <= k <= MAX_DEPTH:
            alignment[i], depth[i] = j, k
    return alignment, depth


def cut_pieces(alignment: np.ndarray, depth: np.ndarray, teacher_ids: np.ndarray, cut: np.ndarray,
               exact: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, pieces, rows) of one sequence: the student positions inside a teacher piece whose first
    k characters are a teacher piece s of their own, and no shorter piece begins them (cut and exact:
    within_piece_tables' third and fourth tables), s, and the teacher position j before the piece. The teacher's
    next-character distribution there is, beside the pieces that go on past s, the share of s times the
    teacher's row read after s (losses.char_buckets): the teacher reads s at position j + 1, as if its
    tokenizer had cut there."""
    inside = np.flatnonzero((alignment >= 0) & (depth > 0))
    rows = alignment[inside].astype(np.int64)
    k, piece = depth[inside].astype(np.int64), teacher_ids[rows + 1].astype(np.int64)
    pieces = cut[k, piece] if len(inside) else rows
    keep = (pieces >= 0) & exact[k, piece]  # only where that target is exact (losses.VocabMap.exact_at)
    return inside[keep].astype(np.int64), pieces[keep].astype(np.int64), rows[keep]


# ---- vocabularies --------------------------------------------------------------------------


def pieces_of(tokenizer) -> list[str]:
    """The tokenizer's pieces in id order (added tokens included)."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def same_vocabulary(a, b) -> bool:
    """Two tokenizers with the same pieces in the same id order (not only the same size)."""
    return len(a) == len(b) and pieces_of(a) == pieces_of(b)


def tokenizer_identity(tokenizer, source) -> dict:
    """What binarize.py --teacher_tokenizer records and train.py checks: name, size, special ids and a
    sha256 over the pieces in id order."""
    digest = hashlib.sha256("\n".join(pieces_of(tokenizer)).encode("utf-8")).hexdigest()
    special = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "unk", "pad")}
    return {"name": str(source), "vocab_size": len(tokenizer), "special_ids": special, "sha256": digest}


def piece_texts(tokenizer) -> list[str | None]:
    """Each id's surface string: the text it stands for (None: a special token, a byte-fallback piece,
    or bytes that are not whole UTF-8)."""
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = []
    for i, piece in enumerate(pieces_of(tokenizer)):
        surface = None
        if i not in special and piece is not None and not (
                not byte_level and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6):
            raw = piece_bytes(piece, byte_level)
            try:
                surface = raw.decode("utf-8") if raw is not None else None
            except UnicodeDecodeError:
                surface = None
        texts.append(surface or None)
    return texts


def _surfaces(tokenizer) -> dict[str, int]:
    """Surface string -> lowest id, for the pieces that spell whole UTF-8 text (special tokens excluded)."""
    found = {}
    for i, surface in enumerate(piece_texts(tokenizer)):
        if surface and surface not in found:
            found[surface] = i
    return found


END, OTHER = 0, 1  # next-character classes: the end of the text (eos), and what has no class both sides share


def _first_character(surface: str | None) -> str | None:
    """The first character a piece writes, spaces skipped (sentencepiece's dummy space and GPT-2's
    leading space mark a word start, not text the other side writes); None (class OTHER) for a piece
    of spaces only, which says nothing of the next character."""
    stripped = (surface or "").lstrip(" ")
    return stripped[0] if stripped else None


def next_character_classes(student, teacher) -> tuple[np.ndarray, np.ndarray, int]:
    """(student class per id, teacher class per id, number of classes) of the next-character events.

    Whatever the tokenizer, the probability that the text goes on with character c is the sum of the
    probabilities of the pieces that begin with c: the first piece of any continuation begins with
    its first character. So the two models' next-character distributions compare exactly. Classes:
    END (each side's eos), OTHER (special tokens, partial bytes, a first character only one
    vocabulary begins a piece with), then one per character both vocabularies begin pieces with.
    """
    firsts = [[_first_character(t) for t in piece_texts(tok)] for tok in (student, teacher)]
    common = sorted(set(c for c in firsts[0] if c) & set(c for c in firsts[1] if c))
    index = {c: k + 2 for k, c in enumerate(common)}
    classes = []
    for tok, first in zip((student, teacher), firsts):
        cls = np.array([index.get(c, OTHER) for c in first], dtype=np.int64)
        if tok.eos_token_id is not None:
            cls[tok.eos_token_id] = END
        classes.append(cls)
    return classes[0], classes[1], len(common) + 2


def exact_depths(cut: np.ndarray) -> np.ndarray:
    """exact[k, id] (bool, cut's shape): no piece is piece id's first a characters for 0 < a < k, so that
    every way the teacher writes those k characters begins with them or a longer piece, and the KD term's
    target there is exact (losses.char_buckets); true at depths 0 and 1."""
    shorter = np.zeros(cut.shape, dtype=bool)
    shorter[2:] = np.logical_or.accumulate(cut[1:-1] >= 0, axis=0)
    return ~shorter


def within_piece_tables(teacher, teacher_classes: np.ndarray, n_classes: int,
                        max_depth: int = MAX_DEPTH) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, classes, cut, exact), each (max_depth + 1, V_t): what the KD term needs at a depth
    (within_pieces).

    prefix[k, id]: a number for the piece's first k surface characters, the same for two pieces exactly
    when those agree (-1: the piece is shorter than k characters, or has no surface), so the pieces that
    begin with a piece's first k characters are those with its prefix[k]; prefix[0] is 0 for every id.
    classes[k, id]: the next-character class of the piece's text after its first k characters (spaces
    skipped, as next_character_classes does at k = 0, which is teacher_classes), or CUT = n_classes (one
    past the last) for a piece of exactly k characters: the teacher's piece ends there, and what comes
    next is the teacher's row after that piece. cut[k, id]: the piece (lowest id) whose surface is the
    first k characters of piece id, longer than k, or -1: the piece after which that row is read
    (losses.char_buckets). exact: exact_depths(cut). teacher_classes and n_classes:
    next_character_classes', whose character classes are read off them.
    """
    texts = piece_texts(teacher)
    # a character's class, as next_character_classes gave it to the teacher's pieces that begin with it
    index = {_first_character(t): int(c) for t, c in zip(texts, teacher_classes) if c > OTHER}
    surfaces = _surfaces(teacher)
    prefix = np.full((max_depth + 1, len(texts)), -1, dtype=np.int32)
    classes = np.full((max_depth + 1, len(texts)), OTHER, dtype=np.int64)
    cut = np.full((max_depth + 1, len(texts)), -1, dtype=np.int64)
    prefix[0], classes[0] = 0, teacher_classes
    for k in range(1, max_depth + 1):
        numbers = {}
        for i, text in enumerate(texts):
            if text is not None and len(text) >= k:
                prefix[k, i] = numbers.setdefault(text[:k], len(numbers))
                if len(text) == k:
                    classes[k, i] = n_classes
                    continue
                cut[k, i] = surfaces.get(text[:k], -1)
                if first := _first_character(text[k:]):
                    classes[k, i] = index.get(first, OTHER)
    return prefix, classes, cut, exact_depths(cut)


def shared_vocabulary(student, teacher) -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of the pieces both vocabularies have, one to one: the same surface
    string, and the special tokens by role (bos, eos, unk, pad; an id already paired is not paired again)."""
    pairs, used_s, used_t = [], set(), set()
    for role in ("eos", "bos", "unk", "pad"):
        s, t = getattr(student, f"{role}_token_id", None), getattr(teacher, f"{role}_token_id", None)
        if s is not None and t is not None and s not in used_s and t not in used_t:
            pairs.append((s, t))
            used_s.add(s)
            used_t.add(t)
    teacher_surfaces = _surfaces(teacher)
    for surface, s in _surfaces(student).items():
        t = teacher_surfaces.get(surface)
        if t is not None and s not in used_s and t not in used_t:
            pairs.append((s, t))
            used_s.add(s)
            used_t.add(t)
    pairs.sort()
    return (np.array([s for s, _ in pairs], dtype=np.int64), np.array([t for _, t in pairs], dtype=np.int64))
