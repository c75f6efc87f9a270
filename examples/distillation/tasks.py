"""Multiple-choice task accuracy by log-likelihood: the library behind evaluate.py --task and the
trainer's --eval_tasks.

A task is a JSON-lines file (one JSON object per line, as JGLUE releases its sets) and a task
definition (TaskDef, a small JSON file; the built-in ones are in task_defs/): a prompt template
over the record's fields, the choices (templates, or the name of a list field), the field holding
the answer and, where the answer is a word rather than an index, its values in choice order.

Each item is scored as lm-evaluation-harness scores `output_type: multiple_choice`: for every
choice, the summed log-probability of the choice's tokens after the context
(few-shot examples + the prompt), under the model; the prediction is the choice with the highest.

    acc       share of items whose highest-scoring choice is the answer
    acc_norm  the same with each choice's log-likelihood divided by its length in characters (the
              choice string as the task writes it, before lowercasing), lm-eval's acc_norm
    stderr    the sample standard error of the mean, sqrt(acc (1 - acc) / (n - 1)) (lm-eval's)
    chance    the mean over the items of 1 / (number of choices): uniform guessing

Tokenization is the training data's (binarize.py, distil_ja.tokenization): each line of the text
normalized (NFKC + lowercase) and encoded separately, the ids concatenated, `<s>` in front. The
context and context + choice are encoded separately; the choice's tokens are those of the second
after the length of the first (lm-eval's split, so a piece that spans the boundary counts to the
choice). No `</s>` is scored: lm-eval's convention, and a choice is not the end of a document in
general. A sequence longer than the model's context is cut on the left, as lm-eval does. A choice
whose characters the vocabulary lacks, after a context ending in such characters, merges with them
into one `<unk>` and adds no token: it is scored as the last token of context + choice (counted in
`merged_choices` and logged; lm-eval would score an empty continuation).
"""

import contextlib
import json
import logging
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from distil_ja.cli import DataError, UsageError
from models import max_positions

logger = logging.getLogger("distillation.evaluate")

TASK_DEFS = Path(__file__).resolve().parent / "task_defs"
DEFAULT_FEWSHOT_SEED = 1234
_DEF_KEYS = {"name", "version", "description", "prompt", "choices", "label", "label_values", "id",
             "target_delimiter", "fewshot_delimiter"}


# ---- task definitions -----------------------------------------------------------------


def template_fields(template: str, where: str) -> list[str]:
    """The field names a template uses; plain `{name}` only (no attributes, indexes or formats)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UsageError(f"{where}: bad template {template!r} ({err}); write a literal brace as {{{{ or }}}}") from err
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise UsageError(f"{where}: template {template!r} may only use plain fields like {{question}}, "
                             f"got {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
        names.append(name)
    return names


@dataclass(frozen=True)
class TaskDef:
    """A multiple-choice task over JSON lines. `prompt_id` (name-vVERSION) is recorded with every result,
    so a number says which prompt produced it; change `version` whenever the prompt changes."""

    name: str
    version: int
    prompt: str  # template over the record's fields: the context the choices continue
    choices: tuple[str, ...] | str  # templates (fixed words have no field), or the name of a list field
    label: str  # field holding the answer
    label_values: tuple | None = None  # the answer's values in choice order; None: the answer is the index
    id: str | None = None  # field naming the item in per-item output
    target_delimiter: str = ""  # between the context and a choice (Japanese: nothing)
    fewshot_delimiter: str = "\n"  # between examples (a line break: a new line, as in the training text)
    description: str = ""
    source: str = ""  # where the definition was read from

    @property
    def prompt_id(self) -> str:
        return f"{self.name}-v{self.version}"

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "version", "description", "prompt", "label", "id",
                                             "target_delimiter", "fewshot_delimiter")}
        out["choices"] = list(self.choices) if isinstance(self.choices, tuple) else self.choices
        out["label_values"] = None if self.label_values is None else list(self.label_values)
        return out


def parse_task_def(raw, where: str) -> TaskDef:
    """A TaskDef from a definition's JSON object, checked (UsageError naming `where`)."""
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a task definition is a JSON object")
    unknown = sorted(set(raw) - _DEF_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; a task definition has {', '.join(sorted(_DEF_KEYS))}")
    for key in ("name", "version", "prompt", "choices", "label"):
        if key not in raw:
            raise UsageError(f"{where}: no {key!r}")
    if not isinstance(raw["name"], str) or not raw["name"] or not isinstance(raw["version"], int):
        raise UsageError(f"{where}: 'name' must be a non-empty string and 'version' an integer")
    for key in ("prompt", "label", "target_delimiter", "fewshot_delimiter", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise UsageError(f"{where}: {key!r} must be a string")
    template_fields(raw["prompt"], where)
    choices = raw["choices"]
    if isinstance(choices, list):
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UsageError(f"{where}: 'choices' must be at least two templates (strings), or one field name")
        for c in choices:
            template_fields(c, where)
        choices = tuple(choices)
    elif not isinstance(choices, str) or not choices.isidentifier():
        raise UsageError(f"{where}: 'choices' must be a list of templates or the name of a list field")
    label_values = raw.get("label_values")
    if label_values is not None:
        if not isinstance(label_values, list) or len(set(map(json.dumps, label_values))) != len(label_values):
            raise UsageError(f"{where}: 'label_values' must be a list of distinct values")
        if isinstance(choices, tuple) and len(label_values) != len(choices):
            raise UsageError(f"{where}: {len(label_values)} label_values for {len(choices)} choices")
        label_values = tuple(label_values)
    return TaskDef(name=raw["name"], version=raw["version"], prompt=raw["prompt"], choices=choices,
                   label=raw["label"], label_values=label_values, id=raw.get("id"),
                   target_delimiter=raw.get("target_delimiter", ""), fewshot_delimiter=raw.get("fewshot_delimiter", "\n"),
                   description=raw.get("description", ""), source=where)


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DEFS.glob("*.json"))


def load_task_def(name_or_path) -> TaskDef:
    """A built-in task by name (task_defs/NAME.json) or a definition file."""
    path = Path(name_or_path)
    if not path.suffix and (TASK_DEFS / f"{name_or_path}.json").is_file():
        path = TASK_DEFS / f"{name_or_path}.json"
    if not path.is_file():
        raise UsageError(f"task {str(name_or_path)!r} is neither a built-in task ({', '.join(builtin_tasks())}) "
                         "nor a task definition file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a readable JSON task definition ({err})") from err
    return parse_task_def(raw, str(path))


# ---- items ---------------------------------------------------------------------------


@dataclass
class Item:
    """One question: the prompt rendered, its choices, the answer's index, where it was read."""

    line: int
    id: object
    prompt: str
    choices: list[str]
    label: int


def render(template: str, record: dict, where: str) -> str:
    values = {}
    for name in template_fields(template, where):
        if name not in record:
            raise DataError(f"{where}: no field {name!r}")
        value = record[name]
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"{where}: field {name!r} is not text or a number")
        values[name] = value
    return template.format_map(values)


def parse_item(task: TaskDef, record, where: str, line: int) -> Item:
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object")
    if isinstance(task.choices, str):
        choices = record.get(task.choices)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field {task.choices!r} must be a list of at least two strings")
    else:
        choices = [render(c, record, where) for c in task.choices]
    if task.label not in record:
        raise DataError(f"{where}: no field {task.label!r}")
    answer = record[task.label]
    if task.label_values is not None:
        if answer not in task.label_values:
            raise DataError(f"{where}: {task.label} {answer!r} is not one of {list(task.label_values)}")
        label = task.label_values.index(answer)
    else:
        if isinstance(answer, str) and answer.isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise DataError(f"{where}: {task.label} {answer!r} is not a choice index")
        label = answer
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: {task.label} {answer!r} is beyond the {len(choices)} choices")
    if any(not c for c in choices):
        raise DataError(f"{where}: an empty choice")
    item_id = record.get(task.id, line) if task.id else line
    return Item(line=line, id=item_id, prompt=render(task.prompt, record, where), choices=choices, label=label)


def read_items(task: TaskDef, path) -> list[Item]:
    """The items of a JSON-lines file (blank lines skipped). A malformed line: DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from err
                items.append(parse_item(task, record, where, number))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    if not items:
        raise DataError(f"{path}: no items")
    return items


# ---- few-shot contexts -----------------------------------------------------------------


def fewshot_indices(index: int, pool_size: int, k: int, seed: int, exclude_self: bool) -> list[int]:
    """The k examples of item `index`: drawn without replacement from the pool by a generator seeded
    with (seed, index), so an item's examples depend on nothing else (not the order, batching or ranks)."""
    pool = np.arange(pool_size)
    if exclude_self:
        pool = np.delete(pool, index)
    if k > len(pool):
        raise UsageError(f"--num_fewshot {k} but the few-shot file has only {len(pool)} usable example(s)")
    return [int(i) for i in np.random.default_rng([seed, index]).choice(pool, size=k, replace=False)]


def contexts(task: TaskDef, items: list[Item], shots: list[Item] | None = None, k: int = 0,
             seed: int = DEFAULT_FEWSHOT_SEED, exclude_self: bool = False) -> list[str]:
    """Each item's context: k solved examples (prompt, delimiter, answer), then its prompt."""
    if k == 0:
        return [item.prompt for item in items]
    out = []
    for index, item in enumerate(items):
        examples = [shots[j] for j in fewshot_indices(index, len(shots), k, seed, exclude_self)]
        solved = [e.prompt + task.target_delimiter + e.choices[e.label] for e in examples]
        out.append(task.fewshot_delimiter.join(solved + [item.prompt]))
    return out


# ---- requests ------------------------------------------------------------------------


def encode(encoder, text: str) -> list[int]:
    """`<s>` + the text as the training data holds it: each line normalized and encoded separately."""
    return [encoder.bos_id] + list(encoder.encode_lines(text.split("\n")))


@dataclass
class TaskData:
    """A task read and tokenized once (evaluated many times during training): per item, per choice,
    the token ids (context + choice) and how many of them are the choice's."""

    task: TaskDef
    path: str
    items: list[Item]
    requests: list[list[tuple[np.ndarray, int]]]
    num_fewshot: int = 0
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    fewshot_path: str | None = None
    max_id: int = 0  # the highest token id: checked against each model's vocabulary
    merged_choices: int = 0  # choices that merged into the context's last token (scored as that token)

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / len(item.choices) for item in self.items]))


def prepare_task(task: TaskDef, path, encoder, num_fewshot: int = 0, fewshot_path=None,
                 fewshot_seed: int = DEFAULT_FEWSHOT_SEED) -> TaskData:
    """Read `path`, build each item's context (with `num_fewshot` examples from `fewshot_path`) and tokenize."""
    if num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot > 0 and fewshot_path is None:
        raise UsageError("--num_fewshot needs --fewshot_data (a file to draw the examples from, e.g. JGLUE's train)")
    items = read_items(task, path)
    shots, exclude_self = None, False
    if num_fewshot > 0:
        shots = read_items(task, fewshot_path)
        exclude_self = Path(fewshot_path).resolve() == Path(path).resolve()
    requests, max_id, merged = [], 0, 0
    for item, context in zip(items, contexts(task, items, shots, num_fewshot, fewshot_seed, exclude_self)):
        context_ids = encode(encoder, context)
        per_choice = []
        for choice in item.choices:
            whole = encode(encoder, context + task.target_delimiter + choice)
            continuation = whole[len(context_ids):]
            if continuation:
                per_choice.append((np.asarray(context_ids + continuation, dtype=np.int64), len(continuation)))
            else:  # the choice merged into the context's last token: characters the vocabulary lacks (<unk>)
                per_choice.append((np.asarray(whole, dtype=np.int64), 1))  # scored as that last token
                merged += 1
            max_id = max(max_id, int(per_choice[-1][0].max()))
        requests.append(per_choice)
    logger.info("%s (%s): %d items from %s, %d-shot", task.name, task.prompt_id, len(items), path, num_fewshot)
    if merged:
        logger.warning("%s: %d choice(s) add no token of their own: their characters, unknown to the vocabulary, "
                       "merge with the context's last ones into one <unk>, scored as that token (the same "
                       "log-likelihood for every such choice of an item); a tokenizer that covers the task avoids it",
                       path, merged)
    return TaskData(task, str(path), items, requests, num_fewshot, fewshot_seed,
                    None if fewshot_path is None else str(fewshot_path), max_id, merged)


# ---- scoring -------------------------------------------------------------------------


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[np.ndarray, int]], batch_size: int = 16, device=None, amp_dtype=None,
                   progress: bool = False, pad_id: int = 0, desc: str = "Scoring") -> np.ndarray:
    """Σ log p(continuation token | everything before it) for each (ids, n_continuation), in float64.

    Longest first in batches (right-padded: causal attention keeps padding out of real positions);
    the log-softmax is taken in float32 over the continuation positions only.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    limit = max_positions(model.config)
    inputs = []
    for ids, n in requests:
        if limit is not None and len(ids) > limit + 1:
            if n > limit:
                raise UsageError(f"a choice of {n} tokens does not fit the model's context of {limit}")
            ids = ids[-(limit + 1):]  # cut on the left: the choice and as much context as fits
        inputs.append((ids, n))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    out = np.zeros(len(inputs), dtype=np.float64)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            width = max(len(inputs[i][0]) for i in batch) - 1
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            rows, cols, targets = [], [], []
            for row, i in enumerate(batch):
                ids, n = inputs[i]
                x[row, : len(ids) - 1] = torch.as_tensor(ids[:-1])
                positions = range(len(ids) - 1 - n, len(ids) - 1)  # logit j predicts token j + 1
                rows += [row] * n
                cols += positions
                targets += ids[len(ids) - n :].tolist()
            with autocast:
                logits = model(input_ids=x.to(device), use_cache=False).logits
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
            logp = picked.log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(rows, device=device), logp.double())
            out[batch] = sums.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def score_items(model, data: TaskData, indices=None, **kwargs) -> list[dict]:
    """Per item (all, or those of `indices`): its choices' log-likelihoods and the two predictions."""
    indices = range(len(data.items)) if indices is None else indices
    flat = [(i, r) for i in indices for r in data.requests[i]]
    lls = loglikelihoods(model, [r for _, r in flat], desc=data.task.name, **kwargs)
    out, at = [], 0
    for i in indices:
        item = data.items[i]
        ll = lls[at : at + len(item.choices)]
        at += len(item.choices)
        per_char = ll / np.array([len(c) for c in item.choices], dtype=np.float64)
        out.append({"index": i, "id": item.id, "label": item.label, "loglikelihoods": ll.tolist(),
                    "pred": int(np.argmax(ll)), "pred_norm": int(np.argmax(per_char))})
    return out


def stderr(p: float, n: int) -> float:
    """Sample standard error of a mean of n 0/1 outcomes with mean p: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else float("nan")


def summarize(data: TaskData, n: int, correct: float, correct_norm: float, chance_sum: float) -> dict:
    acc, acc_norm = correct / n, correct_norm / n
    return {"task": data.task.name, "prompt_id": data.task.prompt_id, "num_fewshot": data.num_fewshot,
            "fewshot_seed": data.fewshot_seed if data.num_fewshot else None, "n": n,
            "acc": acc, "acc_stderr": stderr(acc, n), "acc_norm": acc_norm, "acc_norm_stderr": stderr(acc_norm, n),
            "chance": chance_sum / n, "merged_choices": data.merged_choices}


def counts(data: TaskData, scored: list[dict]) -> list[float]:
    """(items, correct, correct by acc_norm, Σ 1 / choices): what ranks add up."""
    return [len(scored), sum(s["pred"] == s["label"] for s in scored),
            sum(s["pred_norm"] == s["label"] for s in scored),
            math.fsum(1.0 / len(data.items[s["index"]].choices) for s in scored)]


def evaluate_task(model, data: TaskData, **kwargs) -> tuple[dict, list[dict]]:
    """(summary, per-item results) of one model on one task."""
    scored = score_items(model, data, **kwargs)
    return summarize(data, *counts(data, scored)), scored


def shared_task_scores(model, data: TaskData, rank: int = 0, world_size: int = 1, **kwargs) -> dict:
    """The summary of evaluate_task with the items shared between the ranks of a process group
    (every rank must call it); each rank gets the totals over all items."""
    scored = score_items(model, data, range(rank, len(data.items), world_size), **kwargs)
    totals = counts(data, scored)
    if world_size > 1:
        device = kwargs.get("device") or next(model.parameters()).device
        reduced = torch.tensor(totals, dtype=torch.float64, device=device)
        dist.all_reduce(reduced)
        totals = reduced.tolist()
        totals[:3] = [int(round(v)) for v in totals[:3]]
    return summarize(data, *totals)
