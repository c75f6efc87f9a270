#!/usr/bin/env python
"""Quality experiment: raw Japanese text -> tokenizer -> teacher -> three students -> perplexity and bits/char table.

    python bench/quality.py --size tiny                  # CPU, ~6-10 min on 2 cores
    python bench/quality.py --size gpu [--corpora DIR]   # one GPU, < 8 min (H100/H200)
    python bench/quality.py --size smoke                 # the project's sample text, < 1 min (tests)

Every step runs the project's own command-line tools in a subprocess, as a user would:

 1. data_prep/build_corpus.py  raw text (the .xz corpora, or slices of them) -> rinna layout;
                                the held-out set is JaQuAD *dev* (other Wikipedia articles than train)
 2. data_prep/make_tokenizer.py a sentencepiece vocabulary with rinna's special ids
 3. data_prep/binarize.py       train text -> token shards (the dev text is read as text: its characters count)
 4. train.py (no teacher)       pretrain the teacher
 5. scripts/extract.py          student init from evenly spread teacher layers
 6. scripts/dump_teacher_logits.py, once per k, for the kd_topK students only
 7. train.py per student (--runs), one student architecture, the same steps/batch/seed/data (= the same tokens),
    each scored on the dev set every --eval_interval steps (--eval_data):
      no_kd      random init, no teacher (--alpha_ce 0 --alpha_clm 1 --alpha_cos 0)
      kd         random init, distilled with the recipe (--recipe, default: train.py's, config.RECIPE)
      kd_init    distilled with the same recipe, initialised from teacher layers
      kd_topK    as kd, from the teacher's top-K log-probabilities dumped in step 6 (--teacher_logits;
                 the dump has no hidden states, so the recipe needs cos=0), e.g. kd_top8, kd_top64
      xkd        distilled from a teacher of another tokenizer (Size.cross_vocab pieces, trained like the
                 teacher on its own ids of the same text), at the aligned positions (--cross_kd, --recipe cross=;
                 within=1: --within_pieces)
      xkd_topK   as xkd, from that teacher's top-K dump at the aligned positions (--recipe classes=1: the
                 top K next-character classes, dump_teacher_logits.py --char_classes)
      no_kd_x    the xkd runs' no-teacher baseline: their very pieces and batches, --alpha_ce 0
 8. evaluate.py --json          perplexity and bits per character of the models on the held-out dev paragraphs, and with
                                --task_data TASK=FILE[,...] their zero-shot accuracy on each task (evaluate.py --task)

--recipe also picks the KD term's objective (kd=fkl|rkl|jsd|skew_fkl|skew_rkl|tvd, train.py's
--kd_loss), and --student_width a narrower student than the teacher (the same head size, fewer
heads; its cosine term then trains train.py's projection to the teacher's width; no kd_init).

Output (in --out_dir, default checkpoints/quality/SIZE): results-TAG.json and results-TAG.md
(the table: perplexity, bits per character, student/teacher perplexity ratio, tokens seen, token
efficiency, wall time, tensorboard log folder of each run; then the students' curves, curves-TAG.png),
logs/ (each command's output), one folder per model, and a line per invocation in sweep.jsonl.

Task accuracy (--task_data, e.g. jcommonsenseqa=valid-v1.3.json from JGLUE): a column per task,
accuracy ± its standard error, marked "≈ chance" where it lies within two standard errors of the
chance level; at the tiny and smoke sizes that is every model (they are far too small to answer).

Token efficiency ("tokens to no-KD ppl"): the tokens a student needed to reach the no-KD
student's final held-out perplexity, as a fraction of the no-KD student's tokens, read off the
evaluations made during training (interpolated linearly in log perplexity between the two around
the crossing). Below 1: distillation reached the baseline's quality on fewer tokens. The picture
needs matplotlib; without it (the GPU machine has none) the report says the plot was skipped.

A step whose command and output are unchanged is not rerun (its wall time is the one recorded
when it ran), so recipe sweeps reuse the tokenizer, the data and the teacher: `--recipe
T=1,ce=0.9,clm=0.1 --tag t1` only trains the two KD students (and the no-KD student when
--student_lr changes).  --fresh reruns everything.  Two invocations may share --out_dir once the
steps they both need exist (the teacher, the dumps, a no_kd student of the same seed), with
--keep_text so that neither deletes the text the other's corpus steps check.

Bits per character (evaluate.py, train.py --eval_data): the summed NLL / ln 2 / the characters of the
dev text as build_corpus.py wrote it (each paragraph's lines joined by "\n"), and per UTF-8 byte the
same; unlike perplexity it compares models with different tokenizers.

The corpora (../shared/corpora; see its README) are read in place; text derived from them is
written under --out_dir (git-ignored); the training text is deleted once binarized unless --keep_text,
the dev text is kept (it is what the models are scored on).
Exit status: 0 done, 1 a step failed (its log is named), 2 bad arguments or missing corpora.
"""

import argparse
import concurrent.futures
import hashlib
import json
import lzma
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "examples" / "distillation"
SAMPLE = REPO / "data_prep" / "sample"

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(DIST)]

import config  # noqa: E402  (train.py's flags; its defaults are the project's recipe)
import plots  # noqa: E402
from distil_ja.cli import DataError  # noqa: E402
from losses import CROSS_KD, KD_LOSSES  # noqa: E402
from records import read_records  # noqa: E402

# The KD students' default loss settings: the project's recipe, as train.py's defaults hold it.
DEFAULT_RECIPE = {"T": config.RECIPE["temperature"], "ce": config.RECIPE["alpha_ce"],
                  "clm": config.RECIPE["alpha_clm"], "cos": config.RECIPE["alpha_cos"],
                  "kd": config.build_parser().get_default("kd_loss"),
                  "cross": config.build_parser().get_default("cross_kd"),  # the xkd runs' --cross_kd
                  "within": float(config.build_parser().get_default("within_pieces")),  # 1: their --within_pieces
                  "classes": 0.0}  # 1: the xkd_topK dumps hold next-character classes (dump --char_classes)
RUNS = ("no_kd", "kd", "kd_init", "no_kd_x", "xkd")  # and kd_topK, xkd_topK (TOPK_RUN)
# no_kd_x: the xkd runs' own no-teacher baseline. The cross-tokenizer dataset cuts documents at aligned
# positions only, so its pieces (hence its shuffled batches) are not no_kd's, and at this size batch order
# alone moves a student by about as much as the teacher does; no_kd_x trains on the xkd runs' very batches
# (the teacher of the other tokenizer loaded, --alpha_ce 0), so xkd - no_kd_x is the teacher's effect alone.
NO_TEACHER_SIGNAL = "no_kd_x"
TOPK_RUN = re.compile(r"x?kd_top([1-9][0-9]*)")
# xkd runs: a teacher of another tokenizer (its own vocabulary of Size.cross_vocab pieces, the same
# architecture and steps as the teacher), online (xkd) or from its top-K dump (xkd_topK).
# Runs without a teacher: the data's next-token loss only (no KD, no cosine term).
CLM_ONLY = ["--alpha_ce", 0, "--alpha_clm", 1, "--alpha_cos", 0]


@dataclass(frozen=True)
class Model:
    n_layer: int
    n_embd: int
    n_head: int
    dropout: float = 0.0


@dataclass
class Size:
    """One experiment scale. Teacher and student share the width, so layers can be copied (extract.py);
    --student_width narrows the student for one invocation."""
    vocab: int
    tokenizer_lines: int  # make_tokenizer.py --max_sentences
    n_positions: int
    teacher: Model
    student: Model
    teacher_steps: int
    student_steps: int
    batch_size: int
    grad_accum: int
    teacher_lr: float
    student_lr: float
    warmup_prop: float
    weight_decay: float
    jobs: int  # students trained at once
    n_gpu: int
    precision: list = field(default_factory=list)
    wikinews_mb: float = 0.0  # training text besides JaQuAD train (MB of raw text; -1 = all)
    aozora_mb: float = 0.0
    dev_docs: int = 0  # held-out paragraphs scored (seeded sample of jawiki_jaquad_dev); 0 = all 1,431
    eval_batch: int = 8
    log_interval: int = 25
    eval_interval: int = 0  # students' training steps between dev evaluations (their curves); 0 = at the end
    sample: bool = False  # the project's sample text instead of the corpora
    cross_vocab: int = 8000  # the xkd runs' teacher tokenizer: another vocabulary, of this size


SIZES = {
    # Tests: data_prep/sample, a few steps.
    "smoke": Size(vocab=1000, tokenizer_lines=0, n_positions=64, teacher=Model(2, 32, 2), student=Model(1, 32, 2),
                  teacher_steps=12, student_steps=6, batch_size=4, grad_accum=1, teacher_lr=3e-3, student_lr=3e-3,
                  warmup_prop=0.05, weight_decay=0.0, jobs=3, n_gpu=0, log_interval=4, eval_interval=2, sample=True,
                  cross_vocab=1600),
    # 2 CPU cores: a 4 x 128 teacher, a 1 x 128 student (4x fewer layers), ~0.5M teacher tokens.
    "tiny": Size(vocab=4000, tokenizer_lines=20000, n_positions=128, teacher=Model(4, 128, 4), student=Model(1, 128, 4),
                 teacher_steps=420, student_steps=120, batch_size=16, grad_accum=1, teacher_lr=4e-3, student_lr=3e-3,
                 warmup_prop=0.05, weight_decay=0.01, jobs=2, n_gpu=0, wikinews_mb=1, dev_docs=300, log_interval=20,
                 eval_interval=20),
    # One H100/H200: a 12 x 512 teacher (~40M parameters), a 3 x 512 student (4x fewer layers), bf16.
    # Run once on an H200 (2026-11-27) with 3,000 teacher steps and no curves: 299 s, and a student
    # initialised from the teacher's layers beat the teacher (96.0 vs 108.8). So the teacher trains
    # 40 % longer and the students are scored every 200 steps: 6.3-6.8 min expected, < 8 min bounded
    # (bench/RESULTS.md, "quality, GPU size: the re-sized plan"); --teacher_steps/--student_steps rescale it.
    "gpu": Size(vocab=8000, tokenizer_lines=60000, n_positions=256, teacher=Model(12, 512, 8, 0.1),
                student=Model(3, 512, 8), teacher_steps=4200, student_steps=1200, batch_size=32, grad_accum=1,
                teacher_lr=1e-3, student_lr=1e-3, warmup_prop=0.05, weight_decay=0.01, jobs=3, n_gpu=1,
                precision=["--precision", "bf16", "--no-compile"], wikinews_mb=-1, aozora_mb=16, dev_docs=0,
                eval_batch=32, log_interval=100, eval_interval=200, cross_vocab=16000),
}


class StepFailed(Exception):
    pass


def parse_recipe(text: str) -> dict:
    """'T=1,ce=0.9,clm=0.1,kd=rkl' -> the default recipe with those values changed (kd: the objective)."""
    recipe = dict(DEFAULT_RECIPE)
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        if key not in recipe or not value:
            raise argparse.ArgumentTypeError(f"--recipe: {item!r}; keys are {', '.join(recipe)}")
        if key == "kd" and value not in KD_LOSSES:
            raise argparse.ArgumentTypeError(f"--recipe: {item!r}; kd is one of {', '.join(KD_LOSSES)}")
        if key == "cross" and value not in CROSS_KD:
            raise argparse.ArgumentTypeError(f"--recipe: {item!r}; cross is one of {', '.join(CROSS_KD)}")
        recipe[key] = value if key in ("kd", "cross") else float(value)
    return recipe


def cross_text(recipe: dict) -> str:
    return f" cross={recipe['cross']}" + (" within" if recipe["within"] else "")


def recipe_text(recipe: dict) -> str:
    return "T={T:g} ce={ce:g} clm={clm:g} cos={cos:g} kd={kd}".format(**recipe)


def topk_of(run: str) -> int | None:
    """kd_top8, xkd_top8 -> 8; None for the other runs."""
    match = TOPK_RUN.fullmatch(run)
    return int(match[1]) if match else None


def arch(model: Model) -> str:
    return f"{model.n_layer}x{model.n_embd}"


def narrower(model: Model, width: int) -> Model | None:
    """The model at another width with the same head size (fewer heads); None if the heads do not divide it."""
    head = model.n_embd // model.n_head
    if width < head or width % head:
        return None
    return replace(model, n_embd=width, n_head=width // head)


def gpt2_config(model: Model, vocab: int, n_positions: int) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
            "n_positions": n_positions, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "tie_word_embeddings": True, "n_layer": model.n_layer, "n_embd": model.n_embd, "n_head": model.n_head,
            "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": model.dropout}


class Runner:
    """Runs the steps; a step is skipped when its stamp records the same command and its output exists."""

    def __init__(self, out: Path, fresh: bool, dry_run: bool, env: dict):
        self.out, self.fresh, self.dry_run, self.env = out, fresh, dry_run, env
        self.lock = threading.Lock()  # students run in threads: one whole line at a time
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "stamps").mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[quality] {text}", flush=True)

    def run(self, name: str, cmd: list, output: Path, *, key_extra=None) -> dict:
        cmd = [str(c) for c in cmd]
        key = {"cmd": cmd, "extra": key_extra}
        stamp = self.out / "stamps" / f"{name}.json"
        log = self.out / "logs" / f"{name}.log"
        if not self.fresh and stamp.is_file() and output.exists():
            saved = json.loads(stamp.read_text())
            if saved.get("key") == key:
                self.say(f"{name}: unchanged, reused ({saved['wall_s']:.1f} s when run)")
                return {**saved, "cached": True}
        printable = " ".join(shlex.quote(c) for c in cmd)
        self.say(f"{name}: {printable}")
        if self.dry_run:
            return {"key": key, "wall_s": 0.0, "cached": False, "log": str(log)}
        stamp.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write(f"$ {printable}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise StepFailed(f"{name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        record = {"key": key, "wall_s": wall, "log": str(log), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        stamp.write_text(json.dumps(record, indent=1) + "\n")
        self.say(f"{name}: done in {wall:.1f} s")
        return {**record, "cached": False}


def write_config(path: Path, config: dict) -> None:
    """Written only when it changes: invocations sharing --out_dir may be reading it."""
    text = json.dumps(config, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_slice(src: Path, dst: Path, megabytes: float, blank_line_docs: bool) -> None:
    """The first `megabytes` MB of an .xz text file, ending at a document boundary."""
    limit = math.inf if megabytes < 0 else megabytes * 1e6
    written = 0
    with lzma.open(src, "rt", encoding="utf-8", errors="replace") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            at_boundary = (not line.strip()) if blank_line_docs else True
            if written >= limit and at_boundary:
                break
            fout.write(line)
            written += len(line.encode("utf-8"))


def default_corpora() -> Path:
    for candidate in (REPO.parent / "shared" / "corpora", REPO / "shared" / "corpora"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "corpora"


def prepare_text(size: Size, corpora: Path, text_dir: Path, runner: Runner, py: str) -> tuple[list, Path, dict]:
    """build_corpus.py over the sources; returns (train doc_data dirs, dev text dir, step records)."""
    build = [py, REPO / "data_prep" / "build_corpus.py", "--quiet", "--overwrite", "--source", "text"]
    steps, train_dirs = {}, []
    if size.sample:
        sources = [("train_sample", SAMPLE / "ja_train.txt", [], "doc_data"),
                   ("dev", SAMPLE / "ja_dev.txt", [], "doc_data")]
    else:
        raw = text_dir / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        sources = [("train_jawiki", corpora / "jawiki_jaquad_train.txt.xz", ["--doc_per_line", "--split_sentences"],
                    "doc_data")]
        if size.wikinews_mb:
            sliced = raw / f"wikinews_{size.wikinews_mb:g}MB.txt"
            if not runner.dry_run and (runner.fresh or not sliced.is_file()):
                write_slice(corpora / "jawikinews.txt.xz", sliced, size.wikinews_mb, blank_line_docs=False)
            sources.append(("train_wikinews", sliced, ["--doc_per_line", "--split_sentences"], "doc_data"))
        if size.aozora_mb:
            sliced = raw / f"aozora_{size.aozora_mb:g}MB.txt"
            if not runner.dry_run and (runner.fresh or not sliced.is_file()):
                write_slice(corpora / "aozora_modern_50MB.txt.xz", sliced, size.aozora_mb, blank_line_docs=True)
            sources.append(("train_aozora", sliced, [], "doc_data"))
        dev_args = ["--doc_per_line", "--split_sentences"]
        dev_part = "doc_data"
        if size.dev_docs:  # a seeded sample of the dev paragraphs goes to dev_data/
            dev_args += ["--dev_docs", str(size.dev_docs), "--seed", "0"]
            dev_part = "dev_data"
        sources.append(("dev", corpora / "jawiki_jaquad_dev.txt.xz", dev_args, dev_part))
    dev_dir = None
    for name, src, extra, part in sources:
        out = text_dir / name
        steps[f"corpus_{name}"] = runner.run(f"corpus_{name}", build + ["--input", src, "--output_dir", out, *extra],
                                             out / part)
        if name == "dev":
            dev_dir = out / part
        else:
            train_dirs.append(out / "doc_data")
    return train_dirs, dev_dir, steps


def tokens_seen(dump_path: Path) -> int | None:
    """The token counter of the run's newest checkpoint (real tokens, padding excluded)."""
    import torch

    found = sorted(dump_path.glob("checkpoint_step*/training_state.pt"))
    if not found:
        return None
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    return int(state["loop_state"]["tokens_seen"])


def student_runs(recipe: dict, names: list[str]) -> dict:
    """Each wanted student's init, teacher (topk: K for a top-K offline teacher) and loss flags."""
    kd = ["--temperature", recipe["T"], "--alpha_ce", recipe["ce"], "--alpha_clm", recipe["clm"],
          "--alpha_cos", recipe["cos"], "--kd_loss", recipe["kd"]]
    fixed = {
        "no_kd": {"init": "random", "teacher": False, "args": CLM_ONLY},
        "kd": {"init": "random", "teacher": True, "args": kd},
        "kd_init": {"init": "teacher layers", "teacher": True, "args": kd},
        NO_TEACHER_SIGNAL: {"init": "random", "teacher": True, "args": CLM_ONLY},
    }
    specs = {name: {"topk": topk_of(name), "cross": is_cross(name), **fixed.get(name, fixed["kd"])} for name in names}
    for name, spec in specs.items():
        if spec["cross"]:
            spec["args"] = spec["args"] + ["--cross_kd", recipe["cross"]]
            if recipe["within"] and name != NO_TEACHER_SIGNAL:
                spec["args"] = spec["args"] + ["--within_pieces"]
    return specs


def is_cross(run: str) -> bool:
    """xkd, xkd_topK and their baseline no_kd_x: the teacher of another tokenizer."""
    return run.startswith("xkd") or run == NO_TEACHER_SIGNAL


def topk_dump(out: Path, k: int, temperature: float, cross_vocab: int | None = None, within: bool = False,
              classes: bool = False) -> Path:
    """The top-k dump of the teacher, or (cross_vocab) of the teacher of another tokenizer (within: its
    dump_teacher_logits.py --within_pieces rows; classes: --char_classes rows)."""
    return out / "teacher_logits" / (f"top{k}-T{temperature:g}" + (f"-x{cross_vocab}" if cross_vocab else "") +
                                     ("-within" if cross_vocab and within else "") +
                                     ("-classes" if cross_vocab and classes else ""))


def runs_problem(runs_wanted: list[str], recipe: dict, size: Size) -> str | None:
    """Why these --runs cannot run with this recipe and student (None: they can)."""
    bad = [r for r in runs_wanted if r not in RUNS and topk_of(r) is None]
    if bad or not runs_wanted:
        return (f"--runs takes {', '.join(RUNS)}, kd_topK and xkd_topK (e.g. kd_top8); "
                f"got {','.join(runs_wanted)!r}")
    if recipe["cos"] and any(topk_of(r) for r in runs_wanted):
        return "kd_topK: an offline teacher has no hidden states; pass --recipe cos=0"
    if recipe["cos"] and any(is_cross(r) for r in runs_wanted):
        return "xkd: a teacher of another tokenizer has no position-by-position cosine term; pass --recipe cos=0"
    if "kd_init" in runs_wanted and size.student.n_embd != size.teacher.n_embd:
        return "kd_init copies teacher layers, so it needs the teacher's width: drop --student_width or kd_init"
    return None


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
    rows = result["runs"]
    task_names = list(dict.fromkeys(t for r in rows.values() for t in r.get("tasks", {})))
    lines = ["| run | model | init | teacher | recipe | lr | steps | tokens seen | wall s | dev ppl | dev bits/char | "
             "ppl ÷ teacher | tokens to no-KD ppl | " + "".join(f"{t} acc | " for t in task_names) + "tensorboard |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             + "---: | " * len(task_names) + "--- |"]
    for name, r in rows.items():
        recipe = r.get("recipe_text", "")
        accuracy = "".join(f"{task_cell(r.get('tasks', {}).get(t))} | " for t in task_names)
        lines.append(f"| {name} | {r['model']} | {r['init']} | {teacher_cell(r)} | {recipe} | "
                     f"{r['lr']:g} | {r['steps']} | {fmt(r['tokens_seen'], ',')} | {fmt(r['wall_s'], '.0f')}"
                     f"{'*' if r.get('cached') else ''} | {fmt(r['perplexity'], '.2f')} | {fmt(r.get('bits_per_char'), '.4f')} | "
                     f"{fmt(r['ratio'], '.3f')} | {efficiency_cell(r.get('token_efficiency'))} | {accuracy}"
                     f"`{r['tensorboard']}` |")
    return "\n".join(lines)


def near_chance(task: dict) -> bool:
    """Accuracy within two standard errors of the chance level: no evidence the model answers at all."""
    return abs(task["acc"] - task["chance"]) <= 2 * task["acc_stderr"]


def task_cell(task: dict | None) -> str:
    if task is None:
        return "–"
    return f"{task['acc']:.3f} ± {task['acc_stderr']:.3f}{' ≈ chance' if near_chance(task) else ''}"


def parse_task_data(text: str) -> list[tuple[str, Path]]:
    """--task_data `TASK=FILE[,TASK=FILE]` (TASK: a built-in task of evaluate.py or a task definition file)."""
    pairs = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise argparse.ArgumentTypeError(f"{spec!r} is not TASK=FILE")
        pairs.append((task, Path(path).resolve()))
    return pairs


def task_notes(runs: dict, tasks: dict) -> str:
    """What the accuracy columns are, and whether any model is distinguishable from chance."""
    if not tasks:
        return ""
    described = "; ".join(f"{t}: {d['prompt_id']}, zero-shot, {d['n']} items of {d['data']}, chance {d['chance']:.3f}"
                          + (f", {d['merged_choices']} choices unknown to the vocabulary (merged into <unk>)"
                             if d.get("merged_choices") else "") for t, d in tasks.items())
    at_chance = [f"{n} on {t}" for n, r in runs.items() for t, a in r.get("tasks", {}).items() if near_chance(a)]
    every = len(at_chance) == sum(len(r.get("tasks", {})) for r in runs.values())
    verdict = ("every model is within two standard errors of chance on every task: models of this size do not "
               "answer these questions, so the accuracy columns rank nothing here" if every else
               f"within two standard errors of chance (≈): {', '.join(at_chance) or 'none'}")
    return f" Task accuracy (evaluate.py --task, log-likelihood of the choices; ± standard error): {described}; {verdict}."


def teacher_cell(row: dict) -> str:
    other = ", other tokenizer" if row.get("cross") else ""
    if row.get("teacher_topk"):
        return f"top-{row['teacher_topk']} offline{other}"
    if row.get("recipe_text") == "clm only" and row["teacher"]:  # no_kd_x
        return f"loaded, unused (alpha_ce 0){other}"
    return f"yes{other}" if row["teacher"] else "no"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--corpora", default=None,
                        help="Folder of the .xz corpora (default: ../shared/corpora, else shared/corpora).")
    parser.add_argument("--out_dir", default=None, help="Work and output folder (default: checkpoints/quality/SIZE).")
    parser.add_argument("--recipe", type=parse_recipe, default=parse_recipe(""),
                        help="KD students' loss settings, e.g. 'T=1,ce=0.9,clm=0.1,cos=0,kd=rkl' (kd: train.py's "
                             f"--kd_loss, one of {', '.join(KD_LOSSES)}; default {DEFAULT_RECIPE}: train.py's, "
                             "config.RECIPE).")
    parser.add_argument("--student_lr", type=float, default=None, help="Learning rate of the students (default: per size).")
    parser.add_argument("--kd_lr", type=float, default=None,
                        help="Learning rate of the distilled students only (default: --student_lr).")
    parser.add_argument("--student_steps", type=int, default=None, help="Optimizer steps of each student.")
    parser.add_argument("--teacher_steps", type=int, default=None)
    parser.add_argument("--eval_interval", type=int, default=None,
                        help="Students' steps between dev evaluations, their curves (default: per size; 0: at the end only).")
    parser.add_argument("--runs", default="no_kd,kd,kd_init",
                        help="Which students to train (comma-separated): no_kd, kd, kd_init, kd_topK (an offline "
                             "top-K teacher, e.g. kd_top8; needs --recipe cos=0), xkd and xkd_topK (a teacher of "
                             "another tokenizer, online or offline; needs --recipe cos=0).")
    parser.add_argument("--student_width", type=int, default=None,
                        help="The students' width (default: the teacher's): fewer heads of the same size. "
                             "Narrower than the teacher, the cosine term learns a projection; no kd_init.")
    parser.add_argument("--task_data", type=parse_task_data, default=[],
                        help="Also score every model on these multiple-choice tasks: TASK=FILE[,TASK=FILE], e.g. "
                             "jcommonsenseqa=valid-v1.3.json,jnli=valid-v1.3.json (JGLUE's files).")
    parser.add_argument("--tag", default="default", help="Names results-TAG.json/.md (keep one per sweep point).")
    parser.add_argument("--jobs", type=int, default=None, help="Students trained at once (default: per size).")
    parser.add_argument("--seed", type=int, default=0, help="Students' seed (the teacher keeps seed 0).")
    parser.add_argument("--report_dir", default=None,
                        help="Also copy the results, logs, metrics and tensorboard folders here (e.g. $OUT).")
    parser.add_argument("--keep_text", action="store_true", help="Keep the text derived from the corpora.")
    parser.add_argument("--fresh", action="store_true", help="Rerun every step, even unchanged ones.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = replace(SIZES[args.size])
    if args.student_lr is not None:
        size.student_lr = args.student_lr
    if args.student_steps is not None:
        size.student_steps = args.student_steps
    if args.teacher_steps is not None:
        size.teacher_steps = args.teacher_steps
    if args.eval_interval is not None:
        size.eval_interval = args.eval_interval
    if args.student_width is not None:
        size.student = narrower(size.student, args.student_width)
        if size.student is None:
            print(f"quality.py: --student_width must be a multiple of the head size, "
                  f"{SIZES[args.size].student.n_embd // SIZES[args.size].student.n_head}", file=sys.stderr)
            return 2
    jobs = args.jobs or size.jobs
    runs_wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    problem = runs_problem(runs_wanted, args.recipe, size)
    if problem:
        print(f"quality.py: {problem}", file=sys.stderr)
        return 2
    corpora = Path(args.corpora) if args.corpora else default_corpora()
    if not size.sample:
        needed = ["jawiki_jaquad_train.txt.xz", "jawiki_jaquad_dev.txt.xz"]
        needed += ["jawikinews.txt.xz"] if size.wikinews_mb else []
        needed += ["aozora_modern_50MB.txt.xz"] if size.aozora_mb else []
        missing = [n for n in needed if not (corpora / n).is_file()]
        if missing:
            print(f"quality.py: {corpora} lacks {', '.join(missing)}; pass --corpora DIR", file=sys.stderr)
            return 2
    out = Path(args.out_dir or REPO / "checkpoints" / "quality" / args.size).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if size.n_gpu == 0:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # tiny models: one thread per process is fastest
    runner = Runner(out, args.fresh, args.dry_run, env)
    py = sys.executable
    started = time.perf_counter()
    try:
        result = experiment(args, size, jobs, runs_wanted, corpora, out, runner, py)
    except StepFailed as err:
        print(f"quality.py: {err}", file=sys.stderr)
        return 1
    if result is None:
        return 0
    result["total_wall_s"] = time.perf_counter() - started
    stem = out / f"results-{args.tag}"  # the tag may hold dots (lr 1.5e-3): no with_suffix
    table = markdown_table(result)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    Path(f"{stem}.md").write_text(report_markdown(result, table))
    with open(out / "sweep.jsonl", "a") as f:
        f.write(json.dumps({"tag": args.tag, "date": result["date"], "recipe": result["recipe"],
                            "student": arch(size.student), "student_lr": size.student_lr, "kd_lr": args.kd_lr,
                            "student_steps": size.student_steps,
                            "perplexity": {k: v["perplexity"] for k, v in result["runs"].items()},
                            "bits_per_char": {k: v.get("bits_per_char") for k, v in result["runs"].items()},
                            "tokens_to_no_kd_ppl": {k: v["token_efficiency"]["fraction"] for k, v in result["runs"].items()
                                                    if "token_efficiency" in v}}) + "\n")
    print()
    print(result["title"])
    print(table)
    print(result["notes"])
    print(f"[quality] curves: {result['curves'] or result['curves_note']}")
    print(f"[quality] total {result['total_wall_s']:.0f} s; wrote {stem}.json and {stem}.md")
    if args.report_dir:
        copy_report(result, out, Path(args.report_dir), stem)
    return 0


def experiment(args, size: Size, jobs, runs_wanted, corpora, out, runner: Runner, py) -> dict | None:
    text_dir = out / "text"
    steps = {}
    train_dirs, dev_text, corpus_steps = prepare_text(size, corpora, text_dir, runner, py)
    steps.update(corpus_steps)

    tok = out / "tokenizer"
    steps["tokenizer"] = runner.run("tokenizer", [
        py, REPO / "data_prep" / "make_tokenizer.py", "--input", *train_dirs, "--vocab_size", size.vocab,
        "--max_sentences", size.tokenizer_lines, "--output_dir", tok, "--overwrite"], tok / "spiece.model")
    workers = max(1, min(8, os.cpu_count() or 1))  # the shards are the same whatever the number
    binarize = [py, REPO / "data_prep" / "binarize.py", "--tokenizer", tok, "--num_workers", workers, "--quiet", "--overwrite"]
    # the tokenizer's hash is part of the key: a new vocabulary re-binarizes
    tok_hash = None if args.dry_run else hashlib.sha256((tok / "spiece.model").read_bytes()).hexdigest()
    data, dev = out / "data" / "train", dev_text  # dev: text, so that its characters are counted (bits/char)
    steps["binarize_train"] = runner.run("binarize_train", binarize + ["--input", *train_dirs, "--output_dir", data],
                                         data / "manifest.json", key_extra=tok_hash)
    specs = student_runs(args.recipe, runs_wanted)
    cross = any(spec["cross"] for spec in specs.values())
    if cross:  # the other tokenizer, the teacher's own data in it, and the student's data with the teacher's ids
        tok_x = out / f"tokenizer-x{size.cross_vocab}"
        steps["tokenizer_x"] = runner.run("tokenizer_x", [
            py, REPO / "data_prep" / "make_tokenizer.py", "--input", *train_dirs, "--vocab_size", size.cross_vocab,
            "--max_sentences", size.tokenizer_lines, "--output_dir", tok_x, "--overwrite"], tok_x / "spiece.model")
        tok_x_hash = None if args.dry_run else hashlib.sha256((tok_x / "spiece.model").read_bytes()).hexdigest()
        data_tx, data_pair = out / "data" / f"train-x{size.cross_vocab}", out / "data" / f"train-pair-x{size.cross_vocab}"
        steps["binarize_train_x"] = runner.run(
            "binarize_train_x", [*binarize[:3], tok_x, *binarize[4:], "--input", *train_dirs, "--output_dir", data_tx],
            data_tx / "manifest.json", key_extra=tok_x_hash)
        steps["binarize_pair"] = runner.run(
            "binarize_pair", binarize + ["--teacher_tokenizer", tok_x, "--input", *train_dirs, "--output_dir", data_pair],
            data_pair / "manifest.json", key_extra=[tok_hash, tok_x_hash])

    if not args.keep_text and not args.dry_run:  # the shards are all the training needs; the dev text stays
        for folder in text_dir.iterdir():
            if folder.name != "dev":
                shutil.rmtree(folder, ignore_errors=True)

    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    teacher_cfg, student_cfg = configs / "teacher.json", configs / f"student-{arch(size.student)}.json"
    write_config(teacher_cfg, gpt2_config(size.teacher, size.vocab, size.n_positions))
    write_config(student_cfg, gpt2_config(size.student, size.vocab, size.n_positions))
    common = ["--n_gpu", size.n_gpu, *size.precision, "--data_file", data, "--tokenizer_name", tok,
              "--batch_size", size.batch_size, "--gradient_accumulation_steps", size.grad_accum,
              "--warmup_prop", size.warmup_prop, "--weight_decay", size.weight_decay,
              "--log_interval", size.log_interval, "--checkpoint_interval", 0, "--keep_checkpoints", 1, "--force"]
    train = [py, DIST / "train.py"]
    # Keys also carry the data's and configs' identity, so new data or models retrain (the teacher
    # only for its own config: another student width keeps it).
    teacher_data_key = [tok_hash, None if args.dry_run else (data / "manifest.json").read_text(), teacher_cfg.read_text()]
    data_key = teacher_data_key + [student_cfg.read_text()]
    # the runs on the pair's shards (no_kd_x): new pair data retrains them too
    pair_key = None if args.dry_run or not cross else (data_pair / "manifest.json").read_text()

    teacher = out / "teacher"
    teacher_x = out / f"teacher-x{size.cross_vocab}"  # the teacher of another tokenizer (xkd runs)
    init = out / "student_init.pth"
    # top-k dumps, keyed by (k, whether of the teacher of another tokenizer)
    dumps = {(k, x): topk_dump(out, k, args.recipe["T"], size.cross_vocab if x else None, bool(args.recipe["within"]),
                               bool(args.recipe["classes"]))
             for k, x in sorted({(s["topk"], s["cross"]) for s in specs.values() if s["topk"]})}
    jobs_list = []
    for name in runs_wanted:
        spec = specs[name]
        lr = size.student_lr if not spec["teacher"] or args.kd_lr is None else args.kd_lr
        spec["lr"] = lr
        run_common = [data_pair if c == data else c for c in common] if spec["cross"] else common
        cmd = train + run_common + ["--student_config", student_cfg, "--max_steps", size.student_steps,
                                    "--learning_rate", lr, "--seed", args.seed, *spec["args"],
                                    "--eval_data", dev, "--eval_interval", size.eval_interval]
        if spec["topk"]:
            cmd += ["--teacher_logits", dumps[spec["topk"], spec["cross"]]]
        elif spec["teacher"]:
            cmd += ["--teacher_name", teacher_x if spec["cross"] else teacher]
        if spec["init"] != "random":
            cmd += ["--student_pretrained_weights", init]
        # one folder per setting, so a sweep keeps every point
        dump = out / "students" / f"{name}-{short_hash([str(c) for c in cmd])}"
        cmd += ["--dump_path", dump]
        jobs_list.append((name, dump, cmd, spec["teacher"]))

    def submit(pool, name, dump, cmd, key):
        return pool.submit(runner.run, f"student_{name}-{dump.name.split('-')[-1]}", cmd,
                           dump / "model.safetensors", key_extra=key)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # the student trained alone needs no teacher: it runs while the teacher trains
        futures = {name: submit(pool, name, dump, cmd, data_key + ([pair_key] if specs[name]["cross"] else []))
                   for name, dump, cmd, needs_teacher in jobs_list if not needs_teacher}
        steps["teacher"] = runner.run("teacher", train + common + [
            "--dump_path", teacher, "--student_config", teacher_cfg, *CLM_ONLY,
            "--max_steps", size.teacher_steps, "--learning_rate", size.teacher_lr, "--seed", 0],
            teacher / "model.safetensors", key_extra=teacher_data_key)
        teacher_key = [data_key, steps["teacher"].get("date")]
        if cross:  # the same architecture, steps and seed as the teacher, on its own tokenizer's ids of the same text
            teacher_x_cfg = configs / f"teacher-x{size.cross_vocab}.json"
            write_config(teacher_x_cfg, gpt2_config(size.teacher, size.cross_vocab, size.n_positions))
            common_x = [data_tx if c == data else tok_x if c == tok else c for c in common]
            steps["teacher_x"] = runner.run("teacher_x", train + common_x + [
                "--dump_path", teacher_x, "--student_config", teacher_x_cfg, *CLM_ONLY,
                "--max_steps", size.teacher_steps, "--learning_rate", size.teacher_lr, "--seed", 0],
                teacher_x / "model.safetensors", key_extra=[tok_x_hash, teacher_x_cfg.read_text()])
            teacher_key += [steps["teacher_x"].get("date"), None if args.dry_run else (data_pair / "manifest.json").read_text()]
        if "kd_init" in runs_wanted:
            steps["extract"] = runner.run(
                "extract", [py, DIST / "scripts" / "extract.py", "--teacher", teacher,
                            "--student_config", student_cfg, "--dump_checkpoint", init], init, key_extra=teacher_key)
        futures.update({name: submit(pool, name, dump, cmd, teacher_key)
                        for name, dump, cmd, needs_teacher in jobs_list if needs_teacher and not specs[name]["topk"]})
        for (k, x), folder in dumps.items():  # the offline teachers, one dump per k over all the training data
            step = f"dump_{folder.name}"
            steps[step] = runner.run(
                step, [py, DIST / "scripts" / "dump_teacher_logits.py", "--teacher", teacher_x if x else teacher,
                       "--tokenizer_name", tok, "--data_file", data_pair if x else data, "--output_dir", folder,
                       "--top_k", k, "--temperature", args.recipe["T"], "--n_gpu", size.n_gpu, "--force",
                       *(["--within_pieces"] if x and args.recipe["within"] else []),
                       *(["--char_classes"] if x and args.recipe["classes"] else [])],
                folder / "manifest.json", key_extra=[teacher_data_key, steps["teacher_x" if x else "teacher"].get("date")])
            futures.update({name: submit(pool, name, dump, cmd, teacher_key + [steps[step].get("date")])
                            for name, dump, cmd, _ in jobs_list if (specs[name]["topk"], specs[name]["cross"]) == (k, x)})
        for name, _, _, _ in jobs_list:
            steps[f"student_{name}"] = futures[name].result()

    models = [("teacher", teacher)] + ([("teacher_x", teacher_x)] if cross else []) + \
        [(name, dump) for name, dump, _, _ in jobs_list]
    ppl_json = out / f"perplexity-{args.tag}.json"
    eval_cmd = [py, DIST / "evaluate.py", "--tokenizer", tok, "--data", dev, "--batch_size", size.eval_batch,
                "--json", ppl_json, "--device", "cuda" if size.n_gpu else "cpu",
                *(["--bf16"] if "bf16" in size.precision else [])]
    for label, path in models:
        eval_cmd += ["--model", f"{label}={path}"]
    if cross:  # scored in its own tokenizer: bits per character compare it with the others
        eval_cmd += ["--tokenizer", f"teacher_x={tok_x}"]
    # the model folders' weights decide the numbers: key on the training stamps' dates
    steps["evaluate"] = runner.run(f"evaluate-{args.tag}", eval_cmd, ppl_json,
                                   key_extra=[steps[k].get("date") for k in steps if k.startswith(("teacher", "student"))])
    task_jsons = {}
    for task, path in args.task_data:
        label = Path(task).stem  # a definition file names its column by its file name
        task_jsons[label] = out / f"accuracy-{args.tag}-{label}.json"
        task_cmd = [c for c in eval_cmd if c not in ("--data", dev)]
        task_cmd[task_cmd.index(ppl_json)] = task_jsons[label]
        steps[f"task_{label}"] = runner.run(f"task-{args.tag}-{label}", task_cmd + ["--task", task, "--task_data", path],
                                            task_jsons[label], key_extra=steps["evaluate"].get("date"))
    if args.dry_run:
        return None

    ppl = json.loads(ppl_json.read_text())
    details = ppl["details"]
    t_ppl = ppl["perplexity"]["teacher"]
    recipe = recipe_text(args.recipe)
    runs = {"teacher": {"model": arch(size.teacher), "init": "random", "teacher": False, "recipe_text": "clm only",
                        "lr": size.teacher_lr, "steps": size.teacher_steps, "tokens_seen": tokens_seen(teacher),
                        "wall_s": steps["teacher"]["wall_s"], "cached": steps["teacher"]["cached"],
                        "perplexity": t_ppl, "ratio": 1.0, "tensorboard": rel(teacher / "log"), "path": rel(teacher),
                        **per_text(ppl, "teacher")}}
    if cross:  # its perplexity counts other tokens: only its bits per character compare
        runs["teacher_x"] = {"model": f"{arch(size.teacher)}, vocab {size.cross_vocab}", "init": "random",
                             "teacher": False, "recipe_text": "clm only", "lr": size.teacher_lr,
                             "steps": size.teacher_steps, "tokens_seen": tokens_seen(teacher_x),
                             "wall_s": steps["teacher_x"]["wall_s"], "cached": steps["teacher_x"]["cached"],
                             "perplexity": ppl["perplexity"]["teacher_x"], "ratio": None,
                             "tensorboard": rel(teacher_x / "log"), "path": rel(teacher_x), **per_text(ppl, "teacher_x")}
    for name, dump, cmd, _ in jobs_list:
        spec = specs[name]
        p = ppl["perplexity"][name]
        runs[name] = {"model": arch(size.student), "init": spec["init"], "teacher": spec["teacher"],
                      "teacher_topk": spec["topk"], "cross": spec["cross"],
                      "recipe_text": (recipe + (cross_text(args.recipe) if spec["cross"] else "")
                                      if spec["teacher"] and name != NO_TEACHER_SIGNAL else "clm only"),
                      "lr": spec["lr"], "steps": size.student_steps, "tokens_seen": tokens_seen(dump),
                      "wall_s": steps[f"student_{name}"]["wall_s"], "cached": steps[f"student_{name}"]["cached"],
                      "perplexity": p, "ratio": p / t_ppl, **per_text(ppl, name),
                      "tensorboard": rel(dump / "log"), "path": rel(dump),
                      "command": " ".join(shlex.quote(str(c)) for c in cmd)}
    tasks = {}
    for label, path in task_jsons.items():
        found = json.loads(path.read_text())["task"]
        for name in runs:
            runs[name].setdefault("tasks", {})[label] = found["results"][name]
        first = found["results"]["teacher"]
        tasks[label] = {"prompt_id": found["prompt_id"], "data": found["data"], "n": first["n"], "chance": first["chance"],
                        "merged_choices": first.get("merged_choices", 0)}
    curves = students_curves(out, args.tag, [(name, dump) for name, dump, _, _ in jobs_list])
    for name, efficiency in curves["token_efficiency"].items():
        runs[name]["token_efficiency"] = efficiency
    dev_tokens, dev_chars = details["teacher"]["tokens"], details["teacher"].get("chars")
    date = time.strftime("%a %b %d %H:%M %Z %Y")
    title = (f"quality --size {args.size} ({date}): teacher {arch(size.teacher)}, student {arch(size.student)}, "
             f"vocab {size.vocab}, context {size.n_positions}, batch {size.batch_size}x{size.grad_accum}, "
             f"recipe {recipe}, student lr {size.student_lr:g}"
             + (f" (KD students {args.kd_lr:g})" if args.kd_lr is not None else "")
             + (f"; teacher_x: the same teacher on its own {size.cross_vocab}-piece tokenizer" if cross else ""))
    kd_names = [n for n in runs if n not in ("teacher", "teacher_x", "no_kd", NO_TEACHER_SIGNAL)]
    verdicts = []
    for n in kd_names:  # each against its own baseline: no_kd_x for the xkd runs where it ran, in bits/char
        base = NO_TEACHER_SIGNAL if runs[n].get("cross") and NO_TEACHER_SIGNAL in runs else "no_kd"
        if base in runs:
            better = runs[n]["bits_per_char"] < runs[base]["bits_per_char"]
            verdicts.append(f"{n} {'beats' if better else 'does NOT beat'} {base} "
                            f"({runs[n]['bits_per_char']:.4f} vs {runs[base]['bits_per_char']:.4f} bits/char)")
    kept = gain_kept(runs)
    if kept:
        verdicts.append("of the same-tokenizer KD gain in dev bits/char, " + ", ".join(
            f"{n} keeps {share:.0%}" for n, share in kept.items()))
    train_manifest = json.loads((data / "manifest.json").read_text())["totals"]
    notes = (f"Held-out: {dev_tokens:,} predicted tokens of jawiki_jaquad_dev"
             f"{'' if size.sample else f' ({size.dev_docs or 1431} paragraphs)'}"
             + (f", {dev_chars:,} characters: dev bits/char = the summed NLL / ln 2 / those characters of the "
                f"original text (it compares models of different tokenizers; perplexity only models of one)"
                if dev_chars else "") + "; training data "
             f"{train_manifest['tokens']:,} tokens in {train_manifest['documents']:,} documents. "
             f"ppl ÷ teacher = student perplexity / teacher perplexity. Wall s: the train.py process "
             f"(students {jobs} at a time; * = reused from an earlier run). " + "; ".join(verdicts) + ". "
             f"Tokens to no-KD ppl: the tokens a student needed to reach no_kd's final held-out perplexity "
             f"during training (dev evaluations every {size.eval_interval or size.student_steps} steps, "
             f"interpolated in log perplexity), as a fraction of no_kd's tokens; ≤: already reached at the "
             f"first evaluation." + task_notes(runs, tasks))
    if size.sample:
        notes = notes.replace("jawiki_jaquad_dev", "data_prep/sample/ja_dev.txt")
    return {"title": title, "notes": notes, "date": date, "size": args.size, "argv": sys.argv[1:],
            "recipe": args.recipe, "student_lr": size.student_lr, "kd_lr": args.kd_lr, "config": asdict(size),
            "dev_tokens": dev_tokens, "dev_chars": dev_chars, "dev_bytes": details["teacher"].get("bytes"),
            "train_tokens": train_manifest["tokens"], "runs": runs, "tasks": tasks,
            "kd_beats_no_kd": {n: runs[n]["perplexity"] < runs["no_kd"]["perplexity"] for n in kd_names}
            if "no_kd" in runs else {}, "gain_kept": kept, "curves": curves["png"], "curves_note": curves["note"], "steps": {k: {"wall_s": v["wall_s"], "cached": v["cached"]} for k, v in steps.items()}}


def gain_kept(runs: dict) -> dict[str, float]:
    """Each cross-tokenizer student's share of the same-tokenizer KD gain in dev bits per character:
    (base - xkd) / (no_kd - kd), base its own no-teacher baseline (no_kd_x where it ran, else no_kd).
    Empty without no_kd, kd and an xkd run."""
    try:
        gain = runs["no_kd"]["bits_per_char"] - runs["kd"]["bits_per_char"]
        base = runs.get(NO_TEACHER_SIGNAL, runs["no_kd"])["bits_per_char"]
    except (KeyError, TypeError):
        return {}
    return {n: (base - r["bits_per_char"]) / gain for n, r in runs.items()
            if r.get("cross") and n != NO_TEACHER_SIGNAL and r.get("bits_per_char") is not None and gain}


def per_text(ppl: dict, label: str) -> dict:
    """A model's bits per character and per byte of the dev text, from evaluate.py's JSON (None: not measured)."""
    return {key: ppl.get(key, {}).get(label) for key in ("bits_per_char", "bits_per_byte")}


def students_curves(out: Path, tag: str, students: list[tuple[str, Path]]) -> dict:
    """The students' evaluations during training: their token efficiency, and one picture of their curves."""
    histories = {name: read_records(dump)[1] for name, dump in students}
    png = out / f"curves-{tag}.png"
    try:
        plots.write_plot([dump for _, dump in students], png, [name for name, _ in students])
        found, note = rel(png), ""
    except (plots.PlotsUnavailable, DataError) as err:
        png.unlink(missing_ok=True)  # an older picture would pass for this run's
        found, note = None, f"plot skipped: {err}"
    return {"token_efficiency": token_efficiency(histories), "png": found, "note": note}


def token_efficiency(histories: dict[str, list[dict]]) -> dict[str, dict]:
    """Each student's tokens to reach no_kd's final held-out perplexity, also as a fraction of no_kd's tokens.

    Read from the evaluations during training, no_kd's own last one included, so that both sides
    are the same measurement (train.py's --eval_data). Empty without a no_kd run.
    """
    baseline = histories.get("no_kd")
    if not baseline or baseline[-1].get("tokens_seen") is None:
        return {}
    target, budget = baseline[-1]["perplexity"], baseline[-1]["tokens_seen"]
    result = {}
    for name, history in histories.items():
        reached = tokens_to_reach(history, target)
        tokens, exact = reached if reached is not None else (None, False)
        result[name] = {"target_perplexity": target, "budget_tokens": budget, "tokens": tokens,
                        "fraction": None if tokens is None else tokens / budget,
                        "upper_bound": tokens is not None and not exact}
    return result


def tokens_to_reach(history: list[dict], target: float) -> tuple[float, bool] | None:
    """Tokens seen when the held-out perplexity first got down to `target`, and whether that is exact.

    Between the last evaluation above the target and the first at or below it, log perplexity (the
    mean NLL) is taken as linear in tokens. Reached by the first evaluation: nothing earlier is known,
    so its tokens are an upper bound (exact False). Never reached, or a history without tokens_seen: None.
    """
    before = None
    for record in history:
        tokens, ppl = record.get("tokens_seen"), record["perplexity"]
        if tokens is None:
            return None
        if ppl <= target:
            if before is None:
                return tokens, False
            t0, p0 = before
            share = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(ppl))
            return t0 + share * (tokens - t0), True
        before = (tokens, ppl)
    return None


def efficiency_cell(efficiency: dict | None) -> str:
    if efficiency is None:
        return "–"
    if efficiency["fraction"] is None:
        return "not reached"
    return f"{'≤ ' if efficiency['upper_bound'] else ''}{efficiency['fraction']:.2f}"


def report_markdown(result: dict, table: str) -> str:
    """results-TAG.md: the title, the table, the notes, and the students' curves (or why there are none)."""
    curves = (f"![the students' loss terms and held-out perplexity against tokens seen]"
              f"({Path(result['curves']).name})" if result["curves"] else f"Training curves: {result['curves_note']}.")
    return f"{result['title']}\n\n{table}\n\n{result['notes']}\n\n{curves}\n"


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def copy_report(result: dict, out: Path, report: Path, stem: Path) -> None:
    """Small files only (no weights): results, logs, metrics and tensorboard events."""
    report.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        shutil.copy2(f"{stem}{suffix}", report / f"{stem.name}{suffix}")
    if result["curves"]:
        shutil.copy2(REPO / result["curves"], report / Path(result["curves"]).name)  # beside the .md that shows it
    shutil.copytree(out / "logs", report / "logs", dirs_exist_ok=True)
    for name, r in result["runs"].items():
        folder = REPO / r["path"] if not Path(r["path"]).is_absolute() else Path(r["path"])
        for item in ("log", "metrics.jsonl", "parameters.json", "eval_results.json", plots.PLOT_FILE):
            src = folder / item
            if src.is_dir():
                shutil.copytree(src, report / name / item, dirs_exist_ok=True)
            elif src.is_file():
                (report / name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, report / name / item)
    print(f"[quality] report copied to {report}")


if __name__ == "__main__":
    sys.exit(main())
