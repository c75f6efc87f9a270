"""Token sequences for causal-LM distillation.

Input is the sequences of binarized shards (distil_ja.shards: what data_prep/binarize.py
writes, and what the upstream example's binarized_data.py wrote), each one `<s> ... </s>`
sequence; here they are cut to the model context, filtered and padded into batches.

A cross-tokenizer corpus (binarize.py --teacher_tokenizer) carries with each sequence the
teacher's ids of the same text and the alignment (for each student position, the teacher
position ending at the same character offset, or -1): `Aligned`. Such sequences are cut only at
aligned positions, so each piece is the same text on both sides (split_aligned).

A chat corpus (binarize.py on conversations) carries with each sequence its loss mask: 1 for each
token of the assistant's (what the model must learn to produce), 0 for the prompt's. Its batches
carry, per position, whether the next token is the assistant's: the positions every loss term
counts (losses.counted_masks); --train_on_prompt reads the corpus without it.
"""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distil_ja import shards
from distil_ja.alignment import cut_pieces
from distil_ja.cli import DataError, UsageError

logger = logging.getLogger("distillation")

MIN_SEQ_LEN = 12  # sequences of 11 tokens or fewer carry too little context to learn from
MAX_UNK_FRACTION = 0.5


@dataclass(frozen=True)
class SpecialIds:
    bos: int = 1
    eos: int = 2
    pad: int = 3
    unk: int = 0


def split_long(seq: np.ndarray, max_len: int, ids: SpecialIds) -> list[np.ndarray]:
    """Cut a sequence longer than max_len into chunks, each wrapped in <s> ... </s>."""
    return [chunk for chunk, _ in split_masked(seq, None, max_len, ids)]


def split_masked(seq: np.ndarray, mask: np.ndarray | None, max_len: int, ids: SpecialIds):
    """split_long, with a chat sequence's loss mask cut alongside: [(chunk, its mask or None)].

    The <s> and </s> a cut adds are not the assistant's (mask 0), except a final </s> that was in the
    sequence already, which keeps its own. (binarize.py cuts conversations at turn boundaries to its
    --max_len; this cut only happens when the model's context is shorter than that.)
    """
    if len(seq) <= max_len:
        return [(seq, mask)]
    start, end = 1 if seq[0] == ids.bos else 0, -1 if seq[-1] == ids.eos else None
    body = seq[start:end]
    body_mask = None if mask is None else mask[start:end]
    step = max_len - 2
    pieces = []
    for i in range(0, len(body), step):
        chunk = np.concatenate(([ids.bos], body[i : i + step], [ids.eos])).astype(seq.dtype)
        chunk_mask = None
        if mask is not None:
            last = mask[-1] if end is not None and i + step >= len(body) else 0
            chunk_mask = np.concatenate(([0], body_mask[i : i + step], [last])).astype(mask.dtype)
        pieces.append((chunk, chunk_mask))
    return pieces


@dataclass(frozen=True)
class Aligned:
    """One sequence's teacher side: the teacher's ids and, per student position, the aligned teacher
    position and the depth (distil_ja.alignment.within_pieces: 0 where both end at one offset, k >= 1
    where the student's ends k characters into the teacher's next piece; None: data binarized before
    depths, every position at 0)."""

    teacher_ids: np.ndarray
    alignment: np.ndarray
    depth: np.ndarray | None = None

    @property
    def depths(self) -> np.ndarray:
        return np.zeros(len(self.alignment), dtype=np.uint8) if self.depth is None else self.depth

    @property
    def ends(self) -> np.ndarray:
        """The positions where both tokenizations end at one offset (aligned, depth 0)."""
        return (self.alignment >= 0) & (self.depths == 0)


def split_aligned(seq: np.ndarray, side: Aligned, max_len: int, teacher_max_len: int, ids: SpecialIds):
    """Cut a sequence and its teacher side at aligned positions, so that both fit their contexts.

    The student's pieces are wrapped in <s> ... </s> as split_long's; the teacher's keep its leading
    special token (when it has one: its position 0 is aligned with <s>) and its last one (eos). A piece
    ends at the furthest aligned position within both limits. Returns ([(student, Aligned)], tokens
    dropped): where no aligned position falls within the limits, the rest of the sequence is dropped
    and counted, never cut mid-text.
    """
    if len(seq) <= max_len and len(side.teacher_ids) <= teacher_max_len:
        return [(seq, side)], 0
    head = 1 if side.alignment[0] == 0 else 0  # the teacher's leading special token
    body, t_body, t_head, t_tail = seq[1:-1], side.teacher_ids[head:-1], side.teacher_ids[:head], side.teacher_ids[-1:]
    depths = side.depths
    # boundaries after student body token b and teacher body token c (-1: the start)
    i = np.flatnonzero(side.ends[1:-1])
    bounds = [(-1, -1)] + [(int(b), int(side.alignment[b + 1]) - head) for b in i]
    pieces, start, dropped = [], 0, 0
    while start < len(bounds) - 1:
        b0, c0 = bounds[start]
        end = start
        for k in range(start + 1, len(bounds)):
            b1, c1 = bounds[k]
            if b1 - b0 + 2 > max_len or c1 - c0 + head + 1 > teacher_max_len:
                break
            end = k
        if end == start:  # the next aligned position is beyond a context: drop the rest
            dropped = len(body) - (b0 + 1)
            break
        b1, c1 = bounds[end]
        student = np.concatenate(([ids.bos], body[b0 + 1 : b1 + 1], [ids.eos])).astype(seq.dtype)
        teacher = np.concatenate((t_head, t_body[c0 + 1 : c1 + 1], t_tail)).astype(side.teacher_ids.dtype)
        original = side.alignment[b0 + 2 : b1 + 2]
        # a position inside the piece after the cut keeps the piece's row before it: the head's, if any
        shifted = np.where(original >= 0, original - (c0 + 1), -1)
        alignment = np.concatenate(([0 if head else -1], shifted, [-1])).astype(side.alignment.dtype)
        depth = np.concatenate(([0], depths[b0 + 2 : b1 + 2], [0])).astype(np.uint8)
        depth[alignment < 0] = 0
        pieces.append((student, Aligned(teacher, alignment, None if side.depth is None else depth)))
        start = end
    if start == len(bounds) - 1 and bounds[start][0] < len(body) - 1:  # text after the last aligned position
        dropped += len(body) - 1 - bounds[start][0]
    return pieces, dropped


LOSS_MASK = "loss_mask"  # the extra a chat corpus's shards carry (binarize.py)
DEPTH = "depth"  # the extra of a cross-tokenizer corpus's shards beside teacher_ids and alignment


def read_corpus(data_files, verify: bool = True, aligned: bool = False, train_on_prompt: bool = False):
    """The shards train.py and dump_teacher_logits.py read: (sequences, manifest or None, [Aligned] or None,
    loss masks or None). aligned: the corpus must carry a teacher's ids and the alignment (another
    tokenizer). A chat corpus's loss masks are read unless train_on_prompt (every token then counts)."""
    masked = LOSS_MASK in shards.carried_extras(data_files) and not train_on_prompt
    with_depth = aligned and DEPTH in shards.carried_extras(data_files)
    names = ((LOSS_MASK,) if masked else ()) + (("teacher_ids", "alignment") if aligned else ()) + \
        ((DEPTH,) if with_depth else ())
    if not names:
        return (*shards.load_sequences(data_files, verify=verify), None, None)
    sequences, manifest, extras = shards.load_sequences(data_files, verify=verify, extras=names)
    sides = None
    if aligned:
        depths = extras[DEPTH] if with_depth else [None] * len(sequences)
        sides = [Aligned(t, a, d) for t, a, d in zip(extras["teacher_ids"], extras["alignment"], depths)]
        if not with_depth:
            logger.info("The data was binarized before depths (binarize.py writes them since 2026-12-03): "
                        "--within_pieces reaches no position inside a teacher piece; binarize it again to reach them")
    if masked:
        logger.info("A chat corpus: the loss counts the positions that predict the assistant's tokens "
                    "(--train_on_prompt: every position)")
    return sequences, manifest, sides, extras.get(LOSS_MASK)


def counted_positions(mask: np.ndarray) -> np.ndarray:
    """The positions of a sequence that a loss mask counts: i where token i + 1 is the assistant's."""
    return np.flatnonzero(mask[1:])


class LmSeqsDataset(Dataset):
    """Holds sequences that fit the model context. Items are integer arrays; with a chat corpus's loss
    masks (loss_masks) (sequence, loss mask); with a teacher of another tokenizer (aligned) the teacher
    ids and the alignment follow; with an offline teacher (teacher_topk) the top-k ids and log-probs."""

    def __init__(self, sequences: list[np.ndarray], max_len: int, ids: SpecialIds = SpecialIds(),
                 aligned: list[Aligned] | None = None, teacher_max_len: int | None = None,
                 loss_masks: list[np.ndarray] | None = None):
        self.ids = ids
        n_in = len(sequences)
        dropped = 0
        if loss_masks is not None and aligned is not None:
            raise UsageError("a chat corpus (loss masks) with a teacher of another tokenizer is not supported yet")
        if aligned is None:
            masks = [None] * len(sequences) if loss_masks is None else loss_masks
            split = [piece for seq, mask in zip(sequences, masks, strict=True)
                     for piece in split_masked(seq, mask, max_len, ids)]
        else:
            split = []
            for seq, side in zip(sequences, aligned, strict=True):
                pieces, lost = split_aligned(seq, side, max_len, teacher_max_len or max_len, ids)
                split += pieces
                dropped += lost
        long_kept = [x for x in split if len(x[0]) >= MIN_SEQ_LEN]
        known = [x for x in long_kept if np.count_nonzero(x[0] == ids.unk) <= MAX_UNK_FRACTION * len(x[0])]
        kept = known if loss_masks is None else [x for x in known if len(counted_positions(x[1]))]
        logger.info(
            "Dataset: %d sequences in, %d after splitting to max_len %d, %d too short (< %d tokens) "
            "and %d mostly <unk> dropped, %d kept",
            n_in, len(split), max_len, len(split) - len(long_kept), MIN_SEQ_LEN,
            len(long_kept) - len(known), len(kept),
        )
        if dropped:
            logger.warning("Dataset: %d tokens dropped where no aligned position fell within the contexts", dropped)
        self.sequences = [x[0] for x in kept]
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        self.aligned = None if aligned is None else [x[1] for x in kept]
        self.loss_masks = None if loss_masks is None else [x[1] for x in kept]
        self.teacher_topk = None
        if self.loss_masks is not None:
            n_counted = int(self.row_counts().sum())
            logger.info("Dataset: %d sequences without an assistant token dropped; %d of %d positions (%.1f%%) "
                        "predict an assistant token and are counted", len(known) - len(kept), n_counted,
                        int(self.lengths.sum()), 100 * n_counted / max(int(self.lengths.sum()), 1))
        if self.aligned is not None:
            n_aligned = sum(int(np.count_nonzero(a.ends)) for a in self.aligned)
            n_within = sum(int(np.count_nonzero(a.depths)) for a in self.aligned)
            n_positions = max(int(self.lengths.sum()) - len(self.sequences), 1)  # every </s> predicts nothing
            logger.info("Dataset: %d of %d positions (%.1f%%) aligned with a teacher position, %d more (%.1f%%) "
                        "inside a teacher piece", n_aligned, n_positions, 100 * n_aligned / n_positions,
                        n_within, 100 * n_within / n_positions)

    @property
    def teacher_ids(self) -> list[np.ndarray] | None:
        return None if self.aligned is None else [a.teacher_ids for a in self.aligned]

    @property
    def alignments(self) -> list[np.ndarray] | None:
        return None if self.aligned is None else [a.alignment for a in self.aligned]

    def cache_extras(self) -> dict:
        """What token_cache.write_cache keeps beside the sequences (from_cache reads it back)."""
        extras = {} if self.loss_masks is None else {"loss_mask": self.loss_masks}
        if self.aligned is not None:
            extras.update(teacher_ids=self.teacher_ids, alignment=self.alignments)
            extras[DEPTH] = [a.depths for a in self.aligned]
        return extras

    def row_counts(self) -> np.ndarray:
        """Per sequence, the positions an offline teacher's dump holds a row for: every position, or with
        loss masks the counted ones (counted_positions), so a chat dump holds the assistant's rows only."""
        if self.loss_masks is None:
            return self.lengths
        return np.fromiter((len(counted_positions(m)) for m in self.loss_masks), dtype=np.int64,
                           count=len(self.loss_masks))

    @classmethod
    def from_cache(cls, folder: Path, ids: SpecialIds = SpecialIds(), teacher_topk=None) -> "LmSeqsDataset":
        """The sequences a token_cache holds (already split and filtered), memory-mapped; with an
        offline teacher (teacher_logits.TopKLogits of the same sequences), its rows too."""
        from token_cache import MappedSequences

        dataset = cls.__new__(cls)
        dataset.ids = ids
        dataset.sequences = MappedSequences(folder)
        dataset.lengths = dataset.sequences.lengths()
        dataset.teacher_topk = teacher_topk
        dataset.aligned = dataset.loss_masks = None
        if (Path(folder) / "alignment.npy").is_file():
            depth = MappedSequences(folder, DEPTH) if (Path(folder) / f"{DEPTH}.npy").is_file() else None
            dataset.aligned = CachedAligned(MappedSequences(folder, "teacher_ids"), MappedSequences(folder, "alignment"),
                                            depth)
        if (Path(folder) / "loss_mask.npy").is_file():
            dataset.loss_masks = MappedSequences(folder, "loss_mask")
        if teacher_topk is not None and not np.array_equal(teacher_topk.lengths(), dataset.row_counts()):
            raise DataError(f"{teacher_topk.folder}: its rows do not line up with the training sequences")
        return dataset

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        if self.teacher_topk is None and self.aligned is None and self.loss_masks is None:
            return self.sequences[index]
        item = (self.sequences[index],)
        if self.loss_masks is not None:
            item += (self.loss_masks[index],)
        if self.aligned is not None:
            side = self.aligned[index]
            item += (side.teacher_ids, side.alignment, side.depths)
        if self.teacher_topk is not None:
            item += tuple(self.teacher_topk[index])
        return item

    def batch_sequences(self, batch: list, multiple: int = 1, within=None) -> tuple[torch.Tensor, ...]:
        """Pad to the longest sequence, its length rounded up to a multiple of `multiple` (but never beyond
        the dataset's longest sequence, so never beyond the model context): fewer distinct shapes, so
        compiled graphs are reused. Returns (token_ids (B, S) int64, lengths (B,) int64), then

        - with loss masks: counted (B, S) bool, position i counted when token i + 1 is the assistant's;
        - with a teacher of another tokenizer: teacher_ids (B, S_t) int64 (right-padded with 0; padding
          is never attended to, attention being causal), alignment (B, S) int64: for each student
          position, the aligned position of the teacher's batch, flattened (row * S_t + position), or -1,
          depth (B, S) int64 (Aligned; 0 on padding), attach and after (pad_aligned: with `within`, the
          teacher positions appended for the positions inside a teacher piece);
        - with an offline teacher: topk_ids (B, S, k) int64 and topk_logprobs (B, S, k) float32, padded
          with 0 (padded positions are beyond `lengths`: masked); with loss masks the dump's rows are the
          counted positions', placed there (the others hold 0 and are never counted).
        """
        if self.teacher_topk is None and self.aligned is None and self.loss_masks is None:
            return self.pad_tokens(batch, multiple)
        columns = list(zip(*batch))
        token_ids, lengths = self.pad_tokens(columns.pop(0), multiple)
        out = (token_ids, lengths)
        rows = None
        if self.loss_masks is not None:
            counted = torch.zeros(token_ids.shape, dtype=torch.bool)
            rows = [torch.from_numpy(counted_positions(np.asarray(m))) for m in columns.pop(0)]
            for row, positions in enumerate(rows):
                counted[row, positions] = True
            out += (counted,)
        if self.aligned is not None:
            t_seqs, alignments, depths = columns.pop(0), columns.pop(0), columns.pop(0)
            out += self.pad_aligned(t_seqs, alignments, depths, token_ids.shape, within)
        if self.teacher_topk is not None:
            topk_ids, topk_logprobs = columns
            shape = (*token_ids.shape, self.teacher_topk.top_k)
            ids, logprobs = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.float32)
            for row, (row_ids, row_logprobs) in enumerate(zip(topk_ids, topk_logprobs)):
                where = slice(0, len(row_ids)) if rows is None else rows[row]
                ids[row, where] = torch.from_numpy(row_ids.astype(np.int64))
                logprobs[row, where] = torch.from_numpy(row_logprobs.astype(np.float32))
            out += (ids, logprobs)
        return out

    @staticmethod
    def pad_aligned(teacher_seqs, alignments, depths, shape, within=None) -> tuple[torch.Tensor, ...]:
        """(teacher_ids (B, W + E), alignment (B, S) as flattened teacher-batch positions or -1, depth (B, S),
        attach (B, E), after (B, S)).

        With `within` ((cut, exact): distil_ja.alignment.within_piece_tables' last two tables) a student
        position k characters into the teacher's next piece, whose first k characters are a piece s of their
        own and where the target is exact (cut_pieces), gets one more
        teacher position: s, placed in column W + e of its row and read after teacher position j, the row
        before the piece (attach[row, e] = j; -1: padding): models.attached_rows. `after` is that position,
        flattened, -1 elsewhere. Without within, E = 0 and after is -1 everywhere."""
        found = [cut_pieces(a, d, t, *within) if within is not None else None
                 for t, a, d in zip(teacher_seqs, alignments, depths)]
        n_extra = max((len(f[0]) for f in found if f is not None), default=0)
        width = max(len(t) for t in teacher_seqs)
        total = width + n_extra
        teacher_ids = torch.zeros((len(teacher_seqs), total), dtype=torch.long)
        alignment_ = torch.full(shape, -1, dtype=torch.long)
        depth = torch.zeros(shape, dtype=torch.long)
        attach = torch.full((len(teacher_seqs), n_extra), -1, dtype=torch.long)
        after = torch.full(shape, -1, dtype=torch.long)
        for row, (t, a, d, f) in enumerate(zip(teacher_seqs, alignments, depths, found)):
            teacher_ids[row, : len(t)] = torch.from_numpy(t.astype(np.int64))
            a = torch.from_numpy(a.astype(np.int64))
            alignment_[row, : len(a)] = torch.where(a >= 0, a + row * total, -1)
            depth[row, : len(d)] = torch.from_numpy(d.astype(np.int64))
            if f is not None and len(f[0]):
                positions, pieces, rows = (torch.from_numpy(x) for x in f)
                columns = width + torch.arange(len(positions))
                teacher_ids[row, columns] = pieces
                attach[row, : len(positions)] = rows
                after[row, positions] = row * total + columns
        return teacher_ids, alignment_, depth, attach, after

    def pad_tokens(self, batch, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in batch], dtype=torch.long)
        longest = int(lengths.max())
        width = max(longest, min(-(-longest // multiple) * multiple, self.longest))
        token_ids = torch.full((len(batch), width), self.ids.pad, dtype=torch.long)
        for row, seq in enumerate(batch):
            token_ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        return token_ids, lengths

    @functools.cached_property
    def longest(self) -> int:
        """The longest sequence of the dataset (every sequence fits the model context)."""
        return int(self.lengths.max()) if len(self.lengths) else 0


class CachedAligned:
    """The teacher side of cached sequences (token_cache extras), item by item, memory-mapped."""

    def __init__(self, teacher_ids, alignment, depth=None):
        self.teacher_ids, self.alignment, self.depth = teacher_ids, alignment, depth

    def __len__(self):
        return len(self.alignment)

    def __getitem__(self, index) -> Aligned:
        return Aligned(self.teacher_ids[index], self.alignment[index], None if self.depth is None else self.depth[index])
