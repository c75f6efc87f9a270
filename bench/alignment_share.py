#!/usr/bin/env python
"""How often two tokenizations of Japanese text end at the same character: the aligned share.

    python bench/alignment_share.py                   # a slice of ../shared/corpora/jawiki_jaquad_train
    python bench/alignment_share.py --cpu --mb 0.05   # what CI runs: the sample text, a few seconds

A student tokenizer (rinna layout: sentencepiece unigram, NFKC + lowercase, data_prep/make_tokenizer.py)
is paired with teachers of other kinds, each trained here on the same text:

    unigram-2x     the same pipeline with twice the pieces (a bigger vocabulary of the same kind)
    bpe-bytes      a cased GPT-2-style byte-level BPE (Qwen/Llama-3 kind), trained on the raw text
    unigram-cased  a sentencepiece unigram without lowercasing, loaded by transformers

and binarize.py --teacher_tokenizer reports the share of student positions (each </s> excluded) that
align with a teacher position, and the boundary agreement (aligned / the positions of the side with
fewer; distil_ja/alignment.py). The table justifies alignment.MIN_BOUNDARY_AGREEMENT.
"""

import argparse
import json
import lzma
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: the repo root importable (never on import)
    sys.path.insert(0, str(REPO))


def write_text(src: Path, dst: Path, megabytes: float) -> None:
    """The first `megabytes` of a one-paragraph-per-line .xz file, as rinna layout (a blank line after each)."""
    budget = int(megabytes * 1e6)
    with lzma.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            if budget <= 0:
                break
            line = line.strip()
            if line:
                out.write(line + "\n\n")
                budget -= len(line.encode("utf-8"))


def bpe_tokenizer(text: Path, vocab: int, folder: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(text)], vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


def cased_unigram(text: Path, vocab: int, folder: Path) -> Path:
    """A sentencepiece unigram without normalisation, in make_tokenizer.py's folder layout."""
    import io

    import sentencepiece as spm

    from data_prep.make_tokenizer import write_tokenizer_files

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(text), model_writer=model, vocab_size=vocab, character_coverage=0.9995,
                                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, hard_vocab_limit=False)
    write_tokenizer_files(model.getvalue(), str(folder))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    parser.add_argument("--mb", type=float, default=3.0, help="MB of jawiki text (default 3)")
    parser.add_argument("--vocab", type=int, default=8000, help="the student's pieces")
    parser.add_argument("--out_dir", default=str(REPO / "checkpoints" / "alignment_share"))
    parser.add_argument("--cpu", action="store_true", help="the project's sample text (CI): no corpora needed")
    args = parser.parse_args(argv)

    from data_prep.binarize import binarize
    from data_prep.make_tokenizer import train_tokenizer

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "text.txt"
    if args.cpu:
        text.write_text((REPO / "data_prep" / "sample" / "ja_train.txt").read_text(encoding="utf-8"), encoding="utf-8")
        args.vocab = min(args.vocab, 1200)
    else:
        write_text(Path(args.corpora) / "jawiki_jaquad_train.txt.xz", text, args.mb)
    student = Path(train_tokenizer([str(text)], args.vocab, str(out / "student")))
    teachers = {
        "unigram-2x": Path(train_tokenizer([str(text)], 2 * args.vocab, str(out / "unigram-2x"))),
        "bpe-bytes": bpe_tokenizer(text, 2 * args.vocab, out / "bpe-bytes"),
        "unigram-cased": cased_unigram(text, 2 * args.vocab, out / "unigram-cased"),
    }
    rows = []
    for name, teacher in teachers.items():
        t0 = time.perf_counter()
        manifest = binarize([str(text)], str(student), str(out / f"data-{name}"), num_workers=0, progress=False,
                            overwrite=True, teacher_tokenizer=str(teacher))
        totals = manifest["totals"]
        rows.append({"teacher": name, "student_tokens": totals["tokens"], "teacher_tokens": totals["teacher_tokens"],
                     "aligned": totals["aligned"], "alignable": totals["alignable"],
                     "aligned_share": totals["aligned_share"], "boundary_agreement": totals["boundary_agreement"],
                     "seconds": time.perf_counter() - t0})
    (out / "results.json").write_text(json.dumps({"mb": None if args.cpu else args.mb, "vocab": args.vocab,
                                                  "rows": rows}, indent=2) + "\n")
    print(f"student: unigram {args.vocab} pieces (rinna layout); text: {'sample' if args.cpu else f'{args.mb} MB jawiki'}")
    print("| teacher | student tokens | teacher tokens | aligned | aligned share | boundary agreement | binarize s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['teacher']} | {r['student_tokens']:,} | {r['teacher_tokens']:,} | {r['aligned']:,} | "
              f"{r['aligned_share']:.3f} | {r['boundary_agreement']:.3f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
