"""The KD objectives (--kd_loss) against their textbook formulas, written here again in float64 from
probabilities (not log-probabilities), differentiated by autograd: values and gradients of the plain path
(whole logits) and of the fused path (hidden states and LM head, chunk by chunk), padding included, for the
full teacher distribution and for an offline teacher's top k plus a tail bucket. (taid and akl against
their authors' code: test_adaptive_objectives.py.)"""

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import KD_LOSSES, HiddenTeacher, KdSpec, TopkTeacher, fused_logit_terms, kd_loss_sum

B, S, D, V, K = 2, 7, 5, 17, 4
LENGTHS = [7, 3]
TEMPERATURE = 1.7  # not 1, so that a missing T or T^2 shows
BETA, SKEW = 0.3, 0.2
TAU, MU = 0.35, 0.4  # taid's interpolation weight, akl's head mass


def geometric_target(p_s, p_t):
    """TAID's intermediate distribution from probabilities: p_s^(1 - tau) p_t^tau, normalised, p_s held constant."""
    g = p_s.detach() ** (1 - TAU) * p_t**TAU
    return g / g.sum(-1, keepdim=True)


def head_weight(p_s, p_t, sort):
    """AKL's forward-KL weight per row, token by token: walk the teacher's ids from the most probable
    (`sort`) or in the given order (top-k buckets, whose tail comes last); the first id and every id while
    the teacher's running mass stays <= MU are the head."""
    weights = []
    for ps, pt in zip(p_s.detach().tolist(), p_t.tolist()):
        order = sorted(range(len(pt)), key=lambda i: -pt[i]) if sort else range(len(pt))
        head = tail = mass = 0.0
        for n, i in enumerate(order):
            mass += pt[i]
            if n == 0 or mass <= MU:
                head += abs(pt[i] - ps[i])
            else:
                tail += abs(pt[i] - ps[i])
        weights.append(head / (head + tail))
    return torch.tensor(weights, dtype=p_t.dtype)


def textbook(kind, p_s, p_t, topk=False):
    """Divergence per row from probabilities, the formulas as papers write them."""
    if kind == "taid":
        p = geometric_target(p_s, p_t)
        return (p * (p / p_s).log()).sum(-1)
    if kind == "akl":
        w = head_weight(p_s, p_t, sort=not topk)
        return w * (p_t * (p_t / p_s).log()).sum(-1) + (1 - w) * (p_s * (p_s / p_t).log()).sum(-1)
    if kind == "fkl":
        return (p_t * (p_t / p_s).log()).sum(-1)
    if kind == "rkl":
        return (p_s * (p_s / p_t).log()).sum(-1)
    if kind == "jsd":
        m = BETA * p_t + (1 - BETA) * p_s
        return BETA * (p_t * (p_t / m).log()).sum(-1) + (1 - BETA) * (p_s * (p_s / m).log()).sum(-1)
    if kind == "skew_fkl":
        m = SKEW * p_t + (1 - SKEW) * p_s
        return (p_t * (p_t / m).log()).sum(-1)
    if kind == "skew_rkl":
        m = SKEW * p_s + (1 - SKEW) * p_t
        return (p_s * (p_s / m).log()).sum(-1)
    assert kind == "tvd"
    return 0.5 * (p_s - p_t).abs().sum(-1)


def buckets(p, ids):
    """(B, S, K + 1): the probabilities of the ids, then everything else."""
    top = p.gather(-1, ids)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], dim=-1)


def reference(kind, s_logits, t_logits, lengths, topk=False):
    """Sum over real positions of T^2 * divergence, float64 (padding rows are never computed)."""
    real = losses.real_mask(lengths, S)
    p_s = torch.softmax(s_logits[real].double() / TEMPERATURE, dim=-1)
    p_t = torch.softmax(t_logits[real].double() / TEMPERATURE, dim=-1)
    if topk:
        ids = p_t.topk(K, dim=-1).indices
        p_s, p_t = buckets(p_s, ids), buckets(p_t, ids)
    return (textbook(kind, p_s, p_t, topk) * TEMPERATURE**2).sum()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, t_h = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    w, t_w = torch.randn(V, D, generator=g) * 0.8, torch.randn(V, D, generator=g) * 0.8
    ids = torch.randint(0, V, (B, S), generator=g)
    lengths = torch.tensor(LENGTHS)
    pad = ~losses.real_mask(lengths, S)
    h[pad], t_h[pad] = 30.0, -30.0  # padding must not count, whatever it holds
    return h, w, t_h, t_w, ids, lengths


def offline_topk(t_h, t_w):
    """What dump_teacher_logits stores: the top-k ids and their log-probabilities at the temperature."""
    logp = torch.log_softmax(F.linear(t_h, t_w) / TEMPERATURE, dim=-1)
    top = logp.topk(K, dim=-1)
    return top.indices, top.values


def spec(kind):
    return KdSpec(kind, TEMPERATURE, BETA, SKEW, MU)


def taid_t(kind):
    """The interpolation weight where the objective takes one (taid), else None."""
    return torch.tensor(TAU) if kind == "taid" else None


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_plain_path_is_the_textbook_value_and_gradient(kind, topk):
    h, w, t_h, t_w, ids, lengths = data()
    s_logits = F.linear(h, w).detach().requires_grad_(True)
    t_logits = F.linear(t_h, t_w)
    mask = losses.real_mask(lengths, S)
    got = kd_loss_sum(s_logits, TopkTeacher(*offline_topk(t_h, t_w)) if topk else t_logits, mask, spec(kind),
                      taid_t=taid_t(kind))
    got.backward()
    s64 = s_logits.detach().double().requires_grad_(True)
    want = reference(kind, s64, t_logits, lengths, topk)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s_logits.grad, s64.grad.float(), rtol=1e-4, atol=1e-6)
    assert s_logits.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
@pytest.mark.parametrize("kind", KD_LOSSES)
def test_fused_path_is_the_textbook_value_and_gradient(kind, topk):
    """Gradients for the hidden states and the head weight, with CLM on beside KD (their weights combine)."""
    h, w, t_h, t_w, ids, lengths = data(1)
    weights = torch.tensor([0.7, 0.2, 0.0])
    h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    sums = fused_logit_terms(h_, (w_, None), ids, lengths, weights, (True, True, False), spec(kind),
                             teacher=TopkTeacher(*offline_topk(t_h, t_w)) if topk else HiddenTeacher(t_h, (t_w, None)),
                             taid_t=taid_t(kind),
                             row_chunk=3)
    (2.0 * (weights * sums).sum()).backward()

    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    s64 = F.linear(h64, w64)
    kd = reference(kind, s64, F.linear(t_h, t_w).double(), lengths, topk)
    pred = losses.predicted_mask(losses.real_mask(lengths, S))
    clm = F.cross_entropy(s64[:, :-1][pred[:, :-1]], ids[:, 1:][pred[:, :-1]], reduction="sum")
    (2.0 * (0.7 * kd + 0.2 * clm)).backward()
    assert sums[0].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    assert sums[1].item() == pytest.approx(clm.item(), rel=1e-5)
    torch.testing.assert_close(h_.grad, h64.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_.grad, w64.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_bf16_fused_path_within_the_stated_tolerance(kind):
    """bf16 matmuls, fp32 loss math. Stated tolerance against float64: the value within 2e-2 relative, every
    gradient entry within 2e-2 of the largest gradient entry (bf16 keeps 8 bits of mantissa)."""
    h, w, t_h, t_w, ids, lengths = data(2)
    weights = torch.tensor([1.0, 0.0, 0.0])
    h_ = h.clone().requires_grad_(True)
    sums = fused_logit_terms(h_, (w, None), ids, lengths, weights, (True, False, False), spec(kind),
                             teacher=HiddenTeacher(t_h, (t_w, None), torch.bfloat16), taid_t=taid_t(kind),
                             dtype=torch.bfloat16)
    sums[0].backward()
    h64 = h.double().requires_grad_(True)
    want = reference(kind, F.linear(h64, w.double()), F.linear(t_h, t_w).double(), lengths)
    want.backward()
    assert sums[0].item() == pytest.approx(want.item(), rel=2e-2, abs=1e-3)
    scale = h64.grad.abs().max().item()
    assert (h_.grad.double() - h64.grad).abs().max().item() <= 2e-2 * scale


def test_fkl_keeps_the_previous_formulas_bit_for_bit():
    """The default objective's chunk math is the one before --kd_loss existed: its KD value and gradient,
    restated here as that code had them, equal it exactly."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    targets = torch.randint(0, V, (6,), generator=g)
    real = torch.ones(6, dtype=torch.bool)
    pred = torch.tensor([True] * 5 + [False])
    weights = torch.tensor([0.3, 0.45, 0.0])
    kd, clm, _, grad = losses.fkl_clm_mse_rows(s, t, targets, real, pred, weights, TEMPERATURE)

    ls_t, lt_t = torch.log_softmax(s / TEMPERATURE, dim=-1), torch.log_softmax(t / TEMPERATURE, dim=-1)
    pt = lt_t.exp()
    old_grad = (weights[0] * TEMPERATURE) * (ls_t.exp() - pt)
    ls = torch.log_softmax(s, dim=-1)
    row_w = (weights[1] * pred.float())[:, None]
    old_grad = old_grad + (ls.exp() * row_w).scatter_add(1, targets[:, None], -row_w)
    assert torch.equal(grad, old_grad)
    assert kd.item() == pytest.approx(((pt * (lt_t - ls_t)).sum() * TEMPERATURE**2).item(), rel=1e-6)


def test_topk_with_every_id_is_the_full_objective():
    """k = V leaves an empty tail on both sides: the top-k term is then the full-vocabulary term."""
    h, w, t_h, t_w, ids, lengths = data(4)
    s_logits, t_logits = F.linear(h, w), F.linear(t_h, t_w)
    logp = torch.log_softmax(t_logits / TEMPERATURE, dim=-1)
    every = logp.topk(V, dim=-1)
    mask = losses.real_mask(lengths, S)
    for kind in KD_LOSSES:
        full = kd_loss_sum(s_logits, t_logits, mask, spec(kind), taid_t=taid_t(kind))
        top = kd_loss_sum(s_logits, TopkTeacher(every.indices, every.values), mask, spec(kind),
                          taid_t=taid_t(kind))
        assert top.item() == pytest.approx(full.item(), rel=1e-4, abs=1e-5), kind


def test_identical_distributions_give_zero():
    h, w, t_h, t_w, ids, lengths = data(5)
    s_logits = F.linear(h, w)
    mask = losses.real_mask(lengths, S)
    for kind in KD_LOSSES:
        assert abs(kd_loss_sum(s_logits, s_logits, mask, spec(kind), taid_t=taid_t(kind)).item()) < 1e-5, kind


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_t_squared_keeps_the_kl_family_gradient_scale_and_tvd_grows_with_t(kind):
    """kd_rows' claim: at large T, T^2 * D has a gradient independent of T for the KL family, about
    proportional to T for tvd (whose gradient shrinks as 1/T only). Doubling T from 4 to 8:"""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(64, V, generator=g) * 2, torch.randn(64, V, generator=g) * 2

    def grad_norm(temperature):
        s_ = s.clone().requires_grad_(True)
        losses.kd_rows(KdSpec(kind, temperature), s_, losses.Logits(t), taid_t(kind)).sum().backward()
        return s_.grad.norm().item()

    ratio = grad_norm(8.0) / grad_norm(4.0)
    assert ratio == pytest.approx(2.0 if kind == "tvd" else 1.0, rel=0.15)


def test_jsd_beta_at_its_ends_is_trls_forward_and_reverse_kl():
    """TRL's GKDTrainer.generalized_jsd_loss and Liger's JSD take beta = 0 as KL(t || s) and 1 as KL(s || t)
    (the mixture's own limits are 0); inside (0, 1), beta = 1e-6 is close to 0 (the jump is at the end)."""
    h, w, t_h, t_w, ids, lengths = data(7)
    s_logits, t_logits = F.linear(h, w), F.linear(t_h, t_w)
    mask = losses.real_mask(lengths, S)

    def kd(kind, beta=0.5):
        return kd_loss_sum(s_logits, t_logits, mask, KdSpec(kind, TEMPERATURE, beta)).item()

    assert kd("jsd", 0.0) == kd("fkl") and kd("jsd", 1.0) == kd("rkl")
    assert kd("jsd", 1e-6) < 1e-4 * kd("fkl")


@pytest.mark.parametrize("fields, message", [
    (dict(kind="kl"), "unknown KD objective 'kl'"),
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(kind="jsd", beta=1.5), "--kd_beta (jsd's beta) must be in [0, 1], got 1.5"),
    (dict(skew=0.0), "--kd_skew (the skew alpha) must be in (0, 1)"),
    (dict(akl_mu=1.0), "--akl_mu (akl's head mass) must be in (0, 1)"),
])
def test_the_api_refuses_what_no_formula_computes_in_one_line(fields, message):
    """KdSpec checks its own fields (train.py turns the same line into a usage error): no 'math domain error'."""
    with pytest.raises(ValueError) as err:
        KdSpec(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)
