"""The tokenizer a run uses: its special ids, its agreement with binarized data, its copy beside a model.

Used by train.py and scripts/dump_teacher_logits.py, which must read and check the tokenizer alike.
"""

import re
import shutil
from pathlib import Path

from distil_ja.cli import UsageError, first_line
from distil_ja.tokenization import resolve_spiece, sha256_file
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
