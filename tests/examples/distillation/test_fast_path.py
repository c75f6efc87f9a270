"""Fast paths against the plain computation: fused KD+CLM loss, DataLoader workers, compile, padding log."""

import pytest
import torch

import losses
import train
from helpers import train_args
from losses import clm_loss_sum, kd_clm_loss_sums, kd_loss_sum
from helpers import read_scalars, weights

torch.set_num_threads(1)

B, S, V = 3, 9, 13
LENGTHS = [9, 5, 1]


def logits_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, V, generator=g) * 3).to(dtype)
    t = (torch.randn(B, S, V, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None]
    s[~mask], t[~mask] = 1e4, -1e4  # padding must not count, whatever it holds
    return s, t, ids, mask


def plain(s, t, ids, mask, temp, w_ce, w_clm, c):
    """Values and gradient of c * (w_ce * KD + w_clm * CLM) through the existing functions and autograd."""
    s = s.detach().float().requires_grad_(True)
    ce, clm = kd_loss_sum(s, t.float(), mask, temp), clm_loss_sum(s, ids, mask)
    (c * (w_ce * ce + w_clm * clm)).backward()
    return ce.detach(), clm.detach(), s.grad


def fused(s, t, ids, mask, temp, w_ce, w_clm, c, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    ce, clm = kd_clm_loss_sums(s, t, ids, mask, temp, w_ce, w_clm, **kwargs)
    (c * (w_ce * ce + w_clm * clm)).backward()
    return ce.detach(), clm.detach(), s.grad


@pytest.mark.parametrize("w_ce, w_clm, c", [(0.5 / 15, 2.0 / 12, 3.0), (7.0, 1e-3, 0.25), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("row_chunk", [4, 1024])
def test_fused_matches_plain_values_and_gradients(w_ce, w_clm, c, row_chunk):
    s, t, ids, mask = logits_batch()
    ref = plain(s, t, ids, mask, 2.5, w_ce, w_clm, c)
    out = fused(s, t, ids, mask, 2.5, w_ce, w_clm, c, row_chunk=row_chunk)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert out[2][~mask].abs().max() == 0  # no gradient reaches padding


def test_fused_with_one_term_only():
    s, t, ids, mask = logits_batch(1)
    s_ref = s.detach().clone().requires_grad_(True)
    (3.0 * clm_loss_sum(s_ref, ids, mask)).backward()
    ce, clm, grad = fused(s, None, ids, mask, 2.0, 0.0, 3.0, 1.0)
    assert ce.item() == 0.0
    torch.testing.assert_close(clm, clm_loss_sum(s, ids, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s_ref.grad, rtol=1e-5, atol=1e-6)

    s_ref = s.detach().clone().requires_grad_(True)
    (0.7 * kd_loss_sum(s_ref, t, mask, 2.0)).backward()
    ce, clm, grad = fused(s, t, ids, mask, 2.0, 0.7, 0.0, 1.0)
    assert clm.item() == 0.0
    torch.testing.assert_close(ce, kd_loss_sum(s, t, mask, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s_ref.grad, rtol=1e-5, atol=1e-6)


def test_fused_keeps_bf16_logits_and_gradient_in_bf16():
    s, t, ids, mask = logits_batch(2, torch.bfloat16)
    s[~mask], t[~mask] = 0, 0
    ref = plain(s, t, ids, mask, 2.0, 0.3, 0.1, 1.0)  # fp32 math on the same bf16 values
    ce, clm, grad = fused(s, t, ids, mask, 2.0, 0.3, 0.1, 1.0)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(ce, ref[0], rtol=1e-5, atol=1e-5)  # the math is fp32 either way
    torch.testing.assert_close(clm, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref[2], rtol=1e-2, atol=1e-4)  # bf16 rounding of the stored gradient


def test_nan_loss_gives_nan_gradients():
    s, t, ids, mask = logits_batch(3)
    s = s.requires_grad_(True)
    ce, clm = kd_clm_loss_sums(s, t, ids, mask, 2.0, 1.0, 1.0)
    (ce * float("nan") + clm).backward()
    assert torch.isnan(s.grad[mask]).all()


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


def test_padding_fraction_is_logged(tiny_setup, default_run):
    from torch.utils.data import BatchSampler, DistributedSampler

    from helpers import random_sequences

    sequences = random_sequences(64)  # the tiny_setup shard; all kept (12..40 tokens, no <unk>)
    sampler = DistributedSampler(range(len(sequences)), num_replicas=1, rank=0, shuffle=True, seed=56)
    sampler.set_epoch(0)
    batches = list(BatchSampler(sampler, 4, drop_last=False))[:3]  # 3 steps of one micro-batch
    real = sum(len(sequences[i]) for b in batches for i in b)
    slots = sum(len(b) * max(len(sequences[i]) for i in b) for b in batches)
    logged = read_scalars(default_run[0] / "log", "global/padding_fraction")
    assert logged == [pytest.approx(1 - real / slots, abs=1e-6)]


@pytest.mark.slow
def test_compiled_chunk_math_matches_eager():
    s, t, ids, mask = logits_batch(4)
    compiled = torch.compile(losses.fused_rows, dynamic=True)
    ref = fused(s, t, ids, mask, 2.0, 0.4, 0.2, 1.5)
    out = fused(s, t, ids, mask, 2.0, 0.4, 0.2, 1.5, chunk_fn=compiled, row_chunk=4)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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
