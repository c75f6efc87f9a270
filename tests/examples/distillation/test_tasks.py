"""tasks.py and evaluate.py --task: choice log-likelihoods against a hand computation (float64, one
unpadded forward, ids from the transformers tokenizer), JGLUE's file format, few-shot draws fixed by
seed, task definitions, malformed lines, the scores shared between ranks, and --eval_tasks in training."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import plots
import tasks
from distil_ja.cli import DataError, UsageError
from distil_ja.tokenization import load_tokenizer, normalize_text
from helpers import REPO, gpt2_config, read_scalars, torchrun, train_args
from perplexity import load_encoder
from task_files import JCQA, JNLI, write_jsonl

WORKER = REPO / "tests" / "examples" / "distillation" / "tasks_worker.py"


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(5)
    return GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32, n_positions=64)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return {"jcqa": write_jsonl(folder / "valid-v1.3.json", JCQA), "jnli": write_jsonl(folder / "jnli.json", JNLI),
            "jcqa_train": write_jsonl(folder / "train-v1.3.json", JCQA[::-1] + JCQA[:2])}


def hand_ids(hf_tok, text: str) -> list[int]:
    """<s> + each line lowercased/NFKC'd and encoded alone by the transformers tokenizer (binarize.py's rule)."""
    return [1] + [i for line in text.split("\n")
                  for i in hf_tok(normalize_text(line), add_special_tokens=False)["input_ids"]]


def hand_loglikelihood(model, hf_tok, context: str, choice: str) -> float:
    """log p(choice | context) in float64 from one forward pass over exactly context + choice."""
    ctx = hand_ids(hf_tok, context)
    whole = hand_ids(hf_tok, context + choice)
    ids = ctx + whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


def test_jglue_files_are_read_with_their_own_field_names(files):
    jcqa = tasks.read_items(tasks.load_task_def("jcommonsenseqa"), files["jcqa"])
    assert [i.id for i in jcqa] == [r["q_id"] for r in JCQA] and [i.label for i in jcqa] == [0, 1, 2, 3, 4, 0]
    assert jcqa[0].prompt == "質問:電車の中で何を読む？\n答え:" and jcqa[0].choices == ["本", "雨", "桜", "駅ビル", "味噌汁"]
    jnli = tasks.read_items(tasks.load_task_def("jnli"), files["jnli"])
    assert [i.id for i in jnli] == ["0", "1", "2"]
    assert [i.choices[i.label] for i in jnli] == ["中立", "含意", "矛盾"]  # neutral, entailment, contradiction
    assert jnli[0].prompt == "前提:駅まで傘をさして歩いた。\n仮説:雨が降っていた。\n関係:"


def test_scores_equal_log_likelihoods_computed_by_hand(model, files, tiny_tokenizer):
    task = tasks.load_task_def("jcommonsenseqa")
    data = tasks.prepare_task(task, files["jcqa"], load_encoder(str(tiny_tokenizer)))
    summary, items = tasks.evaluate_task(model, data, batch_size=4, pad_id=3)  # 30 choices, padded batches
    hf_tok = load_tokenizer(str(tiny_tokenizer))
    correct = correct_norm = 0
    for record, item in zip(JCQA, items):
        choices = [record[f"choice{k}"] for k in range(5)]
        hand = [hand_loglikelihood(model, hf_tok, f"質問:{record['question']}\n答え:", c) for c in choices]
        np.testing.assert_allclose(item["loglikelihoods"], hand, rtol=0, atol=1e-5)
        assert item["pred"] == int(np.argmax(hand)) and item["label"] == record["label"]
        assert item["pred_norm"] == int(np.argmax([ll / len(c) for ll, c in zip(hand, choices)]))
        correct += int(np.argmax(hand)) == record["label"]
        correct_norm += item["pred_norm"] == record["label"]
    n = len(JCQA)
    assert summary["n"] == n and summary["chance"] == pytest.approx(0.2)
    assert summary["acc"] == correct / n and summary["acc_norm"] == correct_norm / n
    p = correct / n
    assert summary["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert summary["prompt_id"] == "jcommonsenseqa-v1" and summary["num_fewshot"] == 0


def test_acc_norm_divides_by_the_characters_of_the_choice(tmp_path, tiny_tokenizer, monkeypatch):
    """lm-eval's acc_norm: per character of the choice string, not per token."""
    rows = [{"q": "雨が降っていた。", "a": "傘", "b": "昆布と鰹節", "label": 1}]
    # each choice on a line of its own: its tokens are "▁" + one a character, so tokens ≠ characters
    definition = tasks.parse_task_def({"name": "t", "version": 1, "prompt": "{q}\n", "choices": ["{a}", "{b}"],
                                       "label": "label"}, "test")
    data = tasks.prepare_task(definition, write_jsonl(tmp_path / "t.jsonl", rows), load_encoder(str(tiny_tokenizer)))
    lls = np.array([-2.0, -9.0])  # per character: -2 against -1.8
    tokens = [n for _, n in data.requests[0]]
    assert tokens == [2, 6]
    assert int(np.argmax(lls / tokens)) == 0  # per token the other choice would win: the test can fail
    monkeypatch.setattr(tasks, "loglikelihoods", lambda model, requests, **kwargs: lls)
    summary, items = tasks.evaluate_task(None, data)
    assert items[0]["pred"] == 0 and items[0]["pred_norm"] == 1
    assert summary["acc"] == 0.0 and summary["acc_norm"] == 1.0


def test_a_choice_merged_into_an_unknown_context_end_is_scored_as_that_token(model, files, tiny_tokenizer):
    """The tiny vocabulary lacks 関係:含意 矛盾: after 関係: they add no token of their own (one <unk> run)."""
    data = tasks.prepare_task(tasks.load_task_def("jnli"), files["jnli"], load_encoder(str(tiny_tokenizer)))
    summary, items = tasks.evaluate_task(model, data, batch_size=4)
    hf_tok = load_tokenizer(str(tiny_tokenizer))
    merged = 0
    for record, item in zip(JNLI, items):
        context = f"前提:{record['sentence1']}\n仮説:{record['sentence2']}\n関係:"
        for choice, ll in zip(["含意", "矛盾", "中立"], item["loglikelihoods"]):
            ctx, whole = hand_ids(hf_tok, context), hand_ids(hf_tok, context + choice)
            if len(whole) > len(ctx):
                assert ll == pytest.approx(hand_loglikelihood(model, hf_tok, context, choice), abs=1e-5)
                continue
            merged += 1
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            assert ll == pytest.approx(logp[-2, whole[-1]].item(), abs=1e-5)
    assert merged > 0 and summary["merged_choices"] == data.merged_choices == merged


def test_a_context_longer_than_the_model_is_cut_on_the_left(model, tiny_tokenizer):
    ids = np.asarray([1] + list(range(7, 100)) + [113], dtype=np.int64)  # 95 tokens, the model takes 64
    ll = tasks.loglikelihoods(model, [(ids, 2)])[0]
    kept = torch.tensor(ids[-65:-1])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(kept).logits[0].double(), -1)
    assert ll == pytest.approx(logp[-2, int(ids[-2])].item() + logp[-1, int(ids[-1])].item(), abs=1e-5)


def test_bf16_autocast_is_close(model, files, tiny_tokenizer):
    data = tasks.prepare_task(tasks.load_task_def("jcommonsenseqa"), files["jcqa"], load_encoder(str(tiny_tokenizer)))
    fp32 = tasks.score_items(model, data, batch_size=8)
    bf16 = tasks.score_items(model, data, batch_size=8, amp_dtype=torch.bfloat16)
    for a, b in zip(fp32, bf16):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=0.03)


def test_few_shot_examples_are_fixed_by_the_seed_and_the_item(files):
    task = tasks.load_task_def("jcommonsenseqa")
    items = tasks.read_items(task, files["jcqa"])
    shots = tasks.read_items(task, files["jcqa_train"])
    first = tasks.contexts(task, items, shots, k=2, seed=7)
    assert first == tasks.contexts(task, items, shots, k=2, seed=7)
    assert first != tasks.contexts(task, items, shots, k=2, seed=8)
    # an item's examples depend on its index and the seed only: not on the other items
    assert tasks.contexts(task, items[:3], shots, k=2, seed=7) == first[:3]
    drawn = tasks.fewshot_indices(4, len(shots), 2, 7, exclude_self=False)
    assert drawn == [int(i) for i in np.random.default_rng([7, 4]).choice(len(shots), 2, replace=False)]
    solved = [f"{shots[j].prompt}{shots[j].choices[shots[j].label]}" for j in drawn]
    assert first[4] == "\n".join(solved + [items[4].prompt])
    # drawing from the evaluated file itself never shows an item its own answer
    for index in range(len(items)):
        assert index not in tasks.fewshot_indices(index, len(items), 5, 7, exclude_self=True)
    with pytest.raises(UsageError, match="only 5 usable"):
        tasks.fewshot_indices(0, len(items), 6, 7, exclude_self=True)


def test_a_task_definition_describes_any_multiple_choice_file(model, tmp_path, tiny_tokenizer):
    """A MARC-ja-like set with its choices in a list field and word labels, through --task_def only."""
    definition = {"name": "mine", "version": 3, "prompt": "{sentence}\n答え:", "choices": "options",
                  "label": "answer", "label_values": ["a", "b"], "id": "key"}
    def_file = tmp_path / "mine.json"
    def_file.write_text(json.dumps(definition))
    rows = [{"key": "x", "sentence": "雨が降っていた。", "options": ["傘", "本"], "answer": "a"},
            {"key": "y", "sentence": "本を読んだ。", "options": ["寺", "電車", "本屋"], "answer": "b"}]
    data_file = write_jsonl(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "mine-out.json"
    assert evaluate.main(["--model", str(tmp_path / "missing"), "--task_def", str(def_file),
                          "--task_data", str(data_file), "--tokenizer", str(tiny_tokenizer), "--device", "cpu",
                          "--json", str(out)]) == 2  # no such model: refused before anything is scored
    model.save_pretrained(tmp_path / "m")
    assert evaluate.main(["--model", f"m={tmp_path / 'm'}", "--task_def", str(def_file), "--task_data", str(data_file),
                          "--tokenizer", str(tiny_tokenizer), "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"]["prompt_id"] == "mine-v3" and result["task"]["results"]["m"]["chance"] == pytest.approx(
        (1 / 2 + 1 / 3) / 2)
    assert [i["id"] for i in result["task"]["items"]["m"]] == ["x", "y"]
    assert [len(i["loglikelihoods"]) for i in result["task"]["items"]["m"]] == [2, 3]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({**JCQA[0], "label": 5}), "line 2: label 5 is beyond the 5 choices"),
    (json.dumps({k: v for k, v in JCQA[0].items() if k != "choice3"}), "line 2: no field 'choice3'"),
    (json.dumps([1, 2]), "line 2: not a JSON object"),
])
def test_a_malformed_line_is_one_error_naming_the_file_and_line(tmp_path, tiny_setup, capsys, line, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(JCQA[0], ensure_ascii=False) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        tasks.read_items(tasks.load_task_def("jcommonsenseqa"), bad)
    assert evaluate.main(["--model", str(tiny_setup["teacher"]), "--tokenizer", str(tiny_setup["tokenizer"]),
                          "--task", "jcommonsenseqa", "--task_data", str(bad), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}, {message}" in err and err.count("error:") == 1 and "Traceback" not in err


def test_a_jnli_label_outside_its_words_is_refused(tmp_path):
    bad = write_jsonl(tmp_path / "jnli.json", [JNLI[0], {**JNLI[1], "label": "entails"}])
    with pytest.raises(DataError, match=r"jnli.json, line 2: label 'entails' is not one of \['entailment'"):
        tasks.read_items(tasks.load_task_def("jnli"), bad)


@pytest.mark.parametrize("extra, message", [
    (["--task", "jglue_nope", "--task_data", "x.json"], "neither a built-in task (jcommonsenseqa, jnli)"),
    (["--task", "jnli"], "--task jnli needs --task_data"),
    (["--num_fewshot", "2", "--task", "jnli", "--task_data", "x.json"], "--num_fewshot needs --fewshot_data"),
    ([], "nothing to evaluate"),
])
def test_bad_task_arguments_exit_2_in_one_line(tiny_setup, capsys, extra, message):
    args = ["--model", str(tiny_setup["teacher"]), "--tokenizer", str(tiny_setup["tokenizer"]), "--device", "cpu"]
    assert evaluate.main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


@pytest.mark.parametrize("definition, message", [
    ({"name": "t", "version": 1, "prompt": "{q.x}", "choices": ["a", "b"], "label": "l"}, "plain fields"),
    ({"name": "t", "version": 1, "prompt": "{q}", "choices": ["a", "b"], "label": "l", "lable_values": []},
     "unknown key(s) lable_values"),
    ({"name": "t", "version": 1, "prompt": "{q}", "choices": ["a", "b"], "label": "l", "label_values": ["x"]},
     "1 label_values for 2 choices"),
    ({"name": "t", "prompt": "{q}", "choices": ["a", "b"], "label": "l"}, "no 'version'"),
])
def test_a_bad_task_definition_is_refused(tmp_path, definition, message):
    path = tmp_path / "def.json"
    path.write_text(json.dumps(definition))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tasks.load_task_def(path)


def test_cli_scores_models_side_by_side(tiny_setup, files, tmp_path):
    from transformers import GPT2LMHeadModel

    other = tmp_path / "other"
    torch.manual_seed(2)
    GPT2LMHeadModel(gpt2_config(n_layer=1)).save_pretrained(other)
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "distillation" / "evaluate.py"), "--model",
         f"teacher={tiny_setup['teacher']}", "--model", f"small={other}", "--tokenizer", str(tiny_setup["tokenizer"]),
         "--task", "jcommonsenseqa", "--task_data", str(files["jcqa"]), "--num_fewshot", "1", "--fewshot_data",
         str(files["jcqa_train"]), "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "jcommonsenseqa (jcommonsenseqa-v1, 1-shot, 6 items, chance 0.2000)" in proc.stdout
    assert "teacher" in proc.stdout and "small" in proc.stdout and "acc_norm" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["task"]["results"]) == {"teacher", "small"} and "perplexity" not in result
    assert result["task"]["fewshot_seed"] == tasks.DEFAULT_FEWSHOT_SEED
    assert result["task"]["definition"]["prompt"] == "質問:{question}\n答え:"


@pytest.mark.slow
def test_two_gloo_processes_share_the_items_and_agree_with_one(tiny_setup, files, tmp_path, model):
    model.save_pretrained(tmp_path / "model")
    proc = torchrun(WORKER, [tmp_path / "model", tiny_setup["tokenizer"], files["jcqa"], tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    data = tasks.prepare_task(tasks.load_task_def("jcommonsenseqa"), files["jcqa"],
                              load_encoder(str(tiny_setup["tokenizer"])))
    alone, _ = tasks.evaluate_task(model, data, batch_size=4)
    assert shared[0]["scored_here"] + shared[1]["scored_here"] == len(JCQA)  # each rank scored its share only
    for out in shared:
        assert out["summary"] == pytest.approx(alone), out


def test_training_scores_the_student_on_the_tasks(tiny_setup, files, tmp_path):
    import train
    from transformers import AutoModelForCausalLM

    dump = tmp_path / "run"
    mine = tmp_path / "mine.json"  # a task of one's own: a definition file instead of a built-in name
    mine.write_text(json.dumps({"name": "mine", "version": 1, "prompt": "{question}", "label": "label",
                                "choices": ["{choice0}", "{choice1}", "{choice2}", "{choice3}", "{choice4}"]}))
    spec = f"jcommonsenseqa={files['jcqa']},{mine}={files['jcqa']}"
    train.run(train_args(tiny_setup, dump, "--eval_tasks", spec, "--eval_interval", "3"))
    results = json.loads((dump / "eval_results.json").read_text())
    assert [h["step"] for h in results["history"]] == [3, 6] and "perplexity" not in results
    data = tasks.prepare_task(tasks.load_task_def("jcommonsenseqa"), files["jcqa"],
                              load_encoder(str(tiny_setup["tokenizer"])))
    final, _ = tasks.evaluate_task(AutoModelForCausalLM.from_pretrained(dump), data)
    assert results["tasks"]["jcommonsenseqa"] == pytest.approx(final)
    assert set(results["tasks"]) == {"jcommonsenseqa", "mine"} and results["tasks"]["mine"]["prompt_id"] == "mine-v1"
    acc = read_scalars(dump / "log", "eval/jcommonsenseqa/acc")
    assert acc[-1] == pytest.approx(final["acc"]) and len(acc) == 2
    assert len(read_scalars(dump / "log", "eval/jcommonsenseqa/acc_norm")) == 2
    assert plots.panels([plots.Run(dump)])[-2:] == ["acc:jcommonsenseqa", "acc:mine"]  # drawn in curves.png
    assert plots.Run(dump).series("acc:mine", "step") == ([3, 6], [h["tasks"]["mine"]["acc"] for h in results["history"]])


@pytest.mark.slow
def test_train_py_under_two_gloo_processes_records_one_process_scores(tiny_setup, files, tmp_path):
    import train
    from helpers import torchrun_train

    # a near-uniform student always prefers the 1-token choice to the 5-token one, so accuracy is the share of
    # items answered 0 (3 of 6); a rank scoring the other's items instead of its own would count 2 or 4
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"name": "short", "version": 1, "prompt": "{question}", "label": "answer",
                                 "choices": ["本", "昆布と鰹節"]}))
    rows = [{"question": r["question"], "answer": a} for r, a in zip(JCQA, [0, 0, 0, 1, 1, 1])]
    spec = ["--eval_tasks", f"jcommonsenseqa={files['jcqa']},{short}={write_jsonl(tmp_path / 's.jsonl', rows)}",
            "--eval_interval", "3"]
    train.run(train_args(tiny_setup, tmp_path / "one", "--batch_size", "4", *spec))
    result = torchrun_train(train_args(tiny_setup, tmp_path / "two", "--batch_size", "2", *spec))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("one", "two"))
    assert [h["step"] for h in two["history"]] == [3, 6]
    for a, b in zip(one["history"], two["history"]):
        assert b["tasks"]["jcommonsenseqa"] == pytest.approx(a["tasks"]["jcommonsenseqa"])
        assert b["tasks"]["jcommonsenseqa"]["n"] == len(JCQA)  # every item once, over both ranks
        assert a["tasks"]["short"]["acc"] == 0.5 and b["tasks"]["short"] == pytest.approx(a["tasks"]["short"])


def test_the_plot_has_a_panel_per_task_with_the_chance_level(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"step": s, "tokens_seen": 100 * s, "tasks": {"jnli": {"acc": a, "chance": 1 / 3}}}
               for s, a in ((2, 0.30), (4, 0.40))]
    (tmp_path / "eval_results.json").write_text(json.dumps({**history[-1], "history": history}))
    fig = plots.figure([plots.Run(tmp_path)])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_title() == "jnli accuracy (dashed: chance)" and ax.get_yscale() == "linear"
    (chance_line,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    (run_line,) = [line for line in ax.get_lines() if line is not chance_line]
    assert list(run_line.get_ydata()) == [0.30, 0.40] and list(chance_line.get_ydata()) == [1 / 3, 1 / 3]
