"""Each loss term against a plain float64 reference over real positions only."""

import math

import numpy as np
import pytest
import torch

import losses
from losses import KdSpec, clm_loss_sum, cos_loss_sum, count_positions, kd_loss_sum, mse_loss_sum

B, S, V, D = 3, 7, 11, 5
LENGTHS = [7, 4, 1]
T2 = KdSpec(temperature=2.0)  # fkl at T = 2


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, S, V, generator=g) * 3
    t_logits = torch.randn(B, S, V, generator=g) * 3
    s_hidden = torch.randn(B, S, D, generator=g)
    t_hidden = torch.randn(B, S, D, generator=g)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None]
    return s_logits, t_logits, s_hidden, t_hidden, ids, mask


def real_positions():
    return [(b, i) for b in range(B) for i in range(LENGTHS[b])]


def log_softmax64(row):
    row = np.asarray(row, dtype=np.float64)
    shifted = row - row.max()
    return shifted - math.log(np.exp(shifted).sum())


def test_kd_matches_reference():
    s, t, *_, mask = batch()
    temp = 2.5
    ref = 0.0
    for b, i in real_positions():
        ls, lt = log_softmax64(s[b, i] / temp), log_softmax64(t[b, i] / temp)
        ref += float((np.exp(lt) * (lt - ls)).sum()) * temp**2
    assert kd_loss_sum(s, t, mask, KdSpec(temperature=temp)).item() == pytest.approx(ref, rel=1e-5)


def test_clm_matches_reference():
    s, _, _, _, ids, mask = batch()
    ref = 0.0
    for b, i in real_positions():
        if i + 1 < LENGTHS[b]:
            ref -= log_softmax64(s[b, i])[ids[b, i + 1]]
    assert clm_loss_sum(s, ids, mask).item() == pytest.approx(ref, rel=1e-5)


def test_mse_matches_reference():
    s, t, *_, mask = batch()
    ref = sum(float(((s[b, i].double() - t[b, i].double()) ** 2).sum()) for b, i in real_positions())
    assert mse_loss_sum(s, t, mask).item() == pytest.approx(ref, rel=1e-5)


def test_cos_matches_reference():
    _, _, sh, th, _, mask = batch()
    ref = 0.0
    for b, i in real_positions():
        x, y = sh[b, i].double().numpy(), th[b, i].double().numpy()
        ref += 1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    assert cos_loss_sum(sh, th, mask).item() == pytest.approx(ref, rel=1e-5)


def test_padding_positions_do_not_count():
    s, t, sh, th, ids, mask = batch()
    before = [kd_loss_sum(s, t, mask, T2), clm_loss_sum(s, ids, mask), mse_loss_sum(s, t, mask),
              cos_loss_sum(sh, th, mask)]
    pad = ~mask
    s2, t2, sh2, th2, ids2 = s.clone(), t.clone(), sh.clone(), th.clone(), ids.clone()
    s2[pad], t2[pad], sh2[pad], th2[pad], ids2[pad] = 1e4, -1e4, 7.0, -3.0, 0
    after = [kd_loss_sum(s2, t2, mask, T2), clm_loss_sum(s2, ids2, mask), mse_loss_sum(s2, t2, mask),
             cos_loss_sum(sh2, th2, mask)]
    for x, y in zip(before, after):
        assert x.item() == y.item()


def test_gradient_is_zero_on_padding():
    s, t, _, _, ids, mask = batch()
    s.requires_grad_(True)
    (kd_loss_sum(s, t, mask, T2) + clm_loss_sum(s, ids, mask)).backward()
    assert s.grad[~mask].abs().max().item() == 0.0
    assert s.grad[mask].abs().max().item() > 0.0


def test_empty_mask_gives_finite_zero():
    s, t, sh, th, ids, _ = batch()
    empty = torch.zeros(B, S, dtype=torch.bool)
    for value in (kd_loss_sum(s, t, empty, T2), clm_loss_sum(s, ids, empty), mse_loss_sum(s, t, empty),
                  cos_loss_sum(sh, th, empty)):
        assert value.item() == 0.0
    assert count_positions(empty) == (0, 0)


def test_chunking_does_not_change_results(monkeypatch):
    s, t, _, _, ids, mask = batch()
    whole = (kd_loss_sum(s, t, mask, T2), clm_loss_sum(s, ids, mask), mse_loss_sum(s, t, mask))
    monkeypatch.setattr(losses, "ROW_CHUNK", 2)
    chunked = (kd_loss_sum(s, t, mask, T2), clm_loss_sum(s, ids, mask), mse_loss_sum(s, t, mask))
    for x, y in zip(whole, chunked):
        assert x.item() == pytest.approx(y.item(), rel=1e-6)


def test_count_positions():
    *_, mask = batch()
    assert count_positions(mask) == (sum(LENGTHS), sum(n - 1 for n in LENGTHS))


def test_cos_needs_equal_widths():
    _, _, sh, _, _, mask = batch()
    with pytest.raises(ValueError, match="equal hidden sizes"):
        cos_loss_sum(sh, torch.randn(B, S, D + 1), mask)
