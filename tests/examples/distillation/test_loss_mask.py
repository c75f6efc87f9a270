"""A chat corpus's loss mask, end to end: the positions counted (position i counts when token i + 1 is
the assistant's), every term counting them only (fused = plain = a float64 rewrite), the batches, the
token cache, the offline dump holding the assistant's rows only, --train_on_prompt, and training that
cannot see what it does not count."""

import json

import numpy as np
import pytest
import torch

import train
from distil_ja.cli import EXIT_DATA
from helpers import chat_args, dump_args, dump_script, weights
from lm_seqs_dataset import LmSeqsDataset, SpecialIds, counted_positions, split_masked
from losses import KdSpec, HiddenTeacher, clm_loss_sum, counted_masks, fused_logit_terms, kd_loss_sum

IDS = SpecialIds()


# ---- the positions ----------------------------------------------------------------------------------


def test_counted_positions_predict_the_assistant_tokens():
    mask = np.array([0, 0, 1, 1, 0, 1, 0], dtype=np.uint8)  # tokens 2, 3 and 5 are the assistant's
    assert counted_positions(mask).tolist() == [1, 2, 4]  # the positions whose next token they are
    lengths = torch.tensor([7, 5])
    counted = torch.zeros(2, 8, dtype=torch.bool)
    counted[0, [1, 2, 4]] = True
    counted[1, [3, 4]] = True  # position 4 is the last real one of row 1: it predicts nothing
    real, pred = counted_masks(lengths, 8, counted)
    assert real.equal(pred)
    assert torch.nonzero(real).tolist() == [[0, 1], [0, 2], [0, 4], [1, 3]]


def test_split_masked_cuts_the_mask_alongside():
    seq = np.array([1, *range(10, 20), 2], dtype=np.uint16)
    mask = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], dtype=np.uint8)  # the final </s> is the assistant's
    pieces = split_masked(seq, mask, 6, IDS)
    assert [p.tolist() for p, _ in pieces] == [[1, 10, 11, 12, 13, 2], [1, 14, 15, 16, 17, 2], [1, 18, 19, 2]]
    assert [m.tolist() for _, m in pieces] == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1]]


def test_dataset_batches_the_counted_positions_and_drops_sequences_without_any(chat_setup):
    sequences, masks = chat_setup["sequences"], chat_setup["masks"]
    silent = np.zeros(len(sequences[0]), dtype=np.uint8)  # a conversation with no assistant token
    dataset = LmSeqsDataset([*sequences, sequences[0]], 64, IDS, loss_masks=[*masks, silent])
    assert len(dataset) == len(sequences)
    token_ids, lengths, counted = dataset.batch_sequences([dataset[0], dataset[5]])
    for row, index in enumerate((0, 5)):
        expected = np.zeros(token_ids.size(1), dtype=bool)
        expected[np.flatnonzero(masks[index][1:])] = True
        assert counted[row].numpy().tolist() == expected.tolist()
        assert token_ids[row, : lengths[row]].numpy().tolist() == sequences[index].tolist()


def test_the_token_cache_keeps_the_masks(chat_setup, tmp_path):
    from token_cache import write_cache

    dataset = LmSeqsDataset(chat_setup["sequences"], 64, IDS, loss_masks=chat_setup["masks"])
    write_cache(tmp_path, dataset.sequences, dataset.cache_extras())
    mapped = LmSeqsDataset.from_cache(tmp_path, IDS)
    for x, y in zip(mapped.batch_sequences([mapped[2], mapped[7]]), dataset.batch_sequences([dataset[2], dataset[7]])):
        assert x.equal(y)
    assert mapped.row_counts().tolist() == [int(m[1:].sum()) for m in chat_setup["masks"]]


# ---- the terms count the counted positions only -------------------------------------------------


def reference_sums(s_logits, t_logits, token_ids, counted, temperature):
    """float64: T^2 KL(teacher || student) at temperature T and -log p(next token), summed where counted."""
    s, t = s_logits.detach().double(), t_logits.detach().double()
    kd = clm = 0.0
    for b, i in torch.nonzero(counted).tolist():
        p_t = torch.softmax(t[b, i] / temperature, -1)
        log_s = torch.log_softmax(s[b, i] / temperature, -1)
        kd += temperature**2 * float((p_t * (p_t.log() - log_s)).sum())
        clm += -float(torch.log_softmax(s[b, i], -1)[token_ids[b, i + 1]])
    return kd, clm


def test_fused_and_plain_terms_count_only_the_counted_positions():
    torch.manual_seed(0)
    batch, seq, width, vocab = 3, 9, 8, 20
    lengths = torch.tensor([9, 7, 4])
    token_ids = torch.randint(0, vocab, (batch, seq))
    counted = torch.rand(batch, seq) < 0.5
    h = torch.randn(batch, seq, width, requires_grad=True)
    w = torch.randn(vocab, width, requires_grad=True)
    t_hidden, t_w = torch.randn(batch, seq, width), torch.randn(vocab, width)
    spec = KdSpec(kind="fkl", temperature=2.0)
    real, _ = counted_masks(lengths, seq, counted)
    kd_ref, clm_ref = reference_sums(h @ w.t(), t_hidden @ t_w.t(), token_ids, real, 2.0)
    assert real.sum() < (counted & (torch.arange(seq) < lengths[:, None])).sum() + 1  # counted beyond a row's end are not

    weights = torch.tensor([1.0, 1.0, 0.0])
    sums = fused_logit_terms(h, (w, None), token_ids, lengths, weights, (True, True, False), spec,
                             teacher=HiddenTeacher(t_hidden, (t_w, None), torch.float32), counted=counted)
    assert sums[0].item() == pytest.approx(kd_ref, rel=1e-5)
    assert sums[1].item() == pytest.approx(clm_ref, rel=1e-5)
    sums[:2].sum().backward()
    fused_grad = h.grad.clone()
    assert fused_grad[~real].abs().max() == 0  # nothing learnt where nothing counts

    h.grad = None
    mask, pred = counted_masks(lengths, seq, counted)
    s_logits = h @ w.t()
    plain_kd = kd_loss_sum(s_logits, t_hidden @ t_w.t(), mask, spec)
    plain_clm = clm_loss_sum(s_logits, token_ids, mask, pred)
    assert plain_kd.item() == pytest.approx(kd_ref, rel=1e-5)
    assert plain_clm.item() == pytest.approx(clm_ref, rel=1e-5)
    (plain_kd + plain_clm).backward()
    torch.testing.assert_close(fused_grad, h.grad, rtol=1e-5, atol=1e-6)


# ---- training -------------------------------------------------------------------------------------


def test_training_never_sees_what_it_does_not_count(chat_setup, tmp_path):
    """The twin corpus differs only in tokens after the last assistant token: attention is causal, so no
    counted position sees them, and the students are the same to the bit; --train_on_prompt counts them."""
    runs = {}
    for name in ("data", "twin"):
        for extra in ((), ("--train_on_prompt",)):
            dump = tmp_path / f"{name}{len(extra)}"
            assert train.main(chat_args(chat_setup, dump, chat_setup[name], *extra)) == 0
            runs[name, bool(extra)] = weights(dump)
    for key, value in runs["data", False].items():
        assert torch.equal(value, runs["twin", False][key]), key
    assert any(not torch.equal(v, runs["twin", True][k]) for k, v in runs["data", True].items())
    assert any(not torch.equal(v, runs["data", True][k]) for k, v in runs["data", False].items())


def test_the_log_normalises_by_the_counted_positions(chat_setup, tmp_path):
    """One step of CLM only: the logged term is the mean next-token loss of the counted positions, as the
    student computes it in float64 (at a learning rate of 1e-12 the saved student is the initial one, within
    1e-11 per weight)."""
    dump = tmp_path / "run"
    args = chat_args(chat_setup, dump, chat_setup["data"], "--max_steps", "1", "--log_interval", "1",
                     "--alpha_ce", "0", "--alpha_clm", "1", "--batch_size", "24", "--learning_rate", "1e-12")
    assert train.main(args) == 0
    logged = json.loads((dump / "metrics.jsonl").read_text().splitlines()[0])
    dataset = LmSeqsDataset(chat_setup["sequences"], 64, IDS, loss_masks=chat_setup["masks"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dump).double().eval()
    token_ids, lengths, counted = dataset.batch_sequences([dataset[i] for i in range(len(dataset))])
    real, pred = counted_masks(lengths, token_ids.size(1), counted)
    with torch.no_grad():
        logits = model(token_ids).logits
    expected = clm_loss_sum(logits, token_ids, real, pred).item() / int(pred.sum())
    assert logged["clm"] == pytest.approx(expected, rel=1e-4)


# ---- offline -------------------------------------------------------------------------------------


def test_the_offline_dump_holds_the_assistant_rows_only(chat_setup, tmp_path):
    import teacher_logits

    dumps = {}
    for extra in ((), ("--train_on_prompt",)):
        folder = tmp_path / f"dump{len(extra)}"
        assert dump_script().main(dump_args(chat_setup, folder, "--max_len", "64", *extra)) == 0
        dumps[bool(extra)] = teacher_logits.TopKLogits(folder)
    masked, whole = dumps[False], dumps[True]
    assert masked.manifest["assistant_only"] and not whole.manifest["assistant_only"]
    assert masked.manifest["rows"] == sum(int(m[1:].sum()) for m in chat_setup["masks"])
    assert whole.manifest["rows"] == whole.manifest["tokens"] == masked.manifest["tokens"]
    for i in (0, 3, 11):  # the rows kept are the whole dump's rows at the counted positions
        kept = counted_positions(chat_setup["masks"][i])
        assert np.array_equal(masked[i][0], whole[i][0][kept])
        assert np.array_equal(masked[i][1], whole[i][1][kept])

    assert train.main(chat_args(chat_setup, tmp_path / "offline", chat_setup["data"], offline=tmp_path / "dump0")) == 0
    assert train.main(chat_args(chat_setup, tmp_path / "refused", chat_setup["data"], "--train_on_prompt",
                                offline=tmp_path / "dump0")) == EXIT_DATA
