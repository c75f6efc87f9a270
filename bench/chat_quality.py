#!/usr/bin/env python
"""Chat distillation experiment: a small Japanese instruction task -> tiny teacher -> four students -> scores.

    python bench/chat_quality.py --size tiny --seed S     # CPU, 2 cores (bench/RESULTS.md has the times)
    python bench/chat_quality.py --size gpu --seed S      # one GPU (H100/H200), < 8 min
    python bench/chat_quality.py --size smoke             # the project's sample text, a few steps (tests)

The task ("続く一文", the next sentence): the user gives one sentence of a Wikipedia paragraph and asks for
the sentence that follows it; the assistant's answer is that next sentence. Pairs come from consecutive
sentences (split after "。") of JaQuAD's train paragraphs for training and of its dev paragraphs (other
articles) for scoring, at most MAX_PAIRS_PER_PARAGRAPH per paragraph, each sentence 8-90 characters.
The answer is not determined by the prompt, so both scores below measure how close a model's
distribution and its greedy answer come to what Wikipedia wrote next, not exact knowledge.

Every step runs the project's own tools as a user would: make_tokenizer.py, binarize.py on conversation
JSONL with a chat template of its own (CHAT_TEMPLATE), train.py. Then, one architecture, the same steps,
batch, seed and data (equal tokens):

    sft        no teacher: next-token loss on the assistant's tokens (--alpha_ce 0 --alpha_clm 1)
    kd         off-policy KD on the corpus's answers (T=1, ce 5, clm 2, cos 0)
    onpol_0.5  the same, with half the steps on-policy (--on_policy_fraction 0.5: the KD term on the
               student's own sampled answers, --gen_temperature 1, --max_new_tokens MAX_NEW)
    onpol_1    every step on-policy

Scores on the dev pairs: bits per character of the reference answers (the summed NLL of the assistant's
tokens given the prompt, its end-of-turn token included, / ln 2 / the answers' characters), and chrF
(character n-grams 1-6, beta 2, as sacrebleu's chrF) of the greedy answer (at most MAX_NEW tokens)
against the reference, both normalised as the vocabulary is (NFKC, lowercase). The teacher is scored too.

Exit status: 0 done, 1 a step failed (its log is named), 2 bad arguments or missing corpora.
"""

import argparse
import json
import lzma
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "examples" / "distillation"
SAMPLE = REPO / "data_prep" / "sample"

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(DIST)]

from distil_ja.cli import DataError  # noqa: E402

PROMPT = "次の文に続く一文を書いてください:"
MAX_PAIRS_PER_PARAGRAPH = 3
MIN_CHARS, MAX_CHARS = 8, 90
# Turns: "ユーザー: ...[SEP]" and "アシスタント: ...</s>"; the generation prompt is the assistant's header, so
# each rendering extends the one before (binarize.py's rule) and the answer ends with </s>, where sampling stops.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}アシスタント: {{ m.content }}</s>"
    "{% else %}ユーザー: {{ m.content }}[SEP]{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}アシスタント: {% endif %}"
)
STUDENTS = {  # name: train.py loss flags
    "sft": ["--alpha_ce", "0", "--alpha_clm", "1", "--alpha_cos", "0"],
    "kd": ["--alpha_ce", "5", "--alpha_clm", "2", "--alpha_cos", "0"],
    "onpol_0.5": ["--alpha_ce", "5", "--alpha_clm", "2", "--alpha_cos", "0", "--on_policy_fraction", "0.5"],
    "onpol_1": ["--alpha_ce", "5", "--alpha_clm", "2", "--alpha_cos", "0", "--on_policy_fraction", "1"],
}


@dataclass(frozen=True)
class Size:
    vocab: int
    train_pairs: int  # 0: all
    dev_pairs: int
    gen_pairs: int  # dev pairs answered greedily for chrF
    teacher: tuple  # (layers, width)
    student: tuple
    teacher_steps: int
    student_steps: int
    batch_size: int
    max_new: int
    n_gpu: int
    sample: bool = False


SIZES = {
    "smoke": Size(vocab=1200, train_pairs=0, dev_pairs=40, gen_pairs=8, teacher=(2, 32), student=(1, 32),
                  teacher_steps=10, student_steps=4, batch_size=8, max_new=8, n_gpu=0, sample=True),
    "tiny": Size(vocab=4000, train_pairs=12000, dev_pairs=300, gen_pairs=100, teacher=(4, 128), student=(1, 128),
                 teacher_steps=400, student_steps=150, batch_size=16, max_new=48, n_gpu=0),
    "gpu": Size(vocab=16000, train_pairs=0, dev_pairs=1000, gen_pairs=300, teacher=(8, 512), student=(2, 512),
                teacher_steps=2000, student_steps=800, batch_size=32, max_new=64, n_gpu=1),
}
N_POSITIONS = 128
STUDENT_LR, TEACHER_LR = 3e-3, 4e-3


# ---- the task ------------------------------------------------------------------------------------------------


def sentences(paragraph: str) -> list[str]:
    """A paragraph cut after each "。" (the full stop kept), spaces around each sentence dropped."""
    out, start = [], 0
    for i, char in enumerate(paragraph):
        if char == "。":
            out.append(paragraph[start : i + 1].strip())
            start = i + 1
    return [s for s in out if s]


def pairs_of(paragraphs) -> list[tuple[str, str]]:
    """(sentence, the next one) of each paragraph, at most MAX_PAIRS_PER_PARAGRAPH, both of sane length."""
    out = []
    for paragraph in paragraphs:
        found = sentences(paragraph)
        kept = [(a, b) for a, b in zip(found, found[1:])
                if MIN_CHARS <= len(a) <= MAX_CHARS and MIN_CHARS <= len(b) <= MAX_CHARS]
        out += kept[:MAX_PAIRS_PER_PARAGRAPH]
    return out


def read_paragraphs(size: Size, corpora: Path) -> tuple[list[str], list[str]]:
    """(train paragraphs, dev paragraphs): JaQuAD train/dev, or the sample text's documents (a sentence a line)."""
    if size.sample:
        docs = []
        for name in ("ja_train.txt", "ja_dev.txt"):
            text = (SAMPLE / name).read_text(encoding="utf-8")
            docs.append(["".join(doc.split("\n")) for doc in text.split("\n\n") if doc.strip()])
        return docs[0], docs[1]
    files = [corpora / "jawiki_jaquad_train.txt.xz", corpora / "jawiki_jaquad_dev.txt.xz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"missing corpora: {', '.join(missing)} (--corpora names the folder holding them)")
    return tuple(lzma.open(f, "rt", encoding="utf-8").read().splitlines() for f in files)


def write_task(size: Size, corpora: Path, out: Path) -> dict:
    """train.jsonl, dev.jsonl (prompt/completion), the training text for the tokenizer; returns the counts."""
    train_paragraphs, dev_paragraphs = read_paragraphs(size, corpora)
    train, dev = pairs_of(train_paragraphs), pairs_of(dev_paragraphs)
    train = train[: size.train_pairs or None]
    dev = dev[: size.dev_pairs]
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("dev", dev)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for a, b in pairs:
                f.write(json.dumps({"prompt": PROMPT + a, "completion": b}, ensure_ascii=False) + "\n")
    (out / "tokenizer_text.txt").write_text("\n".join([PROMPT, "ユーザー", "アシスタント"] + train_paragraphs) + "\n",
                                            encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return {"train_pairs": len(train), "dev_pairs": len(dev), "dev_answer_chars": sum(len(b) for _, b in dev)}


# ---- scores ---------------------------------------------------------------------------------------------------


def char_ngrams(text: str, n: int) -> dict[str, int]:
    counts = {}
    for i in range(len(text) - n + 1):
        counts[text[i : i + n]] = counts.get(text[i : i + n], 0) + 1
    return counts


def chrf(hypothesis: str, reference: str, max_n: int = 6, beta: float = 2.0) -> float:
    """chrF in [0, 100] (Popović, 2015, as sacrebleu computes it, spaces removed): character n-gram precision
    and recall averaged over n = 1..max_n (the orders a string is long enough for), then F-beta."""
    hyp, ref = hypothesis.replace(" ", ""), reference.replace(" ", "")
    precisions, recalls = [], []
    for n in range(1, max_n + 1):
        h, r = char_ngrams(hyp, n), char_ngrams(ref, n)
        if not h or not r:
            continue
        match = sum(min(c, r.get(g, 0)) for g, c in h.items())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 0.0 if p + r == 0 else 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


def score(model_dir: Path, data: Path, dev_jsonl: Path, size: Size, device: str) -> dict:
    """Bits per character of the dev answers, and the mean chrF of greedy answers to the first gen_pairs prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from distil_ja.tokenization import load_tokenizer, normalize_text
    from lm_seqs_dataset import LmSeqsDataset, SpecialIds, read_corpus
    from losses import clm_loss_sum, counted_masks
    from on_policy import Sampling, generate, prompts_of

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    tokenizer = load_tokenizer(str(model_dir))
    ids = SpecialIds(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    sequences, _, _, masks = read_corpus([str(data)])
    dataset = LmSeqsDataset(sequences, N_POSITIONS, ids, loss_masks=masks)
    answers = [json.loads(line)["completion"] for line in dev_jsonl.read_text(encoding="utf-8").splitlines()]
    if len(dataset) != len(answers):  # every dev conversation must be scored, each beside its own answer
        raise DataError(f"{data}: {len(dataset)} of {len(answers)} dev conversations left after filtering")
    nll, greedy, scores, answer_tokens = 0.0, Sampling(1.0, 1e-9, size.max_new), [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            token_ids, lengths, counted = (x.to(device) for x in dataset.batch_sequences(
                [dataset[i] for i in range(start, min(start + 16, len(dataset)))]))
            real, pred = counted_masks(lengths, token_ids.size(1), counted)
            nll += float(clm_loss_sum(model(token_ids).logits, token_ids, real, pred))  # the assistant's tokens
            if start < size.gen_pairs:
                prompts = prompts_of(token_ids, lengths, counted)
                out, out_lengths, _ = generate(model, prompts, greedy, {ids.eos}, N_POSITIONS, ids.pad, 0, 0, device)
                for row, prompt in enumerate(prompts):
                    index = start + row
                    if index >= size.gen_pairs or prompt is None:
                        continue
                    answer = tokenizer.decode(out[row, len(prompt) : out_lengths[row]], skip_special_tokens=True)
                    answer_tokens.append(int(out_lengths[row]) - len(prompt))
                    scores.append(chrf(answer, normalize_text(answers[index])))
    chars = sum(len(a) for a in answers[: len(dataset)])
    return {"bits_per_char": nll / math.log(2) / chars, "chrf": sum(scores) / max(len(scores), 1),
            "answered": len(scores), "answer_tokens": sum(answer_tokens) / max(len(answer_tokens), 1), "chars": chars}


# ---- the runs -------------------------------------------------------------------------------------------------


def run_step(name: str, cmd: list, log_dir: Path, done: Path, fresh: bool) -> float:
    """Run a command unless its output exists (done); its output goes to LOG_DIR/NAME.log. Returns its wall s
    (of the run that made the output, kept in LOG_DIR/NAME.wall_s; None if unknown)."""
    wall_file = log_dir / f"{name}.wall_s"
    if done.exists() and not fresh:
        print(f"[chat_quality] {name}: reused {done}", flush=True)
        return float(wall_file.read_text()) if wall_file.is_file() else None
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[chat_quality] {name}: {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        result = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": f"{REPO}:{DIST}"})
    if result.returncode != 0:
        raise DataError(f"{name} failed (exit {result.returncode}): see {log_dir / (name + '.log')}")
    seconds = time.perf_counter() - start
    wall_file.write_text(f"{seconds:.1f}")
    print(f"[chat_quality] {name}: done in {seconds:.1f} s", flush=True)
    return seconds


def gpt2_config(layers_width: tuple, vocab: int) -> dict:
    layers, width = layers_width
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": width, "n_head": max(1, width // 64),
            "n_positions": N_POSITIONS, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def generation_share(dump: Path) -> float | None:
    """Share of the run's logged time spent sampling (metrics.jsonl windows, weighted by their on-policy steps)."""
    lines = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shares = [x["generation_share"] for x in lines if "generation_share" in x]
    return sum(shares) / len(lines) if shares else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    parser.add_argument("--out_dir", type=Path, default=None, help="default: checkpoints/chat_quality/SIZE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(STUDENTS), help=f"students, of {', '.join(STUDENTS)}")
    parser.add_argument("--fresh", action="store_true", help="redo every step, even those whose output exists")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    runs = args.runs.split(",")
    if any(r not in STUDENTS for r in runs):
        print(f"error: --runs: each of {', '.join(STUDENTS)}", file=sys.stderr)
        return 2
    out = args.out_dir or REPO / "checkpoints" / "chat_quality" / args.size
    try:
        return experiment(size, args, runs, out)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if "missing corpora" in str(err) else 1


def experiment(size: Size, args, runs: list, out: Path) -> int:
    py, logs = sys.executable, out / "logs"
    task = write_task(size, args.corpora, out / "task")
    tok, template = out / "tokenizer", out / "task" / "chat_template.jinja"
    run_step("tokenizer", [py, REPO / "data_prep" / "make_tokenizer.py", "--input", out / "task" / "tokenizer_text.txt",
                           "--vocab_size", size.vocab, "--output_dir", tok, "--overwrite"], logs,
             tok / "spiece.model", args.fresh)
    for name in ("train", "dev"):
        run_step(f"binarize_{name}", [py, REPO / "data_prep" / "binarize.py", "--input", out / "task" / f"{name}.jsonl",
                                      "--tokenizer", tok, "--chat_template", template, "--max_len", N_POSITIONS,
                                      "--output_dir", out / "data" / name, "--overwrite", "--quiet",
                                      "--num_workers", "2"], logs, out / "data" / name / "manifest.json", args.fresh)
    from distil_ja.tokenization import load_tokenizer

    vocab = len(load_tokenizer(str(tok)))
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    for name, shape in (("teacher", size.teacher), ("student", size.student)):
        (configs / f"{name}.json").write_text(json.dumps(gpt2_config(shape, vocab)))
    train = [py, DIST / "train.py", "--n_gpu", size.n_gpu, "--data_file", out / "data" / "train", "--tokenizer_name",
             tok, "--batch_size", size.batch_size, "--gradient_accumulation_steps", 1, "--warmup_prop", 0.05,
             "--log_interval", 10, "--checkpoint_interval", 0, "--force", "--no-plots"]
    teacher = out / "teacher"
    walls = {"teacher": run_step("teacher", train + [
        "--dump_path", teacher, "--student_config", configs / "teacher.json", "--alpha_ce", 0, "--alpha_clm", 1,
        "--alpha_cos", 0, "--train_on_prompt", "--max_steps", size.teacher_steps, "--learning_rate", TEACHER_LR,
        "--seed", 0], logs, teacher / "model.safetensors", args.fresh)}
    students = {}
    for name in runs:
        dump = out / "students" / f"{name}-s{args.seed}"
        flags = list(STUDENTS[name])
        if name != "sft":
            flags += ["--teacher_name", teacher, "--max_new_tokens", size.max_new]
        walls[name] = run_step(f"{name}-s{args.seed}", train + [
            "--dump_path", dump, "--student_config", configs / "student.json", "--max_steps", size.student_steps,
            "--learning_rate", STUDENT_LR, "--seed", args.seed, *flags], logs, dump / "model.safetensors", args.fresh)
        students[name] = dump
    device = "cuda" if size.n_gpu else "cpu"
    results = {"size": args.size, "seed": args.seed, "task": task, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "models": {}}
    for name, dump in {"teacher": teacher, **students}.items():
        scores = score(dump, out / "data" / "dev", out / "task" / "dev.jsonl", size, device)
        share = None if name == "teacher" else generation_share(dump)
        results["models"][name] = {**scores, "wall_s": walls.get(name), "generation_share": share}
    (out / f"results-s{args.seed}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    rows = [f"chat_quality --size {results['size']} --seed {results['seed']} ({results['date']}): "
            f"{results['task']['train_pairs']} training pairs, {results['task']['dev_pairs']} dev pairs "
            f"({results['task']['dev_answer_chars']} answer characters)",
            "| model | dev bits/char | chrF (greedy) | greedy answer tokens | wall s | generation share |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["models"].items():
        share = "–" if r["generation_share"] is None else f"{r['generation_share']:.2f}"
        wall = "–" if not r["wall_s"] else f"{r['wall_s']:.0f}"
        rows.append(f"| {name} | {r['bits_per_char']:.4f} | {r['chrf']:.2f} | {r['answer_tokens']:.1f} | {wall} | {share} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
