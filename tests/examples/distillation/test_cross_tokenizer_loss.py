"""The KD term between vocabularies (losses.cross_kd_rows), against a float64 rewrite of its formulas.

    chars:   T^2 D(next-character classes: each the sum of its pieces' probabilities)
    pieces:  T^2 [ D(shared pieces + rest) + uld_weight * sum_i |sort(s_unshared)_i - sort(t_unshared)_i| ]

rewritten here with numpy-style float64 operations (probabilities, 1 - sum for the rest buckets,
explicit sorts and zero padding), then checked in value and gradient, on the plain path and the
fused one, online and offline, with padding and unaligned positions that must not count.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
from distil_ja.alignment import exact_depths
from losses import (AlignedTeacher, HiddenTeacher, KdSpec, LogitsTeacher, TopkTeacher, VocabMap, fused_logit_terms,
                    kd_loss_sum)

B, S, S_T, D, D_T, V_S, V_T = 2, 6, 7, 5, 4, 11, 13
STUDENT_IDS = [0, 1, 2, 3, 5, 7, 9]  # shared piece m is student id STUDENT_IDS[m] and teacher id TEACHER_IDS[m]
TEACHER_IDS = [0, 2, 1, 4, 6, 8, 12]
TEMPERATURE = 1.7


def vocab():
    return VocabMap.build(STUDENT_IDS, TEACHER_IDS, V_S, V_T)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(B, S, D, generator=g), torch.randn(V_S, D, generator=g)
    t_h, t_w = torch.randn(B, S_T, D_T, generator=g) * 2, torch.randn(V_T, D_T, generator=g)
    lengths = torch.tensor([S, S - 2])
    ids = torch.randint(0, V_S, (B, S), generator=g)
    # the teacher row of each student position in the teacher's own (B, S_T) batch, flattened; -1: unaligned
    alignment = torch.tensor([[0, 2, -1, 3, 5, 6], [7, -1, 9, 10, 12, 13]])
    return h, w, t_h, t_w, ids, lengths, alignment


def reference(s, t, kind="fkl", uld_weight=1.0):
    """Per-row float64 term from the formula: probabilities, rest = 1 - sum, sorted gap."""
    p_s = torch.softmax(s.double() / TEMPERATURE, -1)
    p_t = torch.softmax(t.double() / TEMPERATURE, -1)
    q = torch.cat([p_s[:, STUDENT_IDS], (1 - p_s[:, STUDENT_IDS].sum(-1, keepdim=True)).clamp(min=1e-8)], -1)
    p = torch.cat([p_t[:, TEACHER_IDS], (1 - p_t[:, TEACHER_IDS].sum(-1, keepdim=True)).clamp(min=1e-8)], -1)
    if kind == "fkl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "rkl":
        d = (q * (q.log() - p.log())).sum(-1)
    else:  # tvd
        d = 0.5 * (p - q).abs().sum(-1)
    s_rest = [i for i in range(V_S) if i not in STUDENT_IDS]
    t_rest = [i for i in range(V_T) if i not in TEACHER_IDS]
    a = p_s[:, s_rest].sort(-1, descending=True).values
    b = p_t[:, t_rest].sort(-1, descending=True).values
    width = max(a.size(-1), b.size(-1))
    gap = (F.pad(a, (0, width - a.size(-1))) - F.pad(b, (0, width - b.size(-1)))).abs().sum(-1)
    return TEMPERATURE**2 * (d + uld_weight * gap)


def reference_sum(s_logits, t_logits_flat, lengths, alignment, kind="fkl", uld_weight=1.0):
    real = losses.real_mask(lengths, S).reshape(-1)
    index = alignment.reshape(-1)
    keep = real & (index >= 0)
    rows = reference(s_logits.reshape(-1, V_S)[keep], t_logits_flat[index[keep]], kind, uld_weight)
    return rows.sum()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
@pytest.mark.parametrize("uld_weight", [0.0, 1.0, 2.5])
def test_plain_path_is_the_formula_in_value_and_gradient(kind, uld_weight):
    h, w, t_h, t_w, ids, lengths, alignment = data()
    s_logits = F.linear(h, w).requires_grad_(True)
    t_logits = F.linear(t_h, t_w)
    teacher = AlignedTeacher(LogitsTeacher(t_logits), alignment, vocab())
    spec = KdSpec(kind, TEMPERATURE, uld_weight=uld_weight, cross="pieces")
    got = kd_loss_sum(s_logits, teacher, losses.real_mask(lengths, S), spec)
    got.backward()
    s64 = s_logits.detach().double().requires_grad_(True)
    want = reference_sum(s64, t_logits.reshape(-1, V_T), lengths, alignment, kind, uld_weight)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # padding and unaligned positions get no gradient at all
    dead = ~(losses.real_mask(lengths, S) & (alignment >= 0))
    assert dead.any() and s_logits.grad[dead].abs().max() == 0


def test_the_uld_term_is_there_and_matches_by_rank_not_identity():
    """Permuting the teacher's unshared pieces changes nothing; moving mass between shared ones does."""
    h, w, t_h, t_w, ids, lengths, alignment = data(1)
    s = F.linear(h, w).reshape(-1, V_S)[:3]
    t = F.linear(t_h, t_w).reshape(-1, V_T)[:3]
    rows = losses.Aligned(losses.Logits(t), torch.ones(3, dtype=torch.bool), vocab())
    spec = KdSpec("fkl", TEMPERATURE, cross="pieces")
    base = losses.kd_rows(spec, s, rows)
    unshared = [i for i in range(V_T) if i not in TEACHER_IDS]
    permuted = t.clone()
    permuted[:, unshared] = t[:, unshared[::-1]]
    torch.testing.assert_close(losses.kd_rows(spec, s, rows._replace(inner=losses.Logits(permuted))), base)
    swapped = t.clone()
    swapped[:, [TEACHER_IDS[1], TEACHER_IDS[2]]] = t[:, [TEACHER_IDS[2], TEACHER_IDS[1]]]
    assert not torch.allclose(losses.kd_rows(spec, s, rows._replace(inner=losses.Logits(swapped))), base)
    no_uld = losses.kd_rows(KdSpec("fkl", TEMPERATURE, uld_weight=0.0, cross="pieces"), s, rows)
    assert (base - no_uld).min() > 0


@pytest.mark.parametrize("kind", ["fkl", "jsd", "akl"])
def test_fused_path_equals_the_plain_path(kind):
    h, w, t_h, t_w, ids, lengths, alignment = data(2)
    spec = KdSpec(kind, TEMPERATURE, cross="pieces")
    weights = torch.tensor([0.6, 0.3, 0.0])
    h_f, w_f = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    teacher = AlignedTeacher(HiddenTeacher(t_h, (t_w, None)), alignment, vocab())
    sums = fused_logit_terms(h_f, (w_f, None), ids, lengths, weights, (True, True, False), spec, teacher=teacher,
                             row_chunk=4)
    (1.3 * (weights * sums).sum()).backward()
    h_p, w_p = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    s_logits = F.linear(h_p, w_p)
    mask = losses.real_mask(lengths, S)
    plain_teacher = AlignedTeacher(LogitsTeacher(F.linear(t_h, t_w)), alignment, vocab())
    kd = kd_loss_sum(s_logits, plain_teacher, mask, spec)
    clm = losses.clm_loss_sum(s_logits, ids, mask)
    (1.3 * (weights[0] * kd + weights[1] * clm)).backward()
    torch.testing.assert_close(sums[:2], torch.stack([kd, clm]).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_f.grad, h_p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_f.grad, w_p.grad, rtol=1e-4, atol=1e-6)


def offline_rows(t_logits_flat, alignment, k):
    """What an offline dump stores per student position: the aligned teacher row's top-k at T."""
    index = alignment.reshape(-1).clamp(min=0)
    top = torch.log_softmax(t_logits_flat[index] / TEMPERATURE, -1).topk(k, -1)
    return top.indices.reshape(B, S, k), top.values.reshape(B, S, k)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_offline_with_every_teacher_piece_equals_online(kind):
    h, w, t_h, t_w, ids, lengths, alignment = data(3)
    s_logits = F.linear(h, w)
    t_flat = F.linear(t_h, t_w).reshape(-1, V_T)
    mask = losses.real_mask(lengths, S)
    spec = KdSpec(kind, TEMPERATURE, cross="pieces")
    online = kd_loss_sum(s_logits, AlignedTeacher(LogitsTeacher(t_flat), alignment, vocab()), mask, spec)
    rows = torch.arange(B * S).reshape(B, S).masked_fill(alignment < 0, -1)
    offline = kd_loss_sum(s_logits, AlignedTeacher(TopkTeacher(*offline_rows(t_flat, alignment, V_T)), rows, vocab()),
                          mask, spec)
    assert offline.item() == pytest.approx(online.item(), rel=1e-5)


def test_offline_top_k_puts_the_unkept_mass_in_the_rest_bucket():
    """k < V_T: the buckets are the kept teacher pieces that the student has, plus the rest; the
    student's rest is its mass outside those pieces (written out by hand for one row)."""
    h, w, t_h, t_w, ids, lengths, alignment = data(4)
    s = F.linear(h, w).reshape(-1, V_S)[:1].double()
    t = F.linear(t_h, t_w).reshape(-1, V_T)[:1].double()
    lt = torch.log_softmax(t / TEMPERATURE, -1)
    top = lt.topk(4, -1)
    got = losses.kd_rows(KdSpec("fkl", TEMPERATURE, cross="pieces"), s, losses.Aligned(losses.Topk(top.indices, top.values),
                                                                       torch.ones(1, dtype=torch.bool), vocab()))
    p_s = torch.softmax(s / TEMPERATURE, -1)[0]
    kept = [(int(i), float(v.exp())) for i, v in zip(top.indices[0], top.values[0])]
    pairs = [(STUDENT_IDS[TEACHER_IDS.index(i)], p) for i, p in kept if i in TEACHER_IDS]
    unmatched = sorted((p for i, p in kept if i not in TEACHER_IDS), reverse=True)
    p = [pt for _, pt in pairs] + [1 - sum(pt for _, pt in pairs)]
    q = [float(p_s[i]) for i, _ in pairs] + [1 - sum(float(p_s[i]) for i, _ in pairs)]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    s_unshared = sorted((float(p_s[i]) for i in range(V_S) if i not in STUDENT_IDS), reverse=True)
    b = unmatched + [0.0] * (len(s_unshared) - len(unmatched))
    gap = sum(abs(x - y) for x, y in zip(s_unshared, b))
    assert got.item() == pytest.approx(TEMPERATURE**2 * (kl + gap), rel=1e-6)  # stored log-probs are read as fp32


def test_a_shared_vocabulary_reduces_to_the_same_tokenizer_term():
    """Every piece shared (the identity map) and aligned everywhere: the plain full-vocabulary KD term."""
    h, w, _, _, ids, lengths, _ = data(5)
    s_logits = F.linear(h, w)
    t_logits = s_logits.flip(-1) * 1.5
    mask = losses.real_mask(lengths, S)
    identity = VocabMap.build(range(V_S), range(V_S), V_S, V_S)
    every = torch.arange(B * S).reshape(B, S)
    spec = KdSpec("fkl", TEMPERATURE, cross="pieces")
    cross = kd_loss_sum(s_logits, AlignedTeacher(LogitsTeacher(t_logits), every, identity), mask, spec)
    same = kd_loss_sum(s_logits, t_logits, mask, spec)
    assert cross.item() == pytest.approx(same.item(), rel=1e-5)


# ---- next-character classes (the default, --cross_kd chars) --------------------------------------

STUDENT_CLASS = [0, 2, 3, 2, 4, 1, 5, 3, 6, 2, 1]  # per student id: 0 end, 1 other, 2.. characters
TEACHER_CLASS = [0, 3, 2, 2, 5, 4, 6, 1, 3, 6, 2, 4, 5]
N_CLASSES = 7


def class_vocab():
    return VocabMap.build(STUDENT_IDS, TEACHER_IDS, V_S, V_T, classes=(STUDENT_CLASS, TEACHER_CLASS, N_CLASSES))


def class_reference(s, t, kind="fkl"):
    """float64, by hand: each class's probability summed over its pieces, then the divergence."""
    p_s = torch.softmax(s.double() / TEMPERATURE, -1)
    p_t = torch.softmax(t.double() / TEMPERATURE, -1)
    q = torch.stack([sum(p_s[:, i] for i in range(V_S) if STUDENT_CLASS[i] == c) for c in range(N_CLASSES)], -1)
    p = torch.stack([sum(p_t[:, i] for i in range(V_T) if TEACHER_CLASS[i] == c) for c in range(N_CLASSES)], -1)
    return class_divergence(p, q, kind)


def class_divergence(p, q, kind):
    """T^2 D between the teacher's class probabilities p and the student's q (float64 rows)."""
    if kind == "fkl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "rkl":
        d = (q * (q.log() - p.log())).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return TEMPERATURE**2 * d


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_next_character_term_is_the_formula_in_value_and_gradient(kind):
    h, w, t_h, t_w, ids, lengths, alignment = data(6)
    s_logits = F.linear(h, w).requires_grad_(True)
    t_logits = F.linear(t_h, t_w)
    got = kd_loss_sum(s_logits, AlignedTeacher(LogitsTeacher(t_logits), alignment, class_vocab()),
                      losses.real_mask(lengths, S), KdSpec(kind, TEMPERATURE))
    got.backward()
    s64 = s_logits.detach().double().requires_grad_(True)
    real = losses.real_mask(lengths, S).reshape(-1)
    index = alignment.reshape(-1)
    keep = real & (index >= 0)
    want = class_reference(s64.reshape(-1, V_S)[keep], t_logits.reshape(-1, V_T)[index[keep]], kind).sum()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_next_character_term_ignores_how_a_class_splits_into_pieces():
    """Moving mass between two teacher pieces of one class changes nothing; between classes it does."""
    h, w, t_h, t_w, ids, lengths, alignment = data(7)
    s = F.linear(h, w).reshape(-1, V_S)[:3]
    t = F.linear(t_h, t_w).reshape(-1, V_T)[:3]
    rows = losses.Aligned(losses.Logits(t), torch.ones(3, dtype=torch.bool), class_vocab())
    spec = KdSpec("fkl", TEMPERATURE)
    base = losses.kd_rows(spec, s, rows)
    same_class = t.clone()
    same_class[:, [2, 3]] = t[:, [3, 2]]  # teacher ids 2 and 3 are both class 2
    torch.testing.assert_close(losses.kd_rows(spec, s, rows._replace(inner=losses.Logits(same_class))), base)
    other = t.clone()
    other[:, [1, 2]] = t[:, [2, 1]]  # classes 3 and 2
    assert not torch.allclose(losses.kd_rows(spec, s, rows._replace(inner=losses.Logits(other))), base)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "akl"])
def test_next_character_fused_equals_plain_and_offline_with_every_piece_equals_online(kind):
    h, w, t_h, t_w, ids, lengths, alignment = data(8)
    spec = KdSpec(kind, TEMPERATURE)
    weights = torch.tensor([0.6, 0.3, 0.0])
    h_f, w_f = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    sums = fused_logit_terms(h_f, (w_f, None), ids, lengths, weights, (True, True, False), spec,
                             teacher=AlignedTeacher(HiddenTeacher(t_h, (t_w, None)), alignment, class_vocab()), row_chunk=4)
    (weights * sums).sum().backward()
    h_p, w_p = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    s_logits = F.linear(h_p, w_p)
    mask = losses.real_mask(lengths, S)
    t_flat = F.linear(t_h, t_w).reshape(-1, V_T)
    kd = kd_loss_sum(s_logits, AlignedTeacher(LogitsTeacher(t_flat), alignment, class_vocab()), mask, spec)
    (weights[0] * kd + weights[1] * losses.clm_loss_sum(s_logits, ids, mask)).backward()
    assert sums[0].item() == pytest.approx(kd.item(), rel=1e-5)
    torch.testing.assert_close(h_f.grad, h_p.grad, rtol=1e-4, atol=1e-6)
    rows = torch.arange(B * S).reshape(B, S).masked_fill(alignment < 0, -1)
    offline = kd_loss_sum(s_logits, AlignedTeacher(TopkTeacher(*offline_rows(t_flat, alignment, V_T)), rows,
                                                   class_vocab()), mask, spec)
    assert offline.item() == pytest.approx(kd.item(), rel=1e-4)


def test_next_character_offline_top_k_puts_the_unreached_classes_in_the_rest():
    h, w, t_h, t_w, ids, lengths, alignment = data(9)
    s = F.linear(h, w).reshape(-1, V_S)[:1].double()
    t = F.linear(t_h, t_w).reshape(-1, V_T)[:1].double()
    top = torch.log_softmax(t / TEMPERATURE, -1).topk(4, -1)
    got = losses.kd_rows(KdSpec("fkl", TEMPERATURE), s, losses.Aligned(losses.Topk(top.indices, top.values),
                                                                        torch.ones(1, dtype=torch.bool), class_vocab()))
    p_s = torch.softmax(s / TEMPERATURE, -1)[0]
    t_mass = {}
    for i, v in zip(top.indices[0].tolist(), top.values[0].exp().tolist()):
        t_mass[TEACHER_CLASS[i]] = t_mass.get(TEACHER_CLASS[i], 0.0) + v
    s_mass = {c: sum(float(p_s[i]) for i in range(V_S) if STUDENT_CLASS[i] == c) for c in t_mass}
    p = list(t_mass.values()) + [1 - sum(t_mass.values())]
    q = [s_mass[c] for c in t_mass] + [1 - sum(s_mass.values())]
    assert len(t_mass) < N_CLASSES
    want = TEMPERATURE**2 * sum(a * math.log(a / b) for a, b in zip(p, q))
    assert got.item() == pytest.approx(want, rel=1e-6)


# ---- inside a teacher piece (depth > 0): the teacher's row before it, conditioned on the characters read ----
# Tables for depths 0..2 (distil_ja.alignment.within_piece_tables' layout): DEPTH_PREFIX[k][id] numbers the
# piece's first k characters (-1: shorter than k), DEPTH_CLASS[k][id] the class of its character after them,
# CUT for a piece of exactly k characters (ids 0 and 10 at depth 1, 2 and 6 at depth 2; prefix 2 at depth 2 has none).
CUT = N_CLASSES
DEPTH_PREFIX = [[0] * V_T,
                [1, 0, 0, 1, 0, -1, 1, 2, 0, 1, 2, 2, 0],
                [-1, 0, 1, 1, 0, -1, 0, -1, 2, 1, -1, -1, 0]]
DEPTH_CLASS = [TEACHER_CLASS,
               [CUT, 2, 3, 4, 5, 1, 6, 2, 3, 4, CUT, 5, 6],
               [1, 6, CUT, 2, 3, 1, CUT, 1, 4, 5, 1, 1, 2]]
# DEPTH_CUT[k][id]: the piece that is a longer piece's first k characters (the CUT one of its prefix), or -1
DEPTH_CUT = [[-1] * V_T] + [[next((j for j in range(V_T) if DEPTH_PREFIX[k][j] == g and DEPTH_CLASS[k][j] == CUT), -1)
                             if g >= 0 and DEPTH_CLASS[k][i] != CUT else -1 for i, g in enumerate(DEPTH_PREFIX[k])]
                            for k in (1, 2)]
# per student position (B, S): depth, and the teacher piece after its row (whose prefix the pieces must share)
DEPTHS = torch.tensor([[0, 1, 0, 2, 1, 0], [0, 0, 2, 1, 0, 2]])
NEXT_PIECE = torch.tensor([[3, 3, 4, 9, 11, 1], [5, 2, 8, 7, 0, 12]])


def depth_vocab():
    return VocabMap.build(STUDENT_IDS, TEACHER_IDS, V_S, V_T, classes=(STUDENT_CLASS, TEACHER_CLASS, N_CLASSES),
                          depth_tables=(DEPTH_PREFIX, DEPTH_CLASS, DEPTH_CUT, exact_depths(np.array(DEPTH_CUT))))


def depth_prefixes():
    return torch.tensor([[DEPTH_PREFIX[d][n] for d, n in zip(dr.tolist(), nr.tolist())]
                         for dr, nr in zip(DEPTHS, NEXT_PIECE)])


def depth_data(seed):
    """data(seed) with attached teacher positions: the teacher's batch gets E more columns, one per student
    position inside a piece whose first k characters are a piece (DEPTH_CUT), and `after` points to it."""
    h, w, t_h, t_w, ids, lengths, alignment = data(seed)
    attached = [[p for p in range(S) if alignment[b, p] >= 0 and DEPTH_CUT[DEPTHS[b, p]][NEXT_PIECE[b, p]] >= 0]
                for b in range(B)]
    extra = max(len(a) for a in attached)
    t_h = torch.cat([t_h, torch.randn(B, extra, D_T, generator=torch.Generator().manual_seed(seed + 100)) * 2], 1)
    width = S_T + extra
    alignment = torch.where(alignment >= 0, alignment // S_T * width + alignment % S_T, -1)
    after = torch.full((B, S), -1)
    for b, positions in enumerate(attached):
        for e, p in enumerate(positions):
            after[b, p] = b * width + S_T + e
    return h, w, t_h, t_w, ids, lengths, alignment, after


def depth_reference(s, t, t_after, depths, prefixes, kind="fkl"):
    """float64, by hand: the student's classes as at depth 0; the teacher's, the pieces that carry the row's
    prefix at its depth, each class's mass among those longer than it over the total of all of them, plus
    the share of the piece that ends there (CUT) times the class probability of the row read after it."""
    p_s = torch.softmax(s.double() / TEMPERATURE, -1)
    p_t = torch.softmax(t.double() / TEMPERATURE, -1)
    r = torch.softmax(t_after.double() / TEMPERATURE, -1)
    q = torch.stack([sum(p_s[:, i] for i in range(V_S) if STUDENT_CLASS[i] == c) for c in range(N_CLASSES)], -1)
    r_cls = torch.stack([sum(r[:, i] for i in range(V_T) if TEACHER_CLASS[i] == c) for c in range(N_CLASSES)], -1)
    rows = []
    for n, (k, g) in enumerate(zip(depths.tolist(), prefixes.tolist())):
        members = [i for i in range(V_T) if DEPTH_PREFIX[k][i] == g]
        total = sum(p_t[n, i] for i in members)
        cut = sum((p_t[n, i] for i in members if DEPTH_CLASS[k][i] == CUT), p_t.new_zeros(()))
        rows.append(torch.stack([sum((p_t[n, i] for i in members if DEPTH_CLASS[k][i] == c), p_t.new_zeros(()))
                                 for c in range(N_CLASSES)]) / total + cut / total * r_cls[n])
    return class_divergence(torch.stack(rows).clamp(min=1e-8), q.clamp(min=1e-8), kind)


def test_prefix_of_reads_the_next_teacher_piece_at_its_depth():
    vocab = depth_vocab()
    teacher_ids = torch.randint(0, V_T, (B, S_T), generator=torch.Generator().manual_seed(3))
    alignment = torch.tensor([[0, 2, -1, 3, 5, 5], [7, -1, 9, 10, 12, 12]])
    depth = torch.tensor([[0, 1, 2, 2, 1, 2], [0, 0, 2, 1, 0, 2]])
    got = vocab.prefix_of(teacher_ids, alignment, depth)
    flat = teacher_ids.reshape(-1)
    for p, (a, d) in enumerate(zip(alignment.reshape(-1).tolist(), depth.reshape(-1).tolist())):
        want = 0 if a < 0 or d == 0 else DEPTH_PREFIX[d][int(flat[a + 1])]
        assert got.reshape(-1)[p] == want


def test_exact_at_keeps_depth_one_and_the_deeper_positions_no_shorter_piece_begins():
    """A target at depth k leaves out the ways the teacher writes s that begin with a shorter piece (its first
    a < k characters): exact only where there is none, always at depths 0 and 1."""
    vocab = depth_vocab()
    teacher_ids = torch.tensor([[0, 3, 0, 9, 0, 1, 0, 4]])  # row r's next piece: teacher_ids[r + 1]
    index = torch.tensor([[0, 0, 2, 2, 4, 4, 6, 6]])
    depth = torch.tensor([[0, 1, 1, 2, 1, 2, 1, 2]])
    got = vocab.exact_at(teacher_ids, index, depth)
    # at depth 2: the first character of piece 9 is piece 0; those of pieces 1 and 4 are no piece
    assert DEPTH_CUT[1][9] >= 0 and DEPTH_CUT[1][1] < 0 and DEPTH_CUT[1][4] < 0
    assert got.tolist() == [[True, True, True, False, True, True, True, True]]
    table = vocab.depth_exact
    for k in range(3):
        for i in range(V_T):
            assert table[k, i] == all(DEPTH_CUT[a][i] < 0 for a in range(1, k))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_inside_a_teacher_piece_the_term_is_the_conditioned_formula_in_value_and_gradient(kind):
    h, w, t_h, t_w, ids, lengths, alignment, after = depth_data(10)
    s_logits = F.linear(h, w).requires_grad_(True)
    t_logits = F.linear(t_h, t_w)
    prefixes = depth_prefixes()
    teacher = AlignedTeacher(LogitsTeacher(t_logits), alignment, depth_vocab(), DEPTHS, prefixes, after)
    got = kd_loss_sum(s_logits, teacher, losses.real_mask(lengths, S), KdSpec(kind, TEMPERATURE))
    got.backward()
    s64 = s_logits.detach().double().requires_grad_(True)
    keep = losses.real_mask(lengths, S).reshape(-1) & (alignment.reshape(-1) >= 0)
    t_flat = t_logits.reshape(-1, V_T)
    want = depth_reference(s64.reshape(-1, V_S)[keep], t_flat[alignment.reshape(-1)[keep]],
                           t_flat[after.reshape(-1)[keep].clamp(min=0)], DEPTHS.reshape(-1)[keep],
                           prefixes.reshape(-1)[keep], kind).sum()
    want.backward()
    assert (DEPTHS.reshape(-1)[keep] > 0).sum() >= 4
    assert 2 <= (after.reshape(-1)[keep] >= 0).sum() < (DEPTHS.reshape(-1)[keep] > 0).sum()  # s a piece, and not
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # depth 0 everywhere is the plain next-character term
    zeros = torch.zeros_like(DEPTHS)
    flat = kd_loss_sum(s_logits.detach(), AlignedTeacher(LogitsTeacher(t_logits), alignment, depth_vocab(), zeros,
                                                         zeros, zeros - 1),
                       losses.real_mask(lengths, S), KdSpec(kind, TEMPERATURE))
    plain = kd_loss_sum(s_logits.detach(), AlignedTeacher(LogitsTeacher(t_logits), alignment, class_vocab()),
                        losses.real_mask(lengths, S), KdSpec(kind, TEMPERATURE))
    assert flat.item() == pytest.approx(plain.item(), rel=1e-6) and flat.item() != pytest.approx(got.item(), rel=1e-3)


def conditioned_offline_rows(t_logits_flat, alignment, prefixes, after):
    """The dump's rows with every piece kept (k = 2 V_T), by hand in float64: at a depth, the pieces longer
    than s over the total of those that begin with s, then the row after s times the share of s."""
    n = B * S
    ids, logprobs = torch.zeros(n, 2 * V_T, dtype=torch.long), torch.zeros(n, 2 * V_T)
    for p, (a, d, g, f) in enumerate(zip(alignment.reshape(-1).tolist(), DEPTHS.reshape(-1).tolist(),
                                         prefixes.reshape(-1).tolist(), after.reshape(-1).tolist())):
        if a < 0:
            continue
        p_t = torch.softmax(t_logits_flat[a].double() / TEMPERATURE, -1)
        members = [i for i in range(V_T) if DEPTH_PREFIX[d][i] == g]
        total = sum(p_t[i] for i in members)
        joint = torch.zeros(2 * V_T, dtype=torch.float64)
        for i in members:
            if DEPTH_CLASS[d][i] != CUT:
                joint[i] = p_t[i] / total
        if f >= 0:
            share = sum(p_t[i] for i in members if DEPTH_CLASS[d][i] == CUT) / total
            joint[V_T:] = share * torch.softmax(t_logits_flat[f].double() / TEMPERATURE, -1)
        top = joint.log().float().topk(2 * V_T)
        ids[p], logprobs[p] = top.indices, top.values
    return ids.reshape(B, S, 2 * V_T), logprobs.reshape(B, S, 2 * V_T)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_inside_a_teacher_piece_fused_equals_plain_and_offline_with_every_piece_equals_online(kind):
    h, w, t_h, t_w, ids, lengths, alignment, after = depth_data(11)
    spec, prefixes = KdSpec(kind, TEMPERATURE), depth_prefixes()
    weights = torch.tensor([0.6, 0.3, 0.0])
    h_f, w_f = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    teacher = AlignedTeacher(HiddenTeacher(t_h, (t_w, None)), alignment, depth_vocab(), DEPTHS, prefixes, after)
    sums = fused_logit_terms(h_f, (w_f, None), ids, lengths, weights, (True, True, False), spec, teacher=teacher,
                             row_chunk=4)
    (weights * sums).sum().backward()
    h_p, w_p = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    s_logits = F.linear(h_p, w_p)
    mask = losses.real_mask(lengths, S)
    t_flat = F.linear(t_h, t_w).reshape(-1, V_T)
    kd = kd_loss_sum(s_logits, AlignedTeacher(LogitsTeacher(t_flat), alignment, depth_vocab(), DEPTHS, prefixes,
                                              after), mask, spec)
    (weights[0] * kd + weights[1] * losses.clm_loss_sum(s_logits, ids, mask)).backward()
    assert sums[0].item() == pytest.approx(kd.item(), rel=1e-5)
    torch.testing.assert_close(h_f.grad, h_p.grad, rtol=1e-4, atol=1e-6)
    rows = torch.arange(B * S).reshape(B, S).masked_fill(alignment < 0, -1)
    dumped = TopkTeacher(*conditioned_offline_rows(t_flat, alignment, prefixes, after))
    offline = kd_loss_sum(s_logits, AlignedTeacher(dumped, rows, depth_vocab(), DEPTHS), mask, spec)
    assert offline.item() == pytest.approx(kd.item(), rel=1e-4)


def test_the_dumps_rows_inside_a_teacher_piece_are_the_hand_written_ones():
    """teacher_logits.within_piece_logprobs (what dump_teacher_logits.py stores) against the float64 rows."""
    import teacher_logits

    h, w, t_h, t_w, ids, lengths, alignment, after = depth_data(12)
    t_flat = F.linear(t_h, t_w).reshape(-1, V_T)
    prefixes = depth_prefixes()
    teacher_ids = torch.zeros(t_h.shape[:2], dtype=torch.long)
    flat_ids = teacher_ids.reshape(-1)
    for a, piece in zip(alignment.reshape(-1).tolist(), NEXT_PIECE.reshape(-1).tolist()):
        if a >= 0:
            flat_ids[a + 1] = piece  # the piece after the row, as pad_aligned's batch has it
    keep = alignment.reshape(-1) >= 0
    index, depth = alignment.reshape(-1)[keep], DEPTHS.reshape(-1)[keep]
    got = teacher_logits.within_piece_logprobs(torch.log_softmax(t_flat[index] / TEMPERATURE, -1), t_flat,
                                               depth_vocab(), teacher_ids, index, depth, after.reshape(-1)[keep],
                                               V_T, TEMPERATURE)
    want_ids, want = conditioned_offline_rows(t_flat, alignment, prefixes, after)
    want = torch.full((B * S, 2 * V_T), float("-inf")).scatter(1, want_ids.reshape(B * S, -1), want.reshape(B * S, -1))
    torch.testing.assert_close(got, want[keep], rtol=1e-5, atol=1e-5)
