"""An offline teacher: its top-k next-token log-probabilities, computed once, read memory-mapped.

`scripts/dump_teacher_logits.py` runs the teacher over exactly the sequences train.py trains on (the
shards cut to max_len and filtered by LmSeqsDataset) and writes one folder:

    manifest.json              written last, atomically, by rank 0: a folder without one is incomplete;
                               what the rows are (top_k, temperature, max_len, dtypes) and what they
                               are tied to: the sequences (count, tokens, sequences_sha256), the
                               tokenizer, the teacher (weights_sha256), the data, the shards
    sequences/                 the sequences, in token_cache.py's format (tokens.npy, offsets.npy):
                               sequence i has rows offsets[i] .. offsets[i+1] of the arrays below
    tokenizer/                 the tokenizer of the ids (train.py's default with --teacher_logits)
    teacher_tokenizer/         a teacher of another tokenizer only: its tokenizer (the stored top-k ids are
                               its ids; the manifest's "teacher_tokenizer" is its identity)
    shard-RRRRR.ids.npy        (rows, k) the top-k token ids, most probable first: uint16 below
                               65,536 ids (shards.dtype_for_vocab), else int32
    shard-RRRRR.logprobs.npy   (rows, k) their log-probabilities: float16 rounded down (default),
                               or float32

Row j of a sequence is the teacher's distribution at position j, softmax(logits_j / T), which predicts
token j + 1 (the last row predicts past </s>; the loss decides what to use). It is taken over the first
len(tokenizer) ids only: a teacher whose embedding matrix is padded beyond its tokenizer has those
extra logits dropped and the rest renormalised. Rank r of the dump writes shard r: the contiguous
sequences [first_sequence, first_sequence + sequences) of the manifest's entry.

With a teacher of another tokenizer (the data binarized with binarize.py --teacher_tokenizer), the
teacher runs on its own ids of the same text, and row j is its distribution at the teacher position
aligned with student position j (ending at the same character offset), over the teacher's vocabulary;
a row of a position without one is all zeros and never read (training counts aligned positions only).

Why float16, rounded towards -inf: 2 bytes instead of 4 per value (k = 64: 256 instead of 384 bytes a
token). Its relative error, 2^-11, is under the teacher's own when it runs in bf16 (2^-8), and rounding
down makes every stored probability at most the true one, so the tail mass 1 - sum(exp(top-k)) that
the loss derives is never negative (it is over-estimated by at most about 1e-3 x the entropy, in nats).
"""

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from distil_ja import fileio, shards
from distil_ja.cli import DataError, UsageError, first_line
from distil_ja.tokenization import resolve_spiece, sha256_file
from lm_seqs_dataset import LmSeqsDataset, counted_positions
from token_cache import OFFSETS

FORMAT = "distil-ja/teacher-topk/v1"
MANIFEST = "manifest.json"
SEQUENCES = "sequences"
TOKENIZER = "tokenizer"
TEACHER_TOKENIZER = "teacher_tokenizer"
LOGPROB_DTYPES = ("float16", "float32")
# A cross-tokenizer dump's manifest "depths": its rows inside teacher pieces hold
# losses.char_buckets' target over 2 V_t ids (aligned_topk_logprobs). A dump of 2026-12-03 says true: rows over
# V_t, which training reads no more (the positions inside pieces then get no KD term).
DEPTHS = "exact"
# A cross-tokenizer dump's manifest "rows": "classes" when each row holds the top k of losses.char_buckets' target
# over next-character classes, not pieces (dump_teacher_logits.py --char_classes; class_topk); absent: pieces.
CLASS_ROWS = "classes"
SORT_WINDOW = 16  # batches: sorted by length together (less padding), and never split between ranks


# ---- identities: what a dump is tied to -----------------------------------------------------


def sequences_sha256(sequences) -> str:
    """sha256 of the lengths (int64) then the tokens (int32), little-endian: the same for the same
    sequences whatever their arrays' dtype (uint16 shards, a widened cache) or container."""
    h = hashlib.sha256()
    h.update(np.fromiter((len(s) for s in sequences), dtype="<i8", count=len(sequences)))
    for seq in sequences:
        h.update(np.ascontiguousarray(seq, dtype="<i4"))
    return h.hexdigest()


def tokenizer_identity(tokenizer, source, ids) -> dict:
    """binarize.py's manifest fields for a tokenizer, vocab_size being len(tokenizer): the ids kept.

    spiece_sha256 is None for a tokenizer without a sentencepiece model; vocab_sha256 (the
    piece-to-id table) then tells tokenizers apart.
    """
    try:
        spiece = sha256_file(resolve_spiece(str(source)))
    except (OSError, UsageError):
        spiece = None
    table = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
    return {"name": str(source), "vocab_size": len(tokenizer), "special_ids": dataclasses.asdict(ids),
            "spiece_sha256": spiece, "vocab_sha256": hashlib.sha256(table.encode()).hexdigest()}


def weights_sha256(model) -> str:
    """sha256 over the state dict as loaded (sorted names; each name, dtype, shape and bytes): ties the
    logits to these weights, not just to an architecture (two fine-tunes share a config)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def teacher_identity(model, name) -> dict:
    config = model.config
    return {"name": str(name), "model_type": config.model_type, "vocab_size": config.vocab_size,
            "context": models.max_positions(config), "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": getattr(config, "eos_token_id", None), "weights_sha256": weights_sha256(model)}


def data_identity(data_files, binarized: dict | None) -> dict:
    """Where the sequences came from: the --data_file values, and the binarize manifest's tokenizer
    and shard list (files, sizes, sha256) when they name a binarized directory."""
    identity = {"data_file": [str(f) for f in data_files]}
    if binarized is not None:
        identity |= {"tokenizer": binarized.get("tokenizer"), "shards": binarized.get("shards")}
    return identity


# ---- checks --------------------------------------------------------------------------------


def check_teacher(config, ids, vocab_size: int, top_k: int, max_len: int | None, within: bool = False,
                  classes: int = 0) -> int:
    """Refuse a teacher that does not fit the tokenizer or the flags; returns the max_len to cut at
    (default: the teacher's context). ids None: a teacher of another tokenizer, with special ids of its own;
    within: its rows for --within_pieces, over twice its ids; classes: the number of next-character classes
    when the rows hold those (--char_classes)."""
    if config.vocab_size < vocab_size:
        raise UsageError(f"teacher vocab_size {config.vocab_size} < tokenizer's {vocab_size}")
    for name, expected in () if ids is None else (("bos_token_id", ids.bos), ("eos_token_id", ids.eos)):
        if not models.special_id_agrees(getattr(config, name, None), expected):
            raise UsageError(f"teacher config {name}={getattr(config, name, None)} but the tokenizer's is {expected}")
    if classes and top_k > classes:
        raise UsageError(f"--top_k {top_k} exceeds the {classes} next-character classes a --char_classes row holds")
    held = 2 * vocab_size if within else vocab_size
    if not classes and top_k > held:
        raise UsageError(f"--top_k {top_k} exceeds the {held} ids a row holds (the tokenizer's {vocab_size}"
                         f"{', twice over with --within_pieces' if within else ''})")
    context = models.max_positions(config)
    if max_len is None:
        if context is None:
            raise UsageError("the teacher's config gives no context length: pass --max_len")
        return context
    if context is not None and max_len > context:
        raise UsageError(f"--max_len {max_len} exceeds the teacher's context ({context})")
    return max_len


def check_tokenizer(recorded: dict, current: dict, folder) -> None:
    """The run's tokenizer must be the dump's (spiece_sha256 compared when both have one, else
    vocab_sha256)."""
    keys = ["vocab_size", "special_ids"]
    keys.append("spiece_sha256" if recorded.get("spiece_sha256") and current.get("spiece_sha256") else "vocab_sha256")
    for key in keys:
        if recorded.get(key) != current.get(key):
            raise UsageError(f"{folder} was dumped with another tokenizer than {current['name']!r} "
                             f"({key} {short(recorded.get(key))} vs {short(current.get(key))})")


def check_training(manifest: dict, folder, *, temperature: float, tokenizer: dict, student_context: int) -> None:
    """What train.py refuses before it loads the data: another temperature, tokenizer or context."""
    if temperature != manifest["temperature"]:
        raise UsageError(f"--temperature {temperature:g}, but {folder} holds the teacher's top {manifest['top_k']} at "
                         f"temperature {manifest['temperature']:g}: its tail mass at another temperature cannot be "
                         f"recovered; pass --temperature {manifest['temperature']:g} or dump again")
    check_tokenizer(manifest["tokenizer"], tokenizer, folder)
    if student_context < manifest["max_len"]:
        raise UsageError(f"the student's context ({student_context}) is shorter than the max_len "
                         f"{manifest['max_len']} of {folder}, whose sequences are cut to it: dump again with "
                         f"--max_len {student_context}")


def check_rows(manifest: dict, folder, masked: bool) -> None:
    """A chat corpus's dump holds rows for the positions train.py counts: the assistant's (masked), or
    every position (--train_on_prompt, or not a chat corpus). DataError when they differ."""
    if bool(manifest.get("assistant_only")) != masked:
        said = "only the assistant's positions" if manifest.get("assistant_only") else "every position"
        want = "only the assistant's" if masked else "every position (--train_on_prompt)"
        raise DataError(f"{folder} holds rows for {said}, this run counts {want}: dump again with the same "
                        "--train_on_prompt as train.py's")


def check_sequences(manifest: dict, folder, sequences) -> None:
    """The training sequences (after cutting and filtering) must be the dump's, token for token."""
    found = {"sequences": len(sequences), "tokens": int(sum(len(s) for s in sequences))}
    found["sequences_sha256"] = sequences_sha256(sequences)
    if any(found[k] != manifest[k] for k in found):
        raise DataError(f"--data_file gives {found['sequences']} sequences, {found['tokens']} tokens (sha256 "
                        f"{short(found['sequences_sha256'])}) cut to max_len {manifest['max_len']}, but {folder} was "
                        f"dumped from {manifest['sequences']} sequences, {manifest['tokens']} tokens (sha256 "
                        f"{short(manifest['sequences_sha256'])}): not the same data")


IDENTITY = ("teacher", "tokenizer", "sequences_sha256", "top_k", "temperature", "max_len", "precision",
            "logprobs_dtype", "dump_id")


def check_same_dump(saved: dict, manifest: dict, folder) -> None:
    """A resumed run must read the dump it started with (saved in its dump path): another teacher,
    or even the same one dumped again (bf16 rows may differ in their last bits), would break exact resume."""
    for key in IDENTITY:
        old, new = saved.get(key), manifest.get(key)
        if old != new:
            raise UsageError(f"cannot resume: {folder} is no longer the dump this run started from ({key} "
                             f"{describe(key, old)}, now {describe(key, new)}); resume with that dump, or start afresh")


def describe(key: str, value) -> str:
    """A manifest value in one short phrase: a teacher or tokenizer by name and hash."""
    if key in ("teacher", "tokenizer") and isinstance(value, dict):
        digest = value.get("weights_sha256") or value.get("spiece_sha256") or value.get("vocab_sha256")
        return f"{value.get('name')!r} ({short(digest)})"
    return short(value)


def short(value) -> str:
    """Hashes cut to 12 characters in messages; other values as repr."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    return repr(value)


# ---- computing and writing ------------------------------------------------------------------


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Where each sequence's rows start (and, last, the total): token_cache.py's offsets."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def rank_slice(offsets: np.ndarray, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous sequences [start, end) that `rank` dumps: whole sort windows, about the same
    number of tokens per rank. Windows (hence batches) do not depend on the world size, so any
    number of ranks computes the very same batches and writes the same rows."""
    n, total = len(offsets) - 1, int(offsets[-1])
    bounds = np.arange(0, n, batch_size * SORT_WINDOW)
    owners = np.minimum(offsets[bounds] * world_size // max(total, 1), world_size - 1)
    bounds = np.append(bounds, n)
    return int(bounds[np.searchsorted(owners, rank)]), int(bounds[np.searchsorted(owners, rank + 1)])


def window_batches(lengths: np.ndarray, start: int, end: int, batch_size: int) -> list[np.ndarray]:
    """The batches of the window [start, end): longest first (out of memory, if at all, at once)."""
    order = start + np.argsort(-lengths[start:end], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def topk_logprobs(model, token_ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int, top_k: int,
                  temperature: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row of a right-padded batch, the (ids, log-probs) of the top k at its real positions.

    Right padding and causal attention leave the real positions untouched, so no attention mask
    (as in training). log_softmax runs in fp32 row by row: one (S, V) copy at a time.
    """
    logits = model(input_ids=token_ids, use_cache=False).logits
    rows = []
    for row, length in enumerate(lengths.tolist()):
        logprobs = torch.log_softmax(logits[row, :length, :vocab_size].float() / temperature, dim=-1)
        values, indices = logprobs.topk(top_k, dim=-1)
        rows.append((indices.cpu(), values.cpu()))
    return rows


@torch.inference_mode()
def aligned_topk_logprobs(model, sides, device, vocab_size: int, top_k: int, temperature: float,
                          vocab=None, within=None, classes: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """topk_logprobs for a teacher of another tokenizer: per sequence (its lm_seqs_dataset.Aligned side),
    one row per student position, the top k of the aligned teacher position, zeros where none is aligned.

    With vocab (a losses.VocabMap with depth tables, on the device) and within (within_piece_tables'
    (cut, exact): LmSeqsDataset.pad_aligned's) a position at depth k, inside the teacher's next piece,
    whose first k characters are s, gets the top k of losses.char_buckets' target there over 2 V_t ids: id < V_t a piece that begins with s and is
    longer, p(id) / Z; id = V_t + i piece i of the row read after s (the attached position,
    LmSeqsDataset.pad_aligned) times u = p(s) / Z; -inf fills the slots beyond the pieces there are. A
    position whose target would not be exact (losses.VocabMap.exact_at) holds zeros. Without within, a
    position inside a piece holds zeros, as an unaligned one. classes (vocab with next-character classes):
    each row holds the top k of that target summed into its classes instead (class_topk)."""
    shape = (len(sides), max(len(side.alignment) for side in sides))
    teacher_ids, alignment, depth, attach, after = LmSeqsDataset.pad_aligned(
        [side.teacher_ids for side in sides], [side.alignment for side in sides], [side.depths for side in sides],
        shape, within)
    teacher_ids, attach = teacher_ids.to(device), attach.to(device)
    if within is not None:  # as the distiller reads them (Distiller.kd_alignment): where the target is exact
        exact = vocab.exact_at(teacher_ids, alignment.to(device), depth.to(device)).cpu()
        alignment = torch.where(exact, alignment, -1)
    extra = {}
    if attach.size(1):
        mask, positions = models.attached_rows(teacher_ids.size(1) - attach.size(1), attach, model.dtype)
        extra = {"attention_mask": mask, "position_ids": positions}
    logits = model(input_ids=teacher_ids, use_cache=False, **extra).logits
    flat = logits.reshape(-1, logits.size(-1))
    rows = []
    for row, side in enumerate(sides):
        n = len(side.alignment)
        ids = torch.zeros((n, top_k), dtype=torch.long)
        values = torch.zeros((n, top_k), dtype=torch.float32)
        a, d, f = alignment[row, :n], depth[row, :n], after[row, :n]
        taken = (a >= 0) & ((d == 0) | (within is not None))
        index, d_taken = a[taken].to(device), d[taken].to(device)
        logprobs = torch.log_softmax(flat[index, :vocab_size].float() / temperature, -1)
        if within is not None:  # rows over 2 V_t; the within-piece work on the rows inside pieces only
            deep = d_taken > 0
            joint = F.pad(logprobs, (0, vocab_size), value=float("-inf"))
            joint[deep] = within_piece_logprobs(logprobs[deep], flat, vocab, teacher_ids, index[deep], d_taken[deep],
                                                f[taken].to(device)[deep], vocab_size, temperature)
            logprobs = joint
        if classes:
            top_ids, top_values = class_topk(logprobs, vocab, d_taken, top_k)
        else:
            top = logprobs.topk(top_k, dim=-1)
            top_ids, top_values = top.indices, top.values
        ids[taken], values[taken] = top_ids.cpu(), top_values.cpu()
        rows.append((ids, values))
    return rows


def within_piece_logprobs(logprobs, flat, vocab, teacher_ids, index, depth, after, vocab_size: int,
                          temperature: float) -> torch.Tensor:
    """(n, 2 V_t): aligned_topk_logprobs' rows over the target's pieces, from the teacher's log-probabilities
    at the rows `index` (those of depth 0 come out as they are, padded with -inf) and the logits `flat` of
    the teacher's batch, where `after` (-1: none) are the positions read after s."""
    prefix = vocab.prefix_of(teacher_ids, index, depth)
    begins = vocab.depth_prefix[depth] == prefix[:, None]
    is_s = begins & (vocab.depth_class[depth] == vocab.n_classes)
    log_z = torch.logsumexp(logprobs.masked_fill(~begins, float("-inf")), -1, keepdim=True)
    log_u = torch.logsumexp(logprobs.masked_fill(~is_s, float("-inf")), -1, keepdim=True) - log_z
    longer = (logprobs - log_z).masked_fill(~begins | is_s, float("-inf"))
    following = torch.log_softmax(flat[after.clamp(min=0), :vocab_size].float() / temperature, -1) + log_u
    return torch.cat([longer, following.masked_fill((after < 0)[:, None], float("-inf"))], -1)


def class_topk(logprobs, vocab, depth, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k classes of each row's next-character target (losses.char_buckets), from its log-probabilities
    over V_t ids (the teacher's row) or 2 V_t (a within-piece row: within_piece_logprobs): each piece's mass
    goes to its class at the row's depth, an id V_t + i's to the class of piece i. Returned as (ids, log p):
    class c as V_t plus the lowest teacher id of that class, which char_buckets reads back as c at any depth;
    so k classes carry what k pieces cannot (every piece that begins with the character) and train.py
    reads them with the code that reads piece rows. A class no teacher piece begins has no mass (-inf)."""
    v_t, n_classes = vocab.teacher_class.numel(), vocab.n_classes
    own = vocab.teacher_class.expand(len(depth), v_t)
    if vocab.depth_class is not None:  # a piece's class k characters in; CUT (s itself) has no mass in these rows
        own = torch.where((depth > 0)[:, None], vocab.depth_class[depth], own)
    if logprobs.size(1) > v_t:
        own = torch.cat([own, vocab.teacher_class.expand(len(depth), v_t)], 1)
    mass = logprobs.new_zeros(len(depth), n_classes + 1).scatter_add(1, own, logprobs.exp())[:, :n_classes]
    values, top = mass.log().topk(top_k, dim=-1)
    first = torch.full((n_classes,), v_t, dtype=torch.long, device=own.device).scatter_reduce(
        0, vocab.teacher_class, torch.arange(v_t, device=own.device), "amin")
    return v_t + first[top].clamp(max=v_t - 1), values


def teacher_tokenizer_of(folder, manifest: dict) -> str | None:
    """The saved tokenizer of a dump's teacher of another tokenizer, or None (the student's tokenizer)."""
    return str(Path(folder) / TEACHER_TOKENIZER) if manifest.get("teacher_tokenizer") else None


def stored_logprobs(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """float32 log-probs in the storage dtype; float16 rounded towards -inf, so that no stored
    probability exceeds the true one (the tail mass 1 - sum stays >= 0)."""
    if dtype == "float32":
        return logprobs.astype(np.float32, copy=False)
    half = logprobs.astype(np.float16)
    up = half.astype(np.float32) > logprobs
    half[up] = np.nextafter(half[up], np.float16(-np.inf))
    return half


class _NpyStream:
    """One .npy file written front to back (header, then row blocks), atomically, hashed on the way."""

    def __init__(self, stack: contextlib.ExitStack, path: Path, dtype: np.dtype, shape: tuple):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = stack.enter_context(fileio.atomic_open(path, "wb"))
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self, header)

    def write(self, data) -> None:
        data = data if isinstance(data, bytes) else np.ascontiguousarray(data, dtype=self.dtype).tobytes()
        self.sha256.update(data)
        self.bytes += len(data)
        self.file.write(data)

    def entry(self) -> dict:
        return {"file": self.path.name, "bytes": self.bytes, "sha256": self.sha256.hexdigest()}


@dataclasses.dataclass(frozen=True)
class DumpSettings:
    top_k: int
    temperature: float
    vocab_size: int  # the ids kept: len(tokenizer)
    batch_size: int
    logprobs_dtype: str = "float16"


def ids_dtype(vocab_size: int, wide: bool) -> np.dtype:
    """The dtype of a dump's ids: the teacher's vocabulary, twice over (wide) with --within_pieces (rows over
    2 V_t) or --char_classes (classes stored as V_t + a piece id: class_topk)."""
    return shards.dtype_for_vocab(vocab_size * (2 if wide else 1))


def shard_files(rank: int) -> tuple[str, str]:
    return f"shard-{rank:05d}.ids.npy", f"shard-{rank:05d}.logprobs.npy"


def dump_shard(model, dataset, start: int, end: int, folder, rank: int, settings: DumpSettings,
               device: torch.device, progress: bool = True, vocab=None, within=None, classes: bool = False) -> dict:
    """Write shard `rank`: the rows of sequences [start, end) of `dataset` (an LmSeqsDataset, padded by
    its own pad_tokens, as in training; with loss masks, the counted positions' rows only). Returns its
    manifest entry ("tokens": the rows it holds). vocab, within, classes: aligned_topk_logprobs' (within:
    dump_teacher_logits.py --within_pieces; classes: --char_classes; vocab with either).

    Each sort window is computed whole, then its rows are appended in sequence order: the files are
    written front to back, and at most one window of rows is held in memory.
    """
    folder = Path(folder)
    offsets = offsets_of(dataset.row_counts())  # a chat corpus's: the counted positions only
    rows = int(offsets[end] - offsets[start])
    entry = {"rank": rank, "first_sequence": start, "sequences": end - start, "tokens": rows}
    if rows == 0:
        return entry
    id_dtype = ids_dtype(settings.vocab_size, within is not None or classes)
    shape = (rows, settings.top_k)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack, tqdm(total=rows, unit="tok", unit_scale=True, desc=f"Rank {rank}",
                                               disable=not progress) as bar:
        ids_file, logprobs_file = (_NpyStream(stack, folder / name, dtype, shape)
                                   for name, dtype in zip(shard_files(rank), (id_dtype, settings.logprobs_dtype)))
        window = settings.batch_size * SORT_WINDOW
        for w_start in range(start, end, window):
            w_end = min(w_start + window, end)
            base = offsets[w_start]
            ids = np.empty((offsets[w_end] - base, settings.top_k), dtype=id_dtype)
            logprobs = np.empty(ids.shape, dtype=np.float32)
            for batch in window_batches(dataset.lengths, w_start, w_end, settings.batch_size):
                if dataset.aligned is None:
                    token_ids, lengths = dataset.pad_tokens([dataset.sequences[i] for i in batch])
                    results = topk_logprobs(model, token_ids.to(device), lengths, settings.vocab_size,
                                            settings.top_k, settings.temperature)
                else:
                    results = aligned_topk_logprobs(model, [dataset.aligned[i] for i in batch], device,
                                                    settings.vocab_size, settings.top_k, settings.temperature,
                                                    vocab, within, classes)
                for i, (top_ids, top_logprobs) in zip(batch, results):
                    a, b = offsets[i] - base, offsets[i + 1] - base
                    kept = slice(None) if dataset.loss_masks is None else counted_positions(dataset.loss_masks[i])
                    ids[a:b] = top_ids.numpy()[kept]
                    logprobs[a:b] = top_logprobs.numpy()[kept]
                bar.update(int(sum(dataset.lengths[i] for i in batch)))
            ids_file.write(ids)
            logprobs_file.write(stored_logprobs(logprobs, settings.logprobs_dtype))
    return entry | {"ids": ids_file.entry(), "logprobs": logprobs_file.entry(), "seconds": time.perf_counter() - t0}


def write_manifest(folder, manifest: dict) -> dict:
    """The manifest, last and atomically: its presence marks a complete dump."""
    return fileio.write_manifest(Path(folder) / MANIFEST, FORMAT, manifest)


# ---- reading -------------------------------------------------------------------------------


def load_manifest(folder) -> dict:
    """The manifest of a dump (DataError when missing, unreadable or foreign)."""
    return fileio.read_manifest(Path(folder) / MANIFEST, FORMAT, "dump_teacher_logits.py")


def _open_rows(path: Path, shape: tuple, dtype: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: missing or unreadable shard ({first_line(err)})") from err
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise DataError(f"{path}: {array.shape} {array.dtype}, the manifest says {shape} {dtype} (replaced or damaged)")
    return array


def verify_files(folder, manifest: dict, full: bool = True, progress: bool = True) -> None:
    """Every shard file of a dump against its manifest entry: its size, and (full) its sha256, read in
    1 MiB blocks with a progress bar (a dump is ~256 B a token at top 64: bench/shard_verify.py measures
    the rate). DataError naming the file; train.py calls it once, where the token cache is built."""
    files = [(Path(folder) / e[kind]["file"], e[kind]) for e in manifest["shards"] for kind in ("ids", "logprobs")
             if kind in e]
    for path, entry in files:
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size if size is not None else 'no'} bytes, its manifest says {entry['bytes']:,} "
                            "(replaced, truncated or damaged since dump_teacher_logits.py wrote it)")
    if not full:
        return
    total = sum(entry["bytes"] for _, entry in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Verifying teacher logits", disable=not progress) as bar:
        for path, entry in files:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    bar.update(len(block))
            if digest.hexdigest() != entry["sha256"]:
                raise DataError(f"{path}: sha256 {digest.hexdigest()[:12]}..., its manifest says "
                                f"{entry['sha256'][:12]}... (changed since dump_teacher_logits.py wrote it): dump again")


class TopKLogits:
    """A dump, memory-mapped read-only: item i is (top-k ids, log-probs) of sequence i, (L_i, k) each.

    Every rank and DataLoader worker maps the same files: the rows sit once in the page cache.
    Opening checks that the shards are those of the manifest and cover every sequence (DataError).
    """

    def __init__(self, folder, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else load_manifest(folder)
        self.top_k = self.manifest["top_k"]
        self.temperature = self.manifest["temperature"]  # of softmax(logits / T) that the rows hold
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]  # the ids the teacher's softmax ran over
        offsets_path = self.folder / SEQUENCES / OFFSETS
        try:
            self.offsets = np.load(offsets_path)
        except (OSError, ValueError) as err:
            raise DataError(f"{offsets_path}: missing or unreadable ({first_line(err)})") from err
        if len(self.offsets) != self.manifest["sequences"] + 1 or self.offsets[-1] != self.manifest["tokens"]:
            raise DataError(f"{offsets_path}: {len(self.offsets) - 1} sequences, {self.offsets[-1]} tokens; "
                            f"the manifest says {self.manifest['sequences']}, {self.manifest['tokens']}")
        if self.manifest.get("assistant_only"):  # a chat dump: rows for the counted positions only
            self.offsets = offsets_of(LmSeqsDataset.from_cache(self.folder / SEQUENCES).row_counts())
        self.first, self.ids, self.logprobs = [], [], []
        covered = 0
        for entry in sorted(self.manifest["shards"], key=lambda e: e["first_sequence"]):
            if entry["first_sequence"] != covered:
                raise DataError(f"{self.folder}: no shard holds sequence {covered} (the manifest's shards leave a gap)")
            covered += entry["sequences"]
            rows = int(self.offsets[covered] - self.offsets[entry["first_sequence"]])
            self.first.append(entry["first_sequence"])
            self.ids.append(_open_rows(self.folder / entry["ids"]["file"], (rows, self.top_k),
                                       self.manifest["ids_dtype"]))
            self.logprobs.append(_open_rows(self.folder / entry["logprobs"]["file"], (rows, self.top_k),
                                            self.manifest["logprobs_dtype"]))
        if covered != self.manifest["sequences"]:
            raise DataError(f"{self.folder}: the shards hold {covered} of {self.manifest['sequences']} sequences")
        self.first = np.array(self.first, dtype=np.int64)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index) -> tuple[np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self.first, index, side="right")) - 1
        base = self.offsets[self.first[shard]]
        a, b = self.offsets[index] - base, self.offsets[index + 1] - base
        return self.ids[shard][a:b], self.logprobs[shard][a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
