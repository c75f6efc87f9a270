"""Fast paths against the plain computation: fused KD+CLM loss, DataLoader workers, compile, padding log."""

import pytest
import torch
import torch.nn.functional as F

import losses
import train
from helpers import read_scalars, train_args, weights
from losses import HiddenTeacher, KdSpec, clm_loss_sum, fused_logit_terms, kd_loss_sum, mse_loss_sum

torch.set_num_threads(1)

B, S, D, V = 3, 9, 6, 13
LENGTHS = [9, 5, 1]


def hidden_batch(seed=0, dtype=torch.float32, t_vocab=V, bias=False):
    """Student and teacher final hidden states, heads (the teacher's may be padded), ids and lengths."""
    g = torch.Generator().manual_seed(seed)
    h, t_h = torch.randn(B, S, D, generator=g), torch.randn(B, S, D + 2, generator=g)
    w, t_w = torch.randn(V, D, generator=g), torch.randn(t_vocab, D + 2, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (B, S), generator=g)
    lengths = torch.tensor(LENGTHS)
    pad = ~losses.real_mask(lengths, S)
    h[pad], t_h[pad] = 50.0, -50.0  # padding must not count, whatever it holds
    return h.to(dtype), w.to(dtype), b, t_h.to(dtype), t_w.to(dtype), ids, lengths


def plain(h, w, b, t_h, t_w, ids, lengths, weights, c, spec=KdSpec(temperature=2.5)):
    """Values and gradients of c * (weights . (KD, CLM, MSE)) through whole logits, the plain functions and autograd."""
    h, w = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    b = None if b is None else b.detach().float().requires_grad_(True)
    mask = losses.real_mask(lengths, S)
    s_logits = F.linear(h, w, b)
    t_logits = F.linear(t_h.float(), t_w[:V].float())
    sums = torch.stack([kd_loss_sum(s_logits, t_logits, mask, spec),
                        clm_loss_sum(s_logits, ids, mask), mse_loss_sum(s_logits, t_logits, mask)])
    (c * (weights * sums).sum()).backward()
    return sums.detach(), h.grad, w.grad, None if b is None else b.grad


def fused(h, w, b, t_h, t_w, ids, lengths, weights, c, spec=KdSpec(temperature=2.5), enabled=(True, True, True),
          **kwargs):
    h, w = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    sums = fused_logit_terms(h, (w, b), ids, lengths, weights, enabled, spec,
                             teacher=None if t_h is None else HiddenTeacher(t_h, (t_w[:V], None), kwargs.get("dtype", torch.float32)),
                             **kwargs)
    (c * (weights * sums).sum()).backward()
    return sums.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("w_ce, w_clm, w_mse, c", [(0.5 / 15, 2.0 / 12, 0.0, 3.0), (7.0, 1e-3, 0.3, 0.25),
                                                   (1.0, 1.0, 1.0, 1.0)])
@pytest.mark.parametrize("row_chunk", [4, 1024])
def test_fused_matches_plain_values_and_gradients(w_ce, w_clm, w_mse, c, row_chunk):
    batch = hidden_batch(t_vocab=V + 3, bias=True)  # a teacher head padded beyond the vocabulary: cut to V
    weights = torch.tensor([w_ce, w_clm, w_mse])
    ref = plain(*batch, weights, c)
    out = fused(*batch, weights, c, enabled=(True, True, w_mse > 0), row_chunk=row_chunk)
    if w_mse == 0:
        ref = (ref[0] * torch.tensor([1.0, 1.0, 0.0]), *ref[1:])  # an off term is returned as 0
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pad = ~losses.real_mask(batch[6], S)
    assert out[1][pad].abs().max() == 0  # no gradient reaches padding


def test_fused_with_one_term_only():
    h, w, b, t_h, t_w, ids, lengths = hidden_batch(1)
    weights = torch.tensor([0.0, 3.0, 0.0])
    ref = plain(h, w, b, t_h, t_w, ids, lengths, weights, 1.0)
    out = fused(h, w, b, None, t_w, ids, lengths, weights, 1.0, enabled=(False, True, False))
    assert out[0][0] == 0 and out[0][2] == 0
    torch.testing.assert_close(out[0][1], ref[0][1], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[1:3], ref[1:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_bf16_within_the_stated_tolerance():
    """bf16 matmuls (the autocast dtype) and fp32 loss math: within 1e-2 relative of fp32 on bf16-rounded inputs."""
    h, w, b, t_h, t_w, ids, lengths = hidden_batch(2, torch.bfloat16)
    weights = torch.tensor([0.3, 0.1, 0.0])
    ref = plain(h, w, b, t_h, t_w, ids, lengths, weights, 1.0)
    out = fused(h.float(), w.float(), b, t_h, t_w, ids, lengths, weights, 1.0, enabled=(True, True, False),
                dtype=torch.bfloat16)
    torch.testing.assert_close(out[0][:2], ref[0][:2], rtol=1e-2, atol=1e-2)
    for got, want in zip(out[1:3], ref[1:3]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_nan_loss_gives_nan_gradients():
    h, w, b, t_h, t_w, ids, lengths = hidden_batch(3)
    h.requires_grad_(True)
    weights = torch.tensor([1.0, 1.0, 0.0])
    sums = fused_logit_terms(h, (w, None), ids, lengths, weights, (True, True, False), KdSpec(),
                             teacher=HiddenTeacher(t_h, (t_w, None)))
    (sums[0] * float("nan") + sums[1]).backward()
    assert torch.isnan(h.grad[losses.real_mask(lengths, S)]).all()


def run_weights(setup, dump, *extra):
    train.run(train_args(setup, dump, "--max_steps", "3", "--checkpoint_interval", "0", "--log_interval", "3",
                          *extra))
    return weights(dump)


@pytest.fixture(scope="module")
def default_run(tiny_setup, tmp_path_factory):
    dump = tmp_path_factory.mktemp("fast") / "default"
    return dump, run_weights(tiny_setup, dump)


def test_distiller_fused_loss_matches_the_plain_path(tiny_setup, default_run, tmp_path):
    plain_weights = run_weights(tiny_setup, tmp_path / "plain", "--no-fused_loss")
    for k, v in default_run[1].items():
        torch.testing.assert_close(v, plain_weights[k], rtol=0, atol=1e-6, msg=k)


def test_dataloader_workers_give_identical_weights(tiny_setup, default_run, tmp_path):
    with_workers = run_weights(tiny_setup, tmp_path / "workers", "--num_workers", "2")
    for k, v in default_run[1].items():
        assert torch.equal(v, with_workers[k]), k


def expected_padding_fraction(multiple):
    """The padding share of the first 3 micro-batches of the tiny run, with lengths padded up to `multiple`
    but never beyond the longest sequence of the data (the model context bounds that one)."""
    from torch.utils.data import BatchSampler, DistributedSampler

    from helpers import random_sequences

    sequences = random_sequences(64)  # the tiny_setup shard; all kept (12..40 tokens, no <unk>)
    cap = max(len(x) for x in sequences)
    sampler = DistributedSampler(range(len(sequences)), num_replicas=1, rank=0, shuffle=True, seed=56)
    sampler.set_epoch(0)
    batches = list(BatchSampler(sampler, 4, drop_last=False))[:3]  # 3 steps of one micro-batch
    real = sum(len(sequences[i]) for b in batches for i in b)
    padded = [min(-(-max(len(sequences[i]) for i in b) // multiple) * multiple, cap) for b in batches]
    return 1 - real / sum(len(b) * n for b, n in zip(batches, padded))


def test_padding_fraction_is_logged(default_run):
    """The default pads to multiples of 64, capped here at the longest sequence (40)."""
    logged = read_scalars(default_run[0] / "log", "global/padding_fraction")
    assert logged == [pytest.approx(expected_padding_fraction(64), abs=1e-6)]
    assert expected_padding_fraction(64) > expected_padding_fraction(1)  # the test can tell the two apart


def test_pad_multiple_changes_shapes_not_results(tiny_setup, default_run, tmp_path):
    dump = tmp_path / "pad1"
    unpadded = run_weights(tiny_setup, dump, "--pad_multiple", "1")
    assert read_scalars(dump / "log", "global/padding_fraction") == [
        pytest.approx(expected_padding_fraction(1), abs=1e-6)]
    for k, v in default_run[1].items():
        torch.testing.assert_close(unpadded[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_chunk_math_matches_eager():
    batch = hidden_batch(4)
    weights = torch.tensor([0.4, 0.2, 0.1])
    compiled = torch.compile(losses.fused_chunk, dynamic=False)
    ref = fused(*batch, weights, 1.5)
    out = fused(*batch, weights, 1.5, chunk_fn=compiled, row_chunk=8)
    for got, want in zip(out, ref):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_resumes_eager(tiny_setup, default_run, tmp_path):
    """--compile (the default on CUDA) on the CPU: same weights as eager, and a checkpoint that an
    eager --resume continues like an eager checkpoint (in-place compile keeps the state_dict keys)."""
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    for dump, flag in ((compiled, "--compile"), (eager, "--no-compile")):
        train.run(train_args(tiny_setup, dump, "--max_steps", "3", "--log_interval", "3", flag))
    for k, v in default_run[1].items():
        torch.testing.assert_close(weights(compiled)[k], v, rtol=0, atol=2e-6, msg=k)
    state = torch.load(compiled / "checkpoint_step00000003" / "training_state.pt", weights_only=False)
    assert not [k for k in state["student"] if "_orig_mod" in k]

    for dump in (compiled, eager):
        train.run(train_args(tiny_setup, dump, "--max_steps", "6", "--log_interval", "3", "--resume",
                              "--no-compile"))
    for k, v in weights(eager).items():
        torch.testing.assert_close(weights(compiled)[k], v, rtol=0, atol=5e-6, msg=k)
