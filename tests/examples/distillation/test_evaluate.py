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
from helpers import REPO, gpt2_config, random_sequences, torchrun, write_shard

EVALUATE_PY = REPO / "examples" / "distillation" / "evaluate.py"
HELDOUT_WORKER = REPO / "tests" / "examples" / "distillation" / "heldout_worker.py"
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
    assert results["bits_per_char"] is None  # binarized data: no text to count
    events = b"".join(p.read_bytes() for p in (dump / "log").glob("events.out.tfevents.*"))
    assert b"eval/perplexity" in events and b"eval/bits_per_char" not in events


# ---- bits per character: a measure that crosses tokenizers -----------------------------------------------

# Two documents whose NFKC + lowercase form has another length than the text: half-width kana with a
# voicing mark (2 characters -> 1), a squared word (1 -> 4), a circled digit, full-width and upper case.
DOCS = [["GPUとPythonで計算した。", "ｶﾞｷﾞの本を読んだ。"],
        ["㍿の駅で①番の電車に乗った。", "ＡＢＣ", "今日は雨が降っていた。"]]
DOC_CHARS = [len("GPUとPythonで計算した。\nｶﾞｷﾞの本を読んだ。"), len("㍿の駅で①番の電車に乗った。\nＡＢＣ\n今日は雨が降っていた。")]
DOC_BYTES = [len("GPUとPythonで計算した。\nｶﾞｷﾞの本を読んだ。".encode()),
             len("㍿の駅で①番の電車に乗った。\nＡＢＣ\n今日は雨が降っていた。".encode())]


@pytest.fixture
def dev_text(tmp_path):
    path = tmp_path / "dev.txt"
    path.write_text("".join("\n".join(doc) + "\n\n" for doc in DOCS), encoding="utf-8")
    return path


def reference_ids(kind, tokenizer_dir, doc):
    """A document's ids computed apart from perplexity.py: sentencepiece itself on the NFKC + lowercase
    lines (as binarize.py) between <s> and </s>; the BPE's own tokenizer.json on the lines as they are,
    between its <|endoftext|>s (it has no <s>)."""
    if kind == "sentencepiece":
        import sentencepiece as spm
        from distil_ja.tokenization import normalize_text

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
        return [sp.bos_id(), *[i for line in doc for i in sp.encode(normalize_text(line))], sp.eos_id()]
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    end = bpe.token_to_id("<|endoftext|>")
    return [end, *[i for line in doc for i in bpe.encode(line, add_special_tokens=False).ids], end]


@pytest.fixture(scope="module")
def wide_model():
    """A tiny GPT-2 with room for both tiny tokenizers' ids and long enough for a whole document."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(3)
    return GPT2LMHeadModel(gpt2_config(n_layer=1, n_embd=32, vocab_size=512, n_positions=256)).eval()


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_bits_per_char_is_the_hand_summed_nll_over_the_original_characters(kind, tiny_tokenizer, tiny_bpe_tokenizer,
                                                                           wide_model, dev_text):
    tok = tiny_tokenizer if kind == "sentencepiece" else tiny_bpe_tokenizer
    data = perplexity.read_eval_data(str(dev_text), str(tok))
    expected_ids = [reference_ids(kind, tok, doc) for doc in DOCS]
    assert [s.tolist() for s in data.sequences] == expected_ids
    assert data.chars == DOC_CHARS and data.utf8_bytes == DOC_BYTES
    nll = sum(direct_nll(wide_model, ids) for ids in expected_ids)  # float64, every token after the first
    out = perplexity.held_out_scores(wide_model, data, batch_size=2)
    assert out["tokens"] == sum(len(ids) - 1 for ids in expected_ids)
    assert out["chars"] == sum(DOC_CHARS) and out["bytes"] == sum(DOC_BYTES)
    assert out["bits_per_char"] == pytest.approx(nll / math.log(2) / sum(DOC_CHARS), rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(DOC_BYTES), rel=1e-6)
    # split into windows: every token's NLL still counted once (with less context), over the same characters
    split = perplexity.held_out_scores(wide_model, data, max_length=12, stride=5, batch_size=3)
    strided = [hf_strided_nll(wide_model, ids, 12, 5) for ids in expected_ids]
    assert split["tokens"] == out["tokens"] == sum(n for _, n in strided)
    assert split["bits_per_char"] == pytest.approx(sum(x for x, _ in strided) / math.log(2) / sum(DOC_CHARS), rel=1e-6)


def test_two_tokenizers_of_other_granularity_count_the_same_characters(tiny_tokenizer, tiny_bpe_tokenizer, dev_text):
    for unit, chars in (("doc", DOC_CHARS), ("line", [len(line) for doc in DOCS for line in doc])):
        unigram = perplexity.read_eval_data(str(dev_text), str(tiny_tokenizer), unit)
        bpe = perplexity.read_eval_data(str(dev_text), str(tiny_bpe_tokenizer), unit)
        assert unigram.chars == bpe.chars == chars
        assert unigram.utf8_bytes == bpe.utf8_bytes
        unigram_tokens, bpe_tokens = (sum(map(len, d.sequences)) for d in (unigram, bpe))
        assert bpe_tokens > 1.3 * unigram_tokens  # the byte-level pieces are finer: other tokens, same text


def test_binarized_data_has_no_bits_per_char(tiny_tokenizer, wide_model, dev_text, tmp_path):
    from data_prep.binarize import binarize

    binarize([str(dev_text)], str(tiny_tokenizer), str(tmp_path / "bin"), num_workers=1, progress=False)
    data = perplexity.read_eval_data([str(tmp_path / "bin"), str(dev_text)], str(tiny_tokenizer))
    assert len(data) == 4 and data.chars is None
    out = perplexity.held_out_scores(wide_model, data)
    assert out["bits_per_char"] is None and out["bits_per_byte"] is None and math.isfinite(out["perplexity"])


def test_a_rinna_folder_without_spiece_model_still_reads_text_like_binarize(tiny_tokenizer, dev_text, tmp_path):
    """transformers 5 saves tokenizer.json only: its do_lower_case decides the NFKC + lowercase, as before."""
    from distil_ja.tokenization import load_tokenizer

    saved = tmp_path / "saved"
    load_tokenizer(str(tiny_tokenizer)).save_pretrained(saved)
    (saved / "spiece.model").unlink(missing_ok=True)
    encoder = perplexity.load_encoder(str(saved))
    assert isinstance(encoder, perplexity.TokenizerEncoder) and encoder.lowercase
    assert ([s.tolist() for s in perplexity.read_eval_data(str(dev_text), str(saved)).sequences]
            == [reference_ids("sentencepiece", tiny_tokenizer, doc) for doc in DOCS])


def test_cli_scores_each_model_with_its_own_tokenizer(tiny_tokenizer, tiny_bpe_tokenizer, dev_text, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    folders = {}
    for label, seed in (("unigram", 4), ("bpe", 5)):
        torch.manual_seed(seed)
        folders[label] = tmp_path / label
        GPT2LMHeadModel(gpt2_config(n_layer=1, vocab_size=512, n_positions=256)).save_pretrained(folders[label])
    out_json = tmp_path / "bpc.json"
    assert evaluate.main(["--model", f"unigram={folders['unigram']}", "--model", f"bpe={folders['bpe']}",
                          "--tokenizer", str(tiny_tokenizer), "--tokenizer", f"bpe={tiny_bpe_tokenizer}",
                          "--data", str(dev_text), "--device", "cpu", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "bits/char" in table and "bits/byte" in table and "tokenizers differ" in table and str(tiny_bpe_tokenizer) in table
    result = json.loads(out_json.read_text())
    assert result["tokenizers"] == {"unigram": str(tiny_tokenizer), "bpe": str(tiny_bpe_tokenizer)}
    for label, tok, kind in (("unigram", tiny_tokenizer, "sentencepiece"), ("bpe", tiny_bpe_tokenizer, "bpe")):
        model = GPT2LMHeadModel.from_pretrained(folders[label]).eval()
        nll = sum(direct_nll(model, reference_ids(kind, tok, doc)) for doc in DOCS)
        assert result["bits_per_char"][label] == pytest.approx(nll / math.log(2) / sum(DOC_CHARS), rel=1e-6)
        assert result["bits_per_byte"][label] == pytest.approx(nll / math.log(2) / sum(DOC_BYTES), rel=1e-6)
        assert result["details"][label]["chars"] == sum(DOC_CHARS)


@pytest.mark.slow
def test_two_gloo_processes_share_the_documents_and_agree_with_one(tiny_bpe_tokenizer, wide_model, dev_text, tmp_path):
    wide_model.save_pretrained(tmp_path / "model")
    proc = torchrun(HELDOUT_WORKER, [tmp_path / "model", tiny_bpe_tokenizer, dev_text, tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["own_chars"] for s in shared] == DOC_CHARS  # one document each: the totals need both ranks
    alone = perplexity.held_out_scores(wide_model, perplexity.read_eval_data(str(dev_text), str(tiny_bpe_tokenizer)))
    for out in shared:
        assert out["scores"] == pytest.approx(alone), out


@pytest.mark.parametrize("values, message", [
    (["--tokenizer", "nobody=tok"], "no --model is labelled 'nobody'"),
    (["--tokenizer", "a", "--tokenizer", "b"], "2 tokenizers for every model"),
])
def test_cli_bad_tokenizer_labels_give_one_line(tiny_setup, dev_text, capsys, values, message):
    assert evaluate.main(["--model", str(tiny_setup["teacher"]), "--data", str(dev_text), "--device", "cpu",
                          *values]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


def test_training_records_bits_per_char_of_text_eval_data(tiny_setup, dev_text, tmp_path):
    """eval_results.json, tensorboard and the curves carry the student's bits per character and per byte."""
    import plots
    import train
    from helpers import read_scalars, train_args
    from transformers import AutoModelForCausalLM

    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--eval_data", str(dev_text), "--eval_interval", "3"))
    results = json.loads((dump / "eval_results.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(dump).eval()
    nll = sum(direct_nll(student, reference_ids("sentencepiece", tiny_setup["tokenizer"], doc)) for doc in DOCS)
    assert results["step"] == 6 and results["chars"] == sum(DOC_CHARS) and results["bytes"] == sum(DOC_BYTES)
    assert results["bits_per_char"] == pytest.approx(nll / math.log(2) / sum(DOC_CHARS), rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(DOC_BYTES), rel=1e-5)
    history = results["history"]
    for key in ("bits_per_char", "bits_per_byte"):
        assert read_scalars(dump / "log", f"eval/{key}") == pytest.approx([h[key] for h in history], rel=1e-6)
    fig = plots.figure([plots.Run(dump)])
    ax = next(a for a in fig.axes if a.get_visible() and a.get_title() == "held-out bits per character")
    assert list(ax.get_lines()[0].get_ydata()) == [h["bits_per_char"] for h in history]
    assert ax.get_ylabel() == "bits / character"
