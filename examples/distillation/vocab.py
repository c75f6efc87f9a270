"""The tokenizer a run uses: its special ids, its agreement with binarized data, its copy beside a model.

Used by train.py and scripts/dump_teacher_logits.py, which must read and check the tokenizer alike.
"""

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil_ja import alignment
from distil_ja.cli import DataError, UsageError, first_line
from distil_ja.tokenization import load_tokenizer, resolve_spiece, sha256_file
from lm_seqs_dataset import SpecialIds
from utils import logger


def special_ids_of(tokenizer) -> SpecialIds:
    ids = SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                     pad=tokenizer.pad_token_id, unk=tokenizer.unk_token_id)
    if None in (ids.bos, ids.eos, ids.pad, ids.unk):
        raise UsageError(f"the tokenizer must define <s>, </s>, [PAD] and <unk>; got {ids}")
    return ids


def check_manifest(manifest: dict, ids: SpecialIds, vocab_size: int, tokenizer_source: str) -> None:
    """The tokenizer recorded by binarize.py must be the one this run uses."""
    data_tok = manifest.get("tokenizer", {})
    if data_tok.get("vocab_size") not in (None, vocab_size):
        raise UsageError(f"the data was binarized with vocab_size {data_tok['vocab_size']}, the tokenizer has {vocab_size}")
    data_ids = data_tok.get("special_ids", {})
    for name in ("unk", "bos", "eos", "pad"):
        if data_ids.get(name) not in (None, getattr(ids, name)):
            raise UsageError(f"the data's {name} id is {data_ids[name]}, the tokenizer's is {getattr(ids, name)}")
    if data_tok.get("spiece_sha256"):
        try:
            ours = sha256_file(resolve_spiece(tokenizer_source))
        except OSError:
            return  # a tokenizer without its sentencepiece file: the checks above are all we can do
        if ours != data_tok["spiece_sha256"]:
            raise UsageError(f"the data was binarized with another sentencepiece model than {tokenizer_source!r} "
                             f"(sha256 {data_tok['spiece_sha256'][:12]}… vs {ours[:12]}…)")


def save_tokenizer(tokenizer, source: str, dump_path: str) -> None:
    """The tokenizer beside the student, with its sentencepiece model so binarize.py and
    evaluate.py can use DUMP_PATH as a tokenizer too."""
    try:
        tokenizer.save_pretrained(dump_path)
    except OSError:
        raise
    except Exception as err:  # the Rust tokenizers library reports a failed write as "... (os error 28)"
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        raise OSError(int(found.group(1)), first_line(err), str(Path(dump_path) / "tokenizer.json")) from err
    try:
        shutil.copyfile(resolve_spiece(source), Path(dump_path) / "spiece.model")
    except OSError as err:
        logger.warning("No spiece.model saved with the student (%s)", err)


# ---- a teacher of another tokenizer ---------------------------------------------------------


@dataclass(frozen=True)
class CrossTokenizer:
    """A teacher whose vocabulary is not the student's: what training needs of the pair.

    student_ids / teacher_ids: the shared pieces (distil_ja.alignment.shared_vocabulary);
    teacher_vocab_size: the teacher's tokenizer's size (its head is cut to it); identity: the teacher
    tokenizer as binarize.py --teacher_tokenizer records it, which the data must match.
    """

    source: str
    identity: dict
    student_ids: np.ndarray
    teacher_ids: np.ndarray
    teacher_vocab_size: int
    classes: tuple  # (student class per id, teacher class per id, number): alignment.next_character_classes
    depth_tables: tuple | None  # (prefix, classes, cut, exact) inside teacher pieces (alignment.within_piece_tables)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "tokenizer.model")


def own_tokenizer(teacher_name: str, tokenizer_name: str | None) -> str | None:
    """The teacher's own tokenizer to compare with the student's, or None: the same name, or a local
    teacher folder without tokenizer files (a bare checkpoint), is taken to share the student's (logged)."""
    if tokenizer_name is None or teacher_name == tokenizer_name:
        return None
    folder = Path(teacher_name)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        logger.info("The teacher %s has no tokenizer files: taken to share the student's tokenizer %s (name its own "
                    "with --teacher_tokenizer)", teacher_name, tokenizer_name)
        return None
    return teacher_name


def cross_tokenizer(student_tokenizer, teacher_source: str | None, depths: bool = False) -> CrossTokenizer | None:
    """The cross-tokenizer pair when the teacher's tokenizer (teacher_source) differs from the student's
    in content (the pieces in id order, not only their number); None when they are the same (the
    same-tokenizer path, unchanged) or there is no teacher tokenizer to compare with. depths: with the
    tables for the positions inside teacher pieces (--within_pieces, dumps), else depth_tables None."""
    if teacher_source is None:
        return None
    try:
        teacher_tokenizer = load_tokenizer(teacher_source)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the teacher's tokenizer {teacher_source!r}: {first_line(err)}") from err
    if alignment.same_vocabulary(student_tokenizer, teacher_tokenizer):
        return None
    student_ids, teacher_ids = alignment.shared_vocabulary(student_tokenizer, teacher_tokenizer)
    if len(student_ids) == 0:
        raise UsageError(f"the teacher's tokenizer {teacher_source!r} shares no piece with the student's")
    logger.info("Cross-tokenizer distillation: the teacher's tokenizer %s (%d pieces) and the student's (%d) share "
                "%d pieces", teacher_source, len(teacher_tokenizer), len(student_tokenizer), len(student_ids))
    classes = alignment.next_character_classes(student_tokenizer, teacher_tokenizer)
    logger.info("Next-character classes: %d (the %d characters both vocabularies begin pieces with, the end of "
                "the text, and other)", classes[2], classes[2] - 2)
    depth_tables = alignment.within_piece_tables(teacher_tokenizer, classes[1], classes[2]) if depths else None
    return CrossTokenizer(teacher_source, alignment.tokenizer_identity(teacher_tokenizer, teacher_source),
                          np.asarray(student_ids), np.asarray(teacher_ids), len(teacher_tokenizer), classes,
                          depth_tables)


def check_cross_manifest(manifest: dict | None, cross: CrossTokenizer) -> None:
    """Data for a cross-tokenizer run must be binarized with --teacher_tokenizer of that very tokenizer,
    and align well enough (DataError, exit 1, naming what to do)."""
    recorded = (manifest or {}).get("teacher_tokenizer")
    if recorded is None:
        raise DataError(f"the teacher's tokenizer ({cross.source}) is not the student's, but the data was binarized "
                        f"without --teacher_tokenizer: binarize it again with --teacher_tokenizer {cross.source}")
    if recorded.get("sha256") != cross.identity.get("sha256"):
        raise DataError(f"the data was binarized for the teacher tokenizer {recorded.get('name')!r} "
                        f"(sha256 {str(recorded.get('sha256'))[:12]}…), not {cross.source!r} "
                        f"({str(cross.identity.get('sha256'))[:12]}…): binarize it again with --teacher_tokenizer")
    agreement = manifest.get("totals", {}).get("boundary_agreement")
    if agreement is not None and agreement < alignment.MIN_BOUNDARY_AGREEMENT:
        raise DataError(f"only {agreement:.1%} of the boundaries of the two tokenizations agree (at least "
                        f"{alignment.MIN_BOUNDARY_AGREEMENT:.0%} needed): this pair cannot be distilled position by "
                        "position")
