"""taid and akl against their authors' code, rewritten here in float64 on the same inputs.

TAID (Shing et al., ICLR 2025): SakanaAI/TAID, src/distil_losses/taid.py, whose loss is the cross-entropy
-sum p log s to the target p = softmax((1 - t) sg(s) + t t_logits) and whose t moves by update_t. This
toolkit reports the KL instead (0 when the student is the target): the two differ by the target's entropy,
which has no gradient (p is detached), so the gradients must be equal and the values differ by H(p) only.

AKL (Wu et al., 2024): wutaiqiang/LLM_KD_AKL, AKL.py (get_ratio, get_kl): forward and reverse KL weighted
by the detached gaps between teacher and student over the teacher's head and tail.

Both authors work at temperature 1; at T the same formulas apply to the logits / T, times T^2.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import HiddenTeacher, KdSpec, TaidSchedule, fused_logit_terms, kd_loss_sum

B, S, D, V = 2, 6, 5, 23
LENGTHS = [6, 4]


def data(seed):
    g = torch.Generator().manual_seed(seed)
    h, t_h = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    w, t_w = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g) * 1.5
    ids = torch.randint(0, V, (B, S), generator=g)
    return h, w, t_h, t_w, ids, torch.tensor(LENGTHS)


# ---- the authors' formulas, float64 --------------------------------------------------------------

def official_taid_loss(logits, teacher_logits, mask, t):
    """TAID.compute_loss + forward_kl: masked mean of -sum p log softmax(logits), p from the detached logits."""
    p = torch.softmax((1 - t) * logits.detach() + t * teacher_logits, dim=-1)
    x = (p * torch.log_softmax(logits, dim=-1)).sum(-1)
    return -(x * mask).sum() / mask.sum()


def target_entropy(logits, teacher_logits, mask, t):
    """Masked mean entropy of TAID's target: what separates its cross-entropy from this toolkit's KL."""
    log_p = torch.log_softmax((1 - t) * logits.detach() + t * teacher_logits, dim=-1)
    return (-(log_p.exp() * log_p).sum(-1) * mask).sum() / mask.sum()


def official_akl_loss(logits, teacher_logits, mask, mu=0.5):
    """get_ratio, then get_kl(teacher, student, h) + get_kl(student, teacher, l): a masked mean."""
    teacher_probs = torch.softmax(teacher_logits, dim=-1)
    student_probs = torch.softmax(logits, dim=-1).detach()
    sorted_teacher, idx = teacher_probs.sort(dim=-1, descending=True)
    errors = (sorted_teacher - student_probs.gather(-1, idx)).abs()
    tail = sorted_teacher.cumsum(-1) > mu
    tail[..., 0] = False
    s1 = errors.masked_fill(tail, 0.0).sum(-1)
    s2 = errors.masked_fill(~tail, 0.0).sum(-1)
    h_ratio, l_ratio = s1 / (s1 + s2), s2 / (s1 + s2)

    def get_kl(a_logits, b_logits, ratio):  # KL(softmax(a) || softmax(b)), weighted by ratio
        a_probs, a_log = torch.softmax(a_logits, dim=-1), torch.log_softmax(a_logits, dim=-1)
        kl = (a_probs * a_log).sum(-1) - (a_probs * torch.log_softmax(b_logits, dim=-1)).sum(-1)
        return (kl * ratio * mask).sum() / mask.sum()

    return get_kl(teacher_logits, logits, h_ratio) + get_kl(logits, teacher_logits, l_ratio)


class OfficialT:
    """TAID.update_t, with Python floats (float64): t, the previous loss and the momentum."""

    def __init__(self, t_start, t_end, alpha, beta):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t, self.prev_loss, self.momentum = t_start, math.inf, 0.0

    def update(self, loss, global_step, num_train_steps):
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        t_target = self.t_start + (self.t_end - self.t_start) * global_step / num_train_steps
        delta_t = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
        self.t = min(self.t_end, max(t_target, self.t + delta_t))
        self.prev_loss = loss


# ---- the toolkit's two paths ---------------------------------------------------------------------

def toolkit_mean_and_grads(spec, h, w, t_h, t_w, ids, lengths, taid_t=None, fused=False):
    """The KD term's mean over real positions, and its gradient for h and w, through one of the two paths."""
    h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    mask = losses.real_mask(lengths, S)
    t = None if taid_t is None else torch.tensor(taid_t)
    if fused:
        total = fused_logit_terms(h_, (w_, None), ids, lengths, torch.tensor([1.0, 0.0, 0.0]), (True, False, False),
                                  spec, teacher=HiddenTeacher(t_h, (t_w, None)), taid_t=t, row_chunk=5)[0]
    else:
        total = kd_loss_sum(F.linear(h_, w_), F.linear(t_h, t_w), mask, spec, taid_t=t)
    mean = total / mask.sum()
    mean.backward()
    return mean.item(), h_.grad, w_.grad


def reference_mean_and_grads(formula, h, w, t_h, t_w, lengths, temperature, *args):
    """The authors' formula in float64 on the logits / T, times T^2, and its gradient for h and w."""
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    mask = losses.real_mask(lengths, S).double()
    s_logits, t_logits = F.linear(h64, w64) / temperature, F.linear(t_h.double(), t_w.double()) / temperature
    value = formula(s_logits, t_logits, mask, *args) * temperature**2
    value.backward()
    return value, s_logits.detach(), t_logits, mask, h64.grad, w64.grad


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("temperature, t", [(1.0, 0.4), (1.0, 0.85), (2.5, 0.6)])
def test_taid_is_the_official_loss_less_the_targets_entropy(fused, temperature, t):
    h, w, t_h, t_w, ids, lengths = data(0)
    got, g_h, g_w = toolkit_mean_and_grads(KdSpec("taid", temperature), h, w, t_h, t_w, ids, lengths, t, fused)
    official, s_logits, t_logits, mask, want_h, want_w = reference_mean_and_grads(
        official_taid_loss, h, w, t_h, t_w, lengths, temperature, t)
    entropy = target_entropy(s_logits, t_logits, mask, t) * temperature**2
    assert got == pytest.approx((official - entropy).item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_h, want_h.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, want_w.float(), rtol=1e-4, atol=1e-6)


def test_taid_at_the_ends_is_no_pull_and_forward_kl():
    """t = 0: the target is the student itself (zero loss, zero gradient); t = 1: the teacher (fkl)."""
    h, w, t_h, t_w, ids, lengths = data(1)
    spec = KdSpec("taid", 1.5)
    zero, g_h, _ = toolkit_mean_and_grads(spec, h, w, t_h, t_w, ids, lengths, 0.0)
    assert abs(zero) < 1e-6 and g_h.abs().max() < 1e-6
    at_one = toolkit_mean_and_grads(spec, h, w, t_h, t_w, ids, lengths, 1.0)
    fkl = toolkit_mean_and_grads(KdSpec("fkl", 1.5), h, w, t_h, t_w, ids, lengths)
    assert at_one[0] == pytest.approx(fkl[0], rel=1e-5)
    torch.testing.assert_close(at_one[1], fkl[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("temperature, mu", [(1.0, 0.5), (1.0, 0.2), (2.0, 0.5)])
def test_akl_is_the_authors_loss(fused, temperature, mu):
    h, w, t_h, t_w, ids, lengths = data(2)
    got, g_h, g_w = toolkit_mean_and_grads(KdSpec("akl", temperature, akl_mu=mu), h, w, t_h, t_w, ids, lengths,
                                           fused=fused)
    official, *_, want_h, want_w = reference_mean_and_grads(official_akl_loss, h, w, t_h, t_w, lengths,
                                                            temperature, mu)
    assert got == pytest.approx(official.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_h, want_h.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, want_w.float(), rtol=1e-4, atol=1e-6)


def test_akl_weights_follow_the_gaps():
    """A student that matches the teacher's head and misses its tail is pulled by reverse KL (weight 0),
    one that misses only the head by forward KL (weight 1); identical rows split evenly."""
    log_t = torch.tensor([[0.6, 0.2, 0.1, 0.1]]).log()
    tail_wrong = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    head_wrong = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    assert losses._akl_head_weight(tail_wrong, log_t, 0.5, False).item() == 0.0
    assert losses._akl_head_weight(head_wrong, log_t, 0.5, False).item() == pytest.approx(0.5)  # 0.1 vs 0.1
    assert losses._akl_head_weight(head_wrong, log_t, 0.85, False).item() == pytest.approx(1.0)  # head: 0.6, 0.2
    assert losses._akl_head_weight(log_t, log_t, 0.5, False).item() == 0.5


def test_akl_tail_bucket_sorts_last():
    """An offline teacher's tail bucket holds ids below every kept one, however large its mass: it is tail."""
    log_t = torch.tensor([[0.25, 0.15, 0.1, 0.5]]).log()  # three kept ids, then a tail bucket of 0.5
    log_s = torch.tensor([[0.35, 0.05, 0.1, 0.5]]).log()  # wrong on the kept ids only
    assert losses._akl_head_weight(log_s, log_t, 0.5, tail_last=True).item() == pytest.approx(1.0)
    assert losses._akl_head_weight(log_s, log_t, 0.5, tail_last=False).item() == pytest.approx(0.0)  # sorted first


# ---- t over training -----------------------------------------------------------------------------

# A scripted KD loss: a fast fall (t moves ahead of the linear path), a plateau, a rise (momentum < 0).
LOSSES = [5.0, 3.0, 1.8, 1.2, 1.0, 0.95, 0.94, 0.94, 1.1, 1.4, 1.3, 0.9, 0.6, 0.5, 0.45, 0.44, 0.43, 0.43, 0.42, 0.4]


@pytest.mark.parametrize("t_start, t_end, alpha, beta", [(0.4, 1.0, 5e-4, 0.99), (0.2, 0.9, 0.3, 0.5),
                                                         (0.0, 0.7, 1.0, 0.0)])
def test_t_follows_the_official_update(t_start, t_end, alpha, beta):
    """The whole trajectory over a scripted loss sequence, with the official defaults, with an alpha large
    enough for the adaptive term to lead and t_end < 1 to clip it, and with no momentum at all."""
    schedule, official = TaidSchedule(t_start, t_end, alpha, beta), OfficialT(t_start, t_end, alpha, beta)
    state, ours, theirs = schedule.initial(), [], []
    for step, loss in enumerate(LOSSES):
        state = schedule.update(state, torch.tensor(loss, dtype=torch.float64), step, len(LOSSES))
        official.update(loss, step, len(LOSSES))
        ours.append(state[0].item())
        theirs.append(official.t)
    assert ours == pytest.approx(theirs, rel=0, abs=1e-12)
    assert ours[0] == t_start and max(ours) <= t_end
    if alpha == 0.3:  # the adaptive term led the linear path, and t_end clipped it
        assert any(o > t_start + (t_end - t_start) * n / len(LOSSES) + 1e-3 for n, o in enumerate(ours))
        assert ours[-1] == t_end


def test_a_skipped_step_leaves_t_alone():
    schedule = TaidSchedule(0.3, 1.0, 0.2, 0.9)
    state = schedule.update(schedule.initial(), torch.tensor(2.0, dtype=torch.float64), 0, 10)
    state = schedule.update(state, torch.tensor(1.0, dtype=torch.float64), 1, 10)
    for bad, finite in [(float("nan"), True), (float("inf"), True), (0.5, False)]:
        after = schedule.update(state, torch.tensor(bad, dtype=torch.float64), 2, 10, finite=torch.tensor(finite))
        assert torch.equal(after, state)


def test_alpha_zero_is_the_linear_path():
    schedule = TaidSchedule(0.2, 0.8, 0.0, 0.99)
    state = schedule.initial()
    for step, loss in enumerate(LOSSES):
        state = schedule.update(state, torch.tensor(loss, dtype=torch.float64), step, len(LOSSES))
        assert state[0].item() == pytest.approx(0.2 + 0.6 * step / len(LOSSES), abs=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(t_start=0.8, t_end=0.5), "0 <= --taid_t_start <= --taid_t_end <= 1"),
    (dict(t_end=1.5), "0 <= --taid_t_start <= --taid_t_end <= 1"),
    (dict(alpha=-0.1), "--taid_alpha must be in [0, 1]"),
    (dict(beta=1.0), "--taid_beta must be in [0, 1)"),
])
def test_bad_schedules_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TaidSchedule(**bad)
