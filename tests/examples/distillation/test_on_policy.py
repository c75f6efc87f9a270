"""On-policy distillation (--on_policy_fraction): sampling against a float64 inverse CDF, which steps sample,
batched KV-cache generation against a plain loop, training on the student's samples (the KD term only),
exact resume, and the refusals."""

import json

import numpy as np
import pytest
import torch

import distiller
import train
from distil_ja.cli import EXIT_USAGE
from helpers import assert_same_weights, chat_args, family_config, gpt2_config, torchrun_train, weights
from on_policy import (Sampling, end_of_turn_ids, generate, is_on_policy_step, prompts_of, row_uniforms,
                       sample_next)


# ---- sampling ---------------------------------------------------------------------------------------


def reference_pick(logits, u, temperature, top_p):
    """float64, one row: the nucleus of softmax(logits / T), renormalised, and the token where its CDF passes u."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    kept, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.append(token)
        mass += p[token]
    cdf = np.cumsum(p[kept]) / mass
    return kept[int(np.searchsorted(cdf, u, side="right"))]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.3)])
def test_sample_next_is_the_inverse_cdf_of_the_nucleus(temperature, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 11)) * 2
    u = rng.random(64)
    picked = sample_next(torch.tensor(logits, dtype=torch.float32), torch.tensor(u), Sampling(temperature, top_p))
    expected = [reference_pick(logits[i].astype(np.float32).astype(np.float64), u[i], temperature, top_p)
                for i in range(64)]
    assert picked.tolist() == expected


def test_sample_next_follows_the_distribution():
    """A grid of u over [0, 1) picks each token as often as its probability says (to 1/N)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 2000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = sample_next(logits.expand(n, 4), u, Sampling(1.0, 1.0))
    frequencies = torch.bincount(picks, minlength=4).double() / n
    torch.testing.assert_close(frequencies, torch.softmax(logits[0].double(), -1), atol=1 / n, rtol=0)


def test_which_steps_sample():
    assert not any(is_on_policy_step(0, s, 0.0) for s in range(100))
    assert all(is_on_policy_step(0, s, 1.0) for s in range(100))
    half = [is_on_policy_step(7, s, 0.5) for s in range(2000)]
    assert 0.45 < np.mean(half) < 0.55
    assert half == [is_on_policy_step(7, s, 0.5) for s in range(2000)]  # a function of (seed, step)
    assert half != [is_on_policy_step(8, s, 0.5) for s in range(2000)]


def test_row_draws_depend_on_the_prompt_and_step_only():
    a, b = torch.tensor([1, 5, 9]), torch.tensor([1, 5, 8])
    assert torch.equal(row_uniforms(a, 0, 3, 5), row_uniforms(a.clone(), 0, 3, 5))
    assert not torch.equal(row_uniforms(a, 0, 3, 5), row_uniforms(b, 0, 3, 5))
    assert not torch.equal(row_uniforms(a, 0, 3, 5), row_uniforms(a, 0, 4, 5))


def test_prompts_end_before_the_first_assistant_token():
    token_ids = torch.tensor([[1, 10, 11, 12, 13, 2], [1, 20, 21, 2, 3, 3]])
    counted = torch.zeros(2, 6, dtype=torch.bool)
    counted[0, [2, 3]] = True  # tokens 3 and 4 of row 0 are the assistant's
    prompts = prompts_of(token_ids, torch.tensor([6, 4]), counted)
    assert prompts[0].tolist() == [1, 10, 11] and prompts[1] is None


# ---- generation --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32)).eval()


def plain_loop(model, prompt, sampling, stops, budget, seed, step):
    """One row, no cache, no padding: the whole sequence through the model for every new token."""
    ids, u = prompt.clone(), row_uniforms(prompt, seed, step, budget)
    for t in range(budget):
        with torch.no_grad():
            logits = model(ids[None]).logits[0, -1]
        token = sample_next(logits[None].float(), u[t : t + 1], sampling)
        ids = torch.cat([ids, token])
        if int(token) in stops:
            break
    return ids


def test_batched_cached_generation_is_the_plain_loop(tiny_lm):
    prompts = [torch.tensor([1, 40, 41, 42, 43, 44, 45]), torch.tensor([1, 50]), None, torch.tensor([1, 60, 61, 62])]
    sampling, stops = Sampling(1.0, 0.9, max_new_tokens=12), {2, 77}
    token_ids, lengths, counted = generate(tiny_lm, prompts, sampling, stops, 64, 3, seed=5, step=2, device="cpu")
    assert lengths[2] == 0 and not counted[2].any()
    for row in (0, 1, 3):
        expected = plain_loop(tiny_lm, prompts[row], sampling, stops, 12, 5, 2)
        assert token_ids[row, : lengths[row]].tolist() == expected.tolist()
        assert (token_ids[row, lengths[row]:] == 3).all()
        p = len(prompts[row])
        assert torch.nonzero(counted[row]).flatten().tolist() == list(range(p - 1, int(lengths[row]) - 1))
        assert lengths[row] - p <= 12


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen2"])
def test_each_family_generates_as_its_plain_loop(family):
    """Left padding, position ids and the cache of rotary families too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).eval()
    prompts = [torch.tensor([1, 40, 41, 42, 43, 44]), torch.tensor([1, 50])]
    sampling = Sampling(1.0, 1.0, max_new_tokens=6)
    token_ids, lengths, _ = generate(model, prompts, sampling, set(), 64, 3, seed=1, step=0, device="cpu")
    for row, prompt in enumerate(prompts):
        assert token_ids[row, : lengths[row]].tolist() == plain_loop(model, prompt, sampling, set(), 6, 1, 0).tolist()


def test_generation_stops_at_the_context_and_at_a_stop_token(tiny_lm):
    prompt = torch.arange(1, 61)
    token_ids, lengths, _ = generate(tiny_lm, [prompt], Sampling(max_new_tokens=50), set(), 64, 3, 0, 0, "cpu")
    assert lengths.tolist() == [64]
    # every token a stop token: one new token, kept
    _, lengths, counted = generate(tiny_lm, [prompt[:5]], Sampling(), set(range(192)), 64, 3, 0, 0, "cpu")
    assert lengths.tolist() == [6] and counted[0].tolist()[:6] == [False] * 4 + [True, False]
    assert tiny_lm.training is False


def test_the_end_of_turn_is_where_sampling_stops(chat_setup):
    from lm_seqs_dataset import LmSeqsDataset, SpecialIds

    sequences = [s.copy() for s in chat_setup["sequences"]]
    for seq, mask in zip(sequences, chat_setup["masks"]):
        seq[np.flatnonzero(mask)[-1]] = 99  # every assistant span ends with the template's end-of-turn
    dataset = LmSeqsDataset(sequences, 64, SpecialIds(), loss_masks=chat_setup["masks"])
    assert end_of_turn_ids(dataset, 2) == {99, 2}


# ---- training ---------------------------------------------------------------------------------------


def on_policy_args(setup, dump, *extra):
    return chat_args(setup, dump, setup["data"], "--on_policy_fraction", "0.5", "--max_new_tokens", "8",
                     "--log_interval", "1", *extra)


def test_on_policy_steps_train_on_the_samples_and_log_their_time(chat_setup, tmp_path):
    dump = tmp_path / "run"
    assert train.main(on_policy_args(chat_setup, dump)) == 0
    lines = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    sampled = [is_on_policy_step(56, s, 0.5) for s in range(6)]  # train_args: --seed 56 (the default)
    assert [line.get("on_policy_steps", 0) for line in lines] == [int(x) for x in sampled]
    assert 0 < sum(sampled) < 6
    for line, on in zip(lines, sampled):
        assert ("generation_share" in line) == on and (0 < line["generation_share"] < 1 if on else True)
        assert (line["clm"] == 0) == on  # an on-policy step has no CLM term: only the KD term grades the answers
    off = tmp_path / "off"
    assert train.main(chat_args(chat_setup, off, chat_setup["data"], "--log_interval", "1")) == 0
    first_on = sampled.index(True)
    off_lines = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    assert lines[:first_on] == [{k: v for k, v in x.items()} for x in off_lines[:first_on]]  # until the first sample
    assert lines[first_on]["ce"] != off_lines[first_on]["ce"]


def test_an_on_policy_run_resumes_exactly(chat_setup, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert train.main(on_policy_args(chat_setup, whole)) == 0
    broken = tmp_path / "broken"

    def crash(point, step):
        if point == "after_step" and step == 4:  # after the checkpoint of step 3, one step later
            raise KeyboardInterrupt("crash")

    monkeypatch.setattr(distiller, "inject_fault", crash)
    assert train.main(on_policy_args(chat_setup, broken)) != 0
    monkeypatch.undo()
    assert train.main(on_policy_args(chat_setup, broken, "--resume")) == 0
    for key, value in weights(whole).items():
        assert torch.equal(value, weights(broken)[key]), key


@pytest.mark.parametrize("extra, said", [
    (("--on_policy_fraction", "1.5"), "--on_policy_fraction must be in [0, 1]"),
    (("--gen_top_p", "0"), "--gen_top_p must be in (0, 1]"),
    (("--gen_temperature", "0"), "--gen_temperature must be > 0"),
    (("--max_new_tokens", "0"), "--max_new_tokens must be >= 1"),
    (("--alpha_ce", "0", "--alpha_clm", "1"), "needs a teacher (--teacher_name) and the KD term"),
    (("--train_on_prompt",), "needs a chat corpus"),
])
def test_bad_on_policy_settings_give_one_line(chat_setup, tmp_path, capsys, extra, said):
    assert train.main(on_policy_args(chat_setup, tmp_path / "run", *extra)) == EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and said in errors[0], errors


def test_on_policy_needs_a_chat_corpus_and_a_teacher_model(offline_setup, offline_dump, tmp_path, capsys):
    args = chat_args(offline_setup, tmp_path / "plain", offline_setup["data"], "--on_policy_fraction", "1")
    assert train.main(args) == EXIT_USAGE
    assert "needs a chat corpus" in capsys.readouterr().err
    args = chat_args(offline_setup, tmp_path / "offline", offline_setup["data"], "--on_policy_fraction", "1",
                     offline=offline_dump)
    assert train.main(args) == EXIT_USAGE
    assert "--teacher_logits holds the teacher's rows of the corpus only" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_sample_and_train_as_one(chat_setup, tmp_path):
    """Each rank samples its own rows; the draws are the prompts' own, so 2 processes of 2 rows equal 1 of 4."""
    args = ("--max_steps", "3", "--on_policy_fraction", "1")
    train.run(on_policy_args(chat_setup, tmp_path / "one", *args))
    result = torchrun_train(on_policy_args(chat_setup, tmp_path / "two", *args, "--batch_size", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in
                ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
