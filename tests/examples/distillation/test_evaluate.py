"""evaluate.py: perplexity against a direct NLL sum, sliding windows, data loading, CLI, in-training eval."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import perplexity
from helpers import REPO, gpt2_config, random_sequences, write_shard

EVALUATE_PY = REPO / "examples" / "distillation" / "evaluate.py"
DEV_TEXT = REPO / "data_prep" / "sample" / "ja_dev.txt"


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    return GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32, n_positions=64)).eval()


def direct_nll(model, seq):
    """Sum of -log p(token | all previous tokens), one full forward pass."""
    ids = torch.as_tensor(np.asarray(seq, dtype=np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return -sum(logp[t - 1, int(seq[t])].item() for t in range(1, len(seq)))


def hf_strided_nll(model, seq, max_length, stride):
    """The Hugging Face docs' strided-perplexity recipe (labels = -100 outside the new tokens)."""
    ids = torch.as_tensor(np.asarray(seq, dtype=np.int64))[None]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        target_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss.double().item()
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
        prev_end = end
        if end == ids.size(1):
            break
    return total, count


def test_short_documents_match_the_direct_nll_sum(tiny_model):
    seqs = random_sequences(7, min_len=5, max_len=60, seed=3)
    out = perplexity.perplexity(tiny_model, seqs, max_length=64, stride=32, batch_size=3)
    expected = sum(direct_nll(tiny_model, s) for s in seqs)
    assert out["tokens"] == sum(len(s) - 1 for s in seqs)
    assert out["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(expected / out["tokens"]), rel=1e-5)


def test_a_document_longer_than_max_length_uses_a_sliding_window(tiny_model):
    long_doc = random_sequences(1, min_len=150, max_len=150, seed=4)[0]
    short = random_sequences(3, min_len=10, max_len=30, seed=5)
    out = perplexity.perplexity(tiny_model, [long_doc, *short], max_length=40, stride=16, batch_size=2)
    ref_long, n_long = hf_strided_nll(tiny_model, long_doc, 40, 16)
    assert n_long == 149
    assert out["tokens"] == 149 + sum(len(s) - 1 for s in short)
    assert out["nll_sum"] == pytest.approx(ref_long + sum(direct_nll(tiny_model, s) for s in short), rel=1e-5)
    # every token after the first scored once; after the first window, with >= max_length - stride context
    for length in (2, 39, 40, 41, 100, 150):
        seen = []
        for begin, end, first in perplexity.windows(length, 40, 16):
            assert end - begin <= 40 and (first == 1 or first - begin >= 40 - 16)
            seen += range(first, end)
        assert seen == list(range(1, length))


def test_context_capped_to_the_model_and_train_mode_restored(tiny_model):
    doc = random_sequences(1, min_len=100, max_len=100, seed=6)[0]
    tiny_model.train()
    out = perplexity.perplexity(tiny_model, [doc], max_length=1024, stride=512)
    assert tiny_model.training  # restored
    tiny_model.eval()
    ref, n = hf_strided_nll(tiny_model, doc, 64, 32)
    assert out["tokens"] == n and out["nll_sum"] == pytest.approx(ref, rel=1e-5)


def test_bf16_autocast_is_close(tiny_model):
    seqs = random_sequences(4, seed=7)
    exact = perplexity.perplexity(tiny_model, seqs)
    bf16 = perplexity.perplexity(tiny_model, seqs, amp_dtype=torch.bfloat16)
    assert bf16["perplexity"] == pytest.approx(exact["perplexity"], rel=0.05)


def test_text_is_tokenized_exactly_like_binarize(tiny_tokenizer, tmp_path):
    from data_prep.binarize import binarize

    text = tmp_path / "dev.txt"
    text.write_text("GPUとPythonで計算した。\nＡＢＣの本を読んだ。\n\n二つ目の文書です。\n", encoding="utf-8")
    binarize([str(text)], str(tiny_tokenizer), str(tmp_path / "bin"), num_workers=1, progress=False)
    from_text = perplexity.read_eval_data(str(text), str(tiny_tokenizer)).sequences
    from_shards = perplexity.read_eval_data(str(tmp_path / "bin")).sequences
    assert len(from_text) == 2
    assert [s.tolist() for s in from_text] == [s.tolist() for s in from_shards]
    assert from_text[0][0] == 1 and from_text[0][-1] == 2


def test_cli_table_and_json(tiny_setup, tmp_path):
    from transformers import GPT2LMHeadModel

    other = tmp_path / "other"
    torch.manual_seed(2)
    GPT2LMHeadModel(gpt2_config(n_layer=1)).save_pretrained(other)
    shard = write_shard(tmp_path / "dev.pickle", random_sequences(6, seed=8))
    out_json = tmp_path / "out" / "ppl.json"
    proc = subprocess.run(
        [sys.executable, str(EVALUATE_PY), "--model", f"teacher={tiny_setup['teacher']}", "--model", str(other),
         "--data", str(shard), "--max_length", "32", "--stride", "16", "--device", "cpu", "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "teacher" in proc.stdout and str(other) in proc.stdout and "perplexity" in proc.stdout
    assert "attention_mask" not in proc.stderr  # transformers' padding advice does not apply here
    result = json.loads(out_json.read_text())
    assert set(result["perplexity"]) == {"teacher", str(other)}
    model = GPT2LMHeadModel.from_pretrained(tiny_setup["teacher"])
    ref = perplexity.perplexity(model, random_sequences(6, seed=8), max_length=32, stride=16)
    assert result["perplexity"]["teacher"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert result["details"]["teacher"]["tokens"] == ref["tokens"]


@pytest.mark.parametrize("extra, code, message", [
    (["--data", "/nonexistent/dev.txt"], 1, "no such file"),
    (["--stride", "64"], 2, "--stride"),
    (["--model", "/nonexistent/model"], 2, "cannot load model"),
])
def test_cli_bad_input_gives_one_clear_line(tiny_setup, tmp_path, capsys, extra, code, message):
    shard = write_shard(tmp_path / "dev.pickle", random_sequences(2))
    args = {"--model": str(tiny_setup["teacher"]), "--data": str(shard), "--max_length": "64", "--device": "cpu"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    assert evaluate.main([x for kv in args.items() for x in kv]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


def test_training_scores_the_student_on_held_out_data(tiny_setup, tmp_path):
    import train
    from helpers import train_args

    dev = write_shard(tmp_path / "dev.pickle", random_sequences(5, seed=9))
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--eval_data", str(dev), "--eval_interval", "3"))
    results = json.loads((dump / "eval_results.json").read_text())
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(dump)
    ref = perplexity.perplexity(student, random_sequences(5, seed=9))
    assert results["step"] == 6 and results["tokens"] == ref["tokens"]
    assert results["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert [h["step"] for h in results["history"]] == [3, 6]
    events = b"".join(p.read_bytes() for p in (dump / "log").glob("events.out.tfevents.*"))
    assert b"eval/perplexity" in events
