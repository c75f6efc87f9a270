#!/usr/bin/env python
"""Train a sentencepiece unigram tokenizer with rinna's special-token layout.

The output directory loads with ``AutoTokenizer.from_pretrained(dir)`` and with
``T5Tokenizer.from_pretrained(dir, extra_ids=0)``, like rinna/japanese-gpt2-medium:

    <unk> 0   <s> 1   </s> 2   [PAD] 3   [CLS] 4   [SEP] 5   [MASK] 6

Normalization is sentencepiece's ``nmt_nfkc``; the training text is NFKC-normalized
and lowercased first, so the vocabulary is lowercase (as rinna's).  Text must be
lowercased before encoding with it (``distil_ja.tokenization.DocumentEncoder`` does).

Usage:
    python data_prep/make_tokenizer.py --input doc_data/ --vocab_size 32000 --output_dir tok/

Exit status (distil_ja/cli.py): 0 done; 1 an input is missing, unreadable, truncated or holds no
text; 2 bad flags (a --vocab_size the text cannot give with --hard_vocab_limit included), an
output folder that already holds a tokenizer (no --overwrite) or is not writable; 130 interrupted.
"""
import io
import logging
import os
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ja import fileio, outputs
from distil_ja.cli import DISK_FULL, ArgumentParser, DataError, UsageError, first_line, run_command, setup_logging
from distil_ja.tokenization import find_inputs, iter_text_lines, normalize_text, reading_inputs

logger = logging.getLogger("make_tokenizer")

SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def _iter_training_lines(paths, max_lines, seed):
    """Non-empty normalized lines of the inputs; reservoir-sampled to max_lines if given."""

    def lines():
        for line in iter_text_lines(paths):
            line = normalize_text(line).strip()
            if line:
                yield line

    if not max_lines:
        yield from lines()
        return
    rng = random.Random(seed)
    reservoir = []
    for i, line in enumerate(lines()):
        if i < max_lines:
            reservoir.append(line)
        else:
            j = rng.randint(0, i)
            if j < max_lines:
                reservoir[j] = line
    yield from reservoir


def write_tokenizer_files(model_path_or_bytes, output_dir, model_max_length=1024):
    """Write spiece.model + tokenizer_config.json + special_tokens_map.json to output_dir."""
    outputs.claim(output_dir, "make_tokenizer.py")  # marked when new or empty (--overwrite's rule)
    target = os.path.join(output_dir, "spiece.model")
    if isinstance(model_path_or_bytes, (bytes, bytearray)):
        fileio.write_bytes(target, model_path_or_bytes)
    elif os.path.abspath(model_path_or_bytes) != os.path.abspath(target):
        fileio.write_bytes(target, Path(model_path_or_bytes).read_bytes())
    config = dict(SPECIAL_TOKENS)
    config.update(
        {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": 0,
            "additional_special_tokens": [],
            # rinna sets this too; transformers ignores it, lowercase explicitly.
            "do_lower_case": True,
            "model_max_length": model_max_length,
        }
    )
    fileio.write_json(os.path.join(output_dir, "tokenizer_config.json"), config)
    fileio.write_json(os.path.join(output_dir, "special_tokens_map.json"), SPECIAL_TOKENS)


def read_training_lines(input_paths, max_sentences, seed):
    """The sampled training lines; unusable inputs (missing, unreadable, truncated, no text) are
    DataError."""
    files = find_inputs(input_paths)
    with reading_inputs():
        lines = list(_iter_training_lines(files, max_sentences, seed))
    if not lines:
        raise DataError(f"no text found in {', '.join(files)}")
    return lines


def train_model(lines, vocab_size, *, character_coverage, max_sentence_length, num_threads, seed,
                hard_vocab_limit):
    """The serialized unigram model. sentencepiece's refusals (a vocabulary the text cannot give
    under --hard_vocab_limit, a bad coverage) are about the flags: UsageError."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="[PAD]",
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            hard_vocab_limit=hard_vocab_limit,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UsageError(f"sentencepiece refused the settings: {first_line(e)}") from e
    return model.getvalue()


def train_tokenizer(
    input_paths,
    vocab_size,
    output_dir,
    *,
    character_coverage=0.9995,
    max_sentences=2_000_000,
    max_sentence_length=8192,
    num_threads=None,
    seed=42,
    hard_vocab_limit=False,
):
    """Train a rinna-layout unigram model on text file(s)/directories; return output_dir.

    input_paths: a path or list of paths (files, .xz/.gz, or directories of .txt files).
    vocab_size: target size; with hard_vocab_limit=False (default) it is a soft limit, so
    tiny texts still train (the resulting vocabulary may be smaller).
    max_sentences: lines reservoir-sampled (seeded) for training; 0 = all lines.
    Raises DataError for unusable inputs and UsageError for bad settings or an unwritable output_dir.
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise UsageError(f"--vocab_size must be at least 8, got {vocab_size}")
    lines = read_training_lines(input_paths, max_sentences, seed)
    t0 = time.time()
    model = train_model(lines, vocab_size, character_coverage=character_coverage,
                        max_sentence_length=max_sentence_length, num_threads=num_threads, seed=seed,
                        hard_vocab_limit=hard_vocab_limit)
    try:
        write_tokenizer_files(model, output_dir)
    except OSError as e:
        if e.errno in DISK_FULL:  # exit 1 and the disk-full line (cli.run_command), not a usage error
            raise
        raise UsageError(f"cannot write {output_dir}: {first_line(e)}") from e
    sp = spm.SentencePieceProcessor(model_proto=model)
    logger.info(
        "trained unigram vocab of %d pieces on %d lines in %.1fs -> %s",
        sp.get_piece_size(), len(lines), time.time() - t0, output_dir,
    )
    return output_dir


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files or directories (.txt/.xz/.gz)")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--max_sentences", type=int, default=2_000_000,
                        help="lines sampled (seeded) for training; 0 = all")
    parser.add_argument("--hard_vocab_limit", action="store_true",
                        help="fail instead of returning a smaller vocabulary on small text")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def run(argv):
    args = build_parser().parse_args(argv)
    outputs.check_folder(args.output_dir, "--output_dir")
    if args.overwrite:  # replaces files only in a folder this toolkit wrote (distil_ja.outputs' rule)
        outputs.will_replace(args.output_dir, True, "--overwrite", "--output_dir")
    elif os.path.exists(os.path.join(args.output_dir, "spiece.model")):
        raise UsageError(f"{args.output_dir} already holds a tokenizer; pass --overwrite")
    train_tokenizer(
        args.input, args.vocab_size, args.output_dir,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences,
        seed=args.seed, hard_vocab_limit=args.hard_vocab_limit,
    )


def main(argv=None) -> int:
    setup_logging()
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
