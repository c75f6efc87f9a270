"""bench/lm_eval_check.py: the task written again as lm-eval's Jinja templates renders what tasks.py scores,
and the item-by-item comparison notices a difference. (The run against lm_eval itself: bench/RESULTS.md.)"""

import json

import jinja2
import pytest

import tasks
from helpers import load_script
from task_files import JCQA, JNLI

check = load_script("bench/lm_eval_check.py")


def render(template: str, doc: dict):
    """As lm-eval renders a task's templates: Jinja over the document's fields, undefined names an error."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(**doc)


@pytest.mark.parametrize("name, records", [("jcommonsenseqa", JCQA), ("jnli", JNLI)])
def test_the_lm_eval_task_renders_the_same_prompt_choices_and_answer(tmp_path, name, records):
    task = tasks.load_task_def(name)
    config = check.lm_eval_config(task, tmp_path / "data.jsonl", f"distil_ja_{name}")
    assert config["output_type"] == "multiple_choice" and config["target_delimiter"] == task.target_delimiter
    for record in records:
        item = tasks.parse_item(task, record, "test", 1)
        assert render(config["doc_to_text"], record) == item.prompt
        assert render(config["doc_to_choice"], record) == str(item.choices)
        assert int(render(config["doc_to_target"], record)) == item.label


def test_literal_braces_and_mixed_choice_templates_survive(tmp_path):
    task = tasks.parse_task_def({"name": "t", "version": 1, "prompt": "{{注}} {q}\n答え:", "label": "l",
                                 "choices": ["({a})", "b"], "label_values": ["x", "y"]}, "test")
    config = check.lm_eval_config(task, tmp_path / "d.jsonl", "t")
    doc = {"q": "雨？", "a": "傘", "l": "y"}
    assert render(config["doc_to_text"], doc) == "{注} 雨？\n答え:" == tasks.parse_item(task, doc, "t", 1).prompt
    assert render(config["doc_to_choice"], doc) == str(["(傘)", "b"])
    assert render(config["doc_to_target"], doc) == "1"


def test_the_comparison_notices_a_changed_prediction_or_likelihood():
    ours = [{"id": 1, "label": 0, "loglikelihoods": [-1.0, -2.0], "pred": 0, "pred_norm": 0}]
    theirs = [{"doc_id": 0, "acc": 1.0, "acc_norm": 1.0, "filtered_resps": [["-1.0", "False"], ["-2.0", "False"]]}]
    assert check.compare(ours, theirs, 1e-4)["equal"]
    shifted = [{**theirs[0], "filtered_resps": [["-1.001", "False"], ["-2.0", "False"]]}]
    assert not check.compare(ours, shifted, 1e-4)["equal"]
    flipped = [{**theirs[0], "acc": 0.0, "filtered_resps": [["-3.0", "False"], ["-2.0", "False"]]}]
    assert check.compare(ours, flipped, 10.0)["items_pred_differs"] == [1]
    summary = {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": 1.0, "acc_norm_stderr": 0.0}
    theirs_summary = {"acc,none": 1.0, "acc_stderr,none": 0.0, "acc_norm,none": 1.0, "acc_norm_stderr,none": 0.1}
    assert check.compare(ours, theirs, 1e-4, summary, theirs_summary)["metrics_differ"] == ["acc_norm_stderr"]
