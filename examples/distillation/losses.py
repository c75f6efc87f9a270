"""Distillation loss terms, each summed over real (non-padding) positions.

Every term is a *sum* over the selected positions, not a mean: the distiller divides by the number
of positions in the whole optimizer step (all micro-batches, all ranks), so the loss of a step does
not depend on how the global batch was split between ranks and accumulation steps.

Positions are selected by masking (`torch.where`), never by gathering the real rows: gathering needs
their count on the host, a device synchronisation, and a different shape for every batch.

Two paths compute the same values:
- the plain one (`--no-fused_loss`): logits of the whole batch, then each term with autograd;
- the fused one (`fused_logit_terms`, the default): the LM-head matmul is done chunk by chunk together
  with the terms and their gradient (for the student's logits and the teacher's), so no
  batch x seq x vocab tensor ever exists; backward only scales the stored gradient.

The teacher's side of the KD term is one object (a `Teacher`): an online teacher's logits or its
final hidden states and head, an offline top-k dump, or either of those aligned to another
tokenizer (`AlignedTeacher`). Both paths ask it for the rows of a chunk of student positions
(`Teacher.chunk`) and compare them with the student's through `kd_rows`; nothing else branches on
which kind it is.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ROW_CHUNK = 4096  # rows per fp32 pass of the plain path
FUSED_ROW_CHUNK = 1024  # rows per chunk of the fused path: 1024 x 32000 x 4 B = 131 MB per fp32 temporary
KD_LOSSES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "taid", "akl")
CROSS_KD = ("chars", "pieces")  # what a KD term between vocabularies compares (cross_kd_rows)
LOGIT_TERMS = ("ce", "clm", "mse")  # the terms computed from logits, in the order of the fused path's sums
TAIL_FLOOR = 1e-8  # least probability of a top-k tail bucket, the teacher's and the student's: log(0) is -inf
# The log-probability given, on both sides, to a bucket that does not exist in a row (a teacher's top-k
# entry without a student counterpart): finite, so no 0 * inf reaches a gradient, and exp() of it is
# exactly 0 in fp32, so the bucket adds nothing to any divergence.
ABSENT = -1e4


@dataclass(frozen=True)
class KdSpec:
    """The KD objective: which divergence, at which temperature, with its mixing parameters.

    Frozen (hashable), so a compiled chunk function sees it as a constant.
    """

    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd: weight of the teacher in the mixture; 0 and 1 are the two KLs (TRL's ends)
    skew: float = 0.1  # skew_fkl / skew_rkl: DistiLLM's alpha
    akl_mu: float = 0.5  # akl: the teacher's probability mass that makes the head (AKL's mu)
    uld_weight: float = 1.0  # cross-tokenizer "pieces": weight of the ULD term on the pieces not shared
    cross: str = "chars"  # cross-tokenizer: next-character distributions, or shared pieces + ULD (CROSS_KD)

    def __post_init__(self):
        """Refuse what no formula below can compute, in one line named by train.py's flag (a usage error there)."""
        if self.kind not in KD_LOSSES:
            raise ValueError(f"unknown KD objective {self.kind!r}; one of {', '.join(KD_LOSSES)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"--kd_beta (jsd's beta) must be in [0, 1], got {self.beta}")
        if not 0 < self.skew < 1:
            raise ValueError(f"--kd_skew (the skew alpha) must be in (0, 1), got {self.skew}")
        if not 0 < self.akl_mu < 1:
            raise ValueError(f"--akl_mu (akl's head mass) must be in (0, 1), got {self.akl_mu}")
        if self.cross not in CROSS_KD:
            raise ValueError(f"--cross_kd must be one of {', '.join(CROSS_KD)}, got {self.cross!r}")
        if not self.uld_weight >= 0 or math.isinf(self.uld_weight):
            raise ValueError(f"--uld_weight must be finite and >= 0, got {self.uld_weight}")


@dataclass(frozen=True)
class TaidSchedule:
    """TAID's interpolation weight t over training (Shing et al., ICLR 2025): loop state, updated once per step.

    The state is one float64 tensor on the device, (t, previous loss, momentum), so the update never
    waits for the device. After optimizer step n (0-based) of N, with J_n that step's KD term (its mean
    over the real positions of the whole global batch, hence the same on every rank):

        delta = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)       relative decrease of the loss
        m     = beta m + (1 - beta) delta                 momentum (0 at the start)
        t     = min(t_end, max(t_start + (t_end - t_start) n / N,  t + alpha sigmoid(m) (1 - t)))

    so t never falls behind the linear path from t_start to t_end, and moves ahead of it while the
    loss falls fast. The first step only records J_0 (t stays t_start), as in the official code; a
    step whose gradients were not finite (skipped) leaves the state alone. alpha = 0 is the linear
    path alone (the official --taid_disable_adaptive).
    """

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4  # the official --taid_alpha: t's rate of adaptive growth
    beta: float = 0.99  # the official --taid_beta: momentum of the relative loss change

    def __post_init__(self):
        if not 0 <= self.t_start <= self.t_end <= 1:
            raise ValueError(f"TAID needs 0 <= --taid_t_start <= --taid_t_end <= 1, got {self.t_start} and {self.t_end}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--taid_alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"--taid_beta must be in [0, 1), got {self.beta}")

    def initial(self, device=None) -> torch.Tensor:
        """(t, previous loss, momentum) before the first step: (t_start, inf, 0)."""
        return torch.tensor([self.t_start, math.inf, 0.0], dtype=torch.float64, device=device)

    def update(self, state, loss, step: int, total_steps: int, finite=None) -> torch.Tensor:
        """The state after step `step` (0-based) of `total_steps`, whose KD term was `loss` (0-dim tensor)."""
        t, previous, momentum = state.unbind()
        loss = loss.to(state.dtype)
        first = torch.isinf(previous)
        momentum_new = self.beta * momentum + (1 - self.beta) * (previous - loss) / (previous + 1e-15)
        momentum_new = torch.where(first, momentum, momentum_new)
        linear = self.t_start + (self.t_end - self.t_start) * step / total_steps
        t_new = (t + self.alpha * torch.sigmoid(momentum_new) * (1 - t)).clamp(min=linear).clamp(max=self.t_end)
        new = torch.stack([torch.where(first, t, t_new), loss, momentum_new])
        keep = torch.isfinite(loss) if finite is None else finite & torch.isfinite(loss)
        return torch.where(keep, new, state)


# ---- the divergences: per-row values from log-probabilities (rows x K) -----------------------


def _kl(log_p, log_q):
    """KL(p || q) per row, with 0 log 0 = 0 (a top-k tail of zero mass)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _mix(log_a, log_b, weight_a: float):
    """log(weight_a * a + (1 - weight_a) * b), computed in log space (0 < weight_a < 1)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _taid_target(log_s, log_t, taid_t):
    """TAID's intermediate teacher: softmax((1 - t) * student + t * teacher) in logit space, the student detached.

    Log-probabilities stand in for logits (a row's constant shift cancels in the softmax), so the same
    formula serves the full vocabulary and the (k + 1) buckets of an offline teacher.
    """
    return torch.log_softmax((1 - taid_t) * log_s.detach() + taid_t * log_t, dim=-1)


def _akl_head_weight(log_s, log_t, mu: float, tail_last: bool):
    """AKL's weight of forward KL per row: g_head / (g_head + g_tail); reverse KL gets the rest.

    Sort the vocabulary by the teacher's probability, largest first; the head is the first token and
    every further one while the teacher's cumulative mass is at most mu; g = sum of |t - s| over the
    head, and over the tail. Both distributions are detached: the weights steer, they are not trained
    (Wu et al., 2024; the authors' get_ratio). `tail_last`: the last column is an offline teacher's tail
    bucket, whose ids all lie below the k kept ones, so it sorts last. Identical rows (no gap): 1/2.
    """
    p_t, p_s = log_t.detach().exp(), log_s.detach().exp()
    key = p_t if not tail_last else torch.cat([p_t[:, :-1], p_t.new_full((p_t.size(0), 1), -1.0)], dim=-1)
    order = key.argsort(dim=-1, descending=True, stable=True)
    p_sorted = p_t.gather(-1, order)
    gap = (p_sorted - p_s.gather(-1, order)).abs()
    first = torch.arange(p_t.size(-1), device=p_t.device) == 0
    head = (p_sorted.cumsum(-1) <= mu) | first
    g_head, g_all = torch.where(head, gap, 0.0).sum(-1), gap.sum(-1)
    return torch.where(g_all > 0, g_head / g_all.clamp(min=torch.finfo(g_all.dtype).tiny), 0.5)


def divergence(spec: KdSpec, log_s, log_t, taid_t=None, tail_last: bool = False):
    """Per-row divergence between the student's (s) and the teacher's (t) distributions.

    fkl       KL(t || s) = sum t log(t / s)                     (Hinton et al.; the upstream example's term)
    rkl       KL(s || t) = sum s log(s / t)                     (mode-seeking; MiniLLM)
    jsd       beta KL(t || m) + (1 - beta) KL(s || m),  m = beta t + (1 - beta) s    (generalised JSD, GKD);
              beta = 0 is KL(t || s) and beta = 1 is KL(s || t), as in TRL (the mixture's limits there are 0)
    skew_fkl  KL(t || a t + (1 - a) s)                          (DistiLLM's skew KL, a = --kd_skew)
    skew_rkl  KL(s || a s + (1 - a) t)                          (DistiLLM's skew reverse KL)
    tvd       1/2 sum |s - t|                                   (total variation distance)
    taid      KL(p || s),  p = softmax((1 - tau) sg(s) + tau t) in logit space, tau = `taid_t` (TaidSchedule),
              sg = stop-gradient                                (TAID, Shing et al., ICLR 2025)
    akl       w KL(t || s) + (1 - w) KL(s || t),  w = g_head / (g_head + g_tail), detached  (AKL, Wu et al., 2024)

    `taid_t`: a 0-dim tensor (taid only); `tail_last`: the last column is an offline teacher's tail bucket (akl).
    """
    kind = spec.kind
    if kind == "fkl" or (kind == "jsd" and spec.beta == 0):
        return _kl(log_t, log_s)
    if kind == "rkl" or (kind == "jsd" and spec.beta == 1):
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _mix(log_t, log_s, spec.beta)
        return spec.beta * _kl(log_t, log_m) + (1 - spec.beta) * _kl(log_s, log_m)
    if kind == "skew_fkl":
        return _kl(log_t, _mix(log_t, log_s, spec.skew))
    if kind == "skew_rkl":
        return _kl(log_s, _mix(log_s, log_t, spec.skew))
    if kind == "tvd":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    if kind == "taid":
        if taid_t is None:
            raise ValueError("taid needs its interpolation weight taid_t (a TaidSchedule's t)")
        return _kl(_taid_target(log_s, log_t, taid_t), log_s)
    if kind == "akl":
        w = _akl_head_weight(log_s, log_t, spec.akl_mu, tail_last)
        return w * _kl(log_t, log_s) + (1 - w) * _kl(log_s, log_t)
    raise ValueError(f"unknown KD objective {kind!r}; one of {', '.join(KD_LOSSES)}")


# ---- what the divergence compares: full vocabulary, or the teacher's top k plus a tail --------


def topk_log_probs(s_logits, topk_ids, topk_logprobs, temperature: float):
    """Student and teacher log-probabilities over k + 1 buckets: the teacher's top-k ids, and the rest.

    The teacher's tail is 1 - (sum of its top-k probabilities), floored at TAIL_FLOOR and renormalised
    with them (stored log-probabilities may round to a sum just above 1); the student's tail is its own
    mass outside those k ids, from a logsumexp over the other ids (no cancellation in 1 - sum), floored
    at TAIL_FLOOR too, not renormalised: when k is the whole vocabulary both tails hold TAIL_FLOOR
    instead of nothing (so fkl's t log(t / s) never meets log 0), and the student's buckets sum to
    1 + 1e-8, which fp32 rounds to 1. Below the floor the student's tail gets no gradient.
    """
    z = s_logits / temperature
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
    s_top = z.gather(-1, topk_ids) - log_norm
    s_tail = torch.logsumexp(z.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - log_norm
    s_tail = s_tail.clamp(min=math.log(TAIL_FLOOR))
    t_top = topk_logprobs.float()
    t_tail = torch.log((1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR))
    t_all = torch.cat([t_top, t_tail], dim=-1)
    return torch.cat([s_top, s_tail], dim=-1), t_all - torch.logsumexp(t_all, dim=-1, keepdim=True)


# ---- the teacher's side: one object, asked for the rows of a chunk of student positions ---------


class Logits(NamedTuple):
    """Rows of teacher logits over the student's vocabulary (fp32)."""

    logits: torch.Tensor


class Hidden(NamedTuple):
    """Rows of teacher final hidden states and its LM head, in the matmul dtype: logits once multiplied."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class Topk(NamedTuple):
    """Rows of an offline teacher: its top-k ids and their log-probabilities at the KD temperature."""

    ids: torch.Tensor
    logprobs: torch.Tensor


class VocabMap(NamedTuple):
    """Two vocabularies' shared pieces (same surface string; special tokens by role), as device tensors.

    student_ids[m] and teacher_ids[m] are the two ids of shared piece m; student_shared (V_s,) and
    teacher_shared (V_t,) mark them; teacher_to_student (V_t,) maps a teacher id to its student id, -1
    where it has none.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_shared: torch.Tensor
    teacher_shared: torch.Tensor
    teacher_to_student: torch.Tensor
    # the next-character class of each id (distil_ja.alignment.next_character_classes), and their number
    student_class: torch.Tensor | None = None
    teacher_class: torch.Tensor | None = None
    n_classes: int = 0
    # inside a teacher piece (distil_ja.alignment.within_piece_tables), each (MAX_DEPTH + 1, V_t): the number
    # of each piece's first k characters (-1: none) and the class of the character after them
    depth_prefix: torch.Tensor | None = None
    depth_class: torch.Tensor | None = None
    # (MAX_DEPTH + 1, V_t) bool: no piece is the piece's first a characters for 0 < a < k (exact_at)
    depth_exact: torch.Tensor | None = None

    @classmethod
    def build(cls, student_ids, teacher_ids, student_vocab: int, teacher_vocab: int, device=None,
              classes=None, depth_tables=None) -> "VocabMap":
        """classes: (student class per id, teacher class per id, number of classes), or None; depth_tables:
        within_piece_tables' (prefix, classes, cut, exact), or None."""
        s_ids = torch.as_tensor(student_ids, dtype=torch.long, device=device)
        t_ids = torch.as_tensor(teacher_ids, dtype=torch.long, device=device)
        s_shared = torch.zeros(student_vocab, dtype=torch.bool, device=device).index_fill_(0, s_ids, True)
        t_shared = torch.zeros(teacher_vocab, dtype=torch.bool, device=device).index_fill_(0, t_ids, True)
        t2s = torch.full((teacher_vocab,), -1, dtype=torch.long, device=device).index_copy_(0, t_ids, s_ids)
        if classes is None:
            return cls(s_ids, t_ids, s_shared, t_shared, t2s)
        s_cls, t_cls, n = classes
        prefix = d_cls = exact = None
        if depth_tables is not None:
            prefix, d_cls, _, exact = (torch.as_tensor(t, dtype=d, device=device) for t, d in
                                       zip(depth_tables, (torch.int32, torch.long, torch.long, torch.bool)))
        return cls(s_ids, t_ids, s_shared, t_shared, t2s, torch.as_tensor(s_cls, dtype=torch.long, device=device),
                   torch.as_tensor(t_cls, dtype=torch.long, device=device), int(n), prefix, d_cls, exact)

    def prefix_of(self, teacher_ids, index, depth):
        """For each student position, the prefix number the teacher's pieces must have at its depth: that of
        the first `depth` characters of the teacher's piece after the row `index` (teacher_ids flattened;
        0 at depth 0, which every piece has). index and depth: the batch's (B, S) alignment and depth."""
        return torch.where((index >= 0) & (depth > 0), self.depth_prefix[depth, next_piece(teacher_ids, index)].long(),
                           0)

    def exact_at(self, teacher_ids, index, depth):
        """Where the KD term's target inside a teacher piece is the teacher's exact next-character
        distribution (char_buckets): at depth 0, and at depth k where no piece is the first a < k characters
        of the teacher's next piece, so that every way the teacher writes s begins with s or a longer piece."""
        return (depth == 0) | self.depth_exact[depth, next_piece(teacher_ids, index)]


def next_piece(teacher_ids, index):
    """The teacher's piece after each row `index` of its batch (teacher_ids flattened; clamped: read only
    where index >= 0)."""
    return teacher_ids.reshape(-1)[(index + 1).clamp(min=0, max=teacher_ids.numel() - 1)]


class Aligned(NamedTuple):
    """Rows of a teacher with another tokenizer, at the student positions of the chunk: `inner` holds the
    teacher's rows (Logits, Hidden or Topk over the teacher's vocabulary) gathered for those positions;
    `aligned` (n,) says which positions have a teacher row (the others count no KD term). With depths
    (--cross_kd chars --within_pieces), `depth` (n,) is 0 where both end at one offset and k where the
    student position ends k characters into the teacher's next piece, `prefix` (n,) the number those k
    characters s have (VocabMap.prefix_of), `after` the teacher's rows read after s where s is a piece
    (`has_after` (n,)): char_buckets. An offline row holds all of it already (depth only)."""

    inner: "Logits | Hidden | Topk"
    aligned: torch.Tensor
    vocab: VocabMap
    depth: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    after: "Logits | Hidden | None" = None
    has_after: torch.Tensor | None = None


class Teacher:
    """The teacher's side of the KD term for one micro-batch of B x S student positions.

    `chunk(rows)` returns the teacher's rows for those student positions (a slice or an index tensor
    of flattened positions): Logits, Hidden, Topk or Aligned. The rows are tensors only, so a compiled
    chunk function sees a NamedTuple of tensors.
    """

    def chunk(self, rows):
        raise NotImplementedError


class LogitsTeacher(Teacher):
    """Whole-batch teacher logits (B, S, V), the plain path's online teacher."""

    def __init__(self, logits):
        self.logits = logits
        self.flat = logits.reshape(-1, logits.size(-1))

    def chunk(self, rows):
        return Logits(self.flat[rows].float())


class HiddenTeacher(Teacher):
    """Final hidden states (B, S, d) and LM head (weight (V, d), bias or None), cast once to `dtype`."""

    def __init__(self, hidden, head, dtype=torch.float32):
        self.flat = hidden.detach().reshape(-1, hidden.size(-1))
        weight, bias = head
        self.weight, self.bias = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)

    def chunk(self, rows):
        return Hidden(self.flat[rows], self.weight, self.bias)


class TopkTeacher(Teacher):
    """An offline teacher's rows: ids and log-probabilities, each (B, S, k)."""

    def __init__(self, ids, logprobs):
        k = ids.size(-1)
        self.ids, self.logprobs = ids.reshape(-1, k), logprobs.reshape(-1, k)

    def chunk(self, rows):
        return Topk(self.ids[rows], self.logprobs[rows])


class AlignedTeacher(Teacher):
    """A teacher with another tokenizer: `inner`'s row index[p] is student position p's, where index[p] >= 0.

    index (B, S) long: for an online teacher, the flattened position of the teacher's own batch that ends
    at the same character offset as student position p (binarize.py --teacher_tokenizer's alignment), or
    at depth k the one before the teacher piece p ends inside; for an offline dump, stored per student
    position, simply p. -1: no teacher row. depth and prefix (B, S) long, or None (aligned positions
    only); after (B, S) long, an online teacher's: the row of the position attached after the first k
    characters of the piece (LmSeqsDataset.pad_aligned), -1 where none is: Aligned.
    """

    def __init__(self, inner: Teacher, index, vocab: VocabMap, depth=None, prefix=None, after=None):
        self.inner, self.index, self.vocab = inner, index.reshape(-1), vocab
        self.depth, self.prefix, self.after = (None if t is None else t.reshape(-1) for t in (depth, prefix, after))

    def chunk(self, rows):
        index = self.index[rows]
        depth, prefix, after = (None if t is None else t[rows] for t in (self.depth, self.prefix, self.after))
        after_rows = None if after is None else self.inner.chunk(after.clamp(min=0))
        return Aligned(self.inner.chunk(index.clamp(min=0)), index >= 0, self.vocab, depth, prefix, after_rows,
                       None if after is None else after >= 0)


def as_teacher(teacher) -> Teacher:
    """A Teacher as it is; a tensor is the teacher's whole-batch logits (LogitsTeacher)."""
    return LogitsTeacher(teacher) if isinstance(teacher, torch.Tensor) else teacher


def materialise(rows, dtype):
    """Hidden rows become Logits (the head matmul in `dtype`, as the teacher's own head would, then fp32)."""
    if isinstance(rows, Hidden):
        t = rows.hidden.to(dtype) @ rows.weight.t()
        return Logits((t if rows.bias is None else t + rows.bias).float())
    if isinstance(rows, Aligned):
        return rows._replace(inner=materialise(rows.inner, dtype),
                             after=None if rows.after is None else materialise(rows.after, dtype))
    return rows


def kd_positions(rows, real):
    """The positions of a chunk whose KD term counts: real ones, and for another tokenizer aligned ones."""
    return real & rows.aligned if isinstance(rows, Aligned) else real


# ---- the KD term of a chunk of rows --------------------------------------------------------


def shared_buckets(log_s, log_t, vocab: VocabMap):
    """Student and teacher log-probabilities over M + 1 buckets: the M shared pieces, and the rest.

    log_s (n, V_s) and log_t (n, V_t) are full log-softmaxes; bucket m is piece m of both vocabularies,
    the last bucket each side's mass on the pieces it does not share, floored at TAIL_FLOOR (a logsumexp,
    no cancellation). Both rows are proper distributions (up to the floor), so every divergence applies.
    """
    floor = math.log(TAIL_FLOOR)
    s_rest = torch.logsumexp(log_s.masked_fill(vocab.student_shared, float("-inf")), -1, keepdim=True)
    t_rest = torch.logsumexp(log_t.masked_fill(vocab.teacher_shared, float("-inf")), -1, keepdim=True)
    return (torch.cat([log_s[:, vocab.student_ids], s_rest.clamp(min=floor)], -1),
            torch.cat([log_t[:, vocab.teacher_ids], t_rest.clamp(min=floor)], -1))


def shared_topk_buckets(log_s, ids, logprobs, vocab: VocabMap):
    """The offline version of shared_buckets: k + 1 buckets, the teacher's top-k ids that have a student
    piece, and the rest (as topk_log_probs does for one vocabulary).

    A top-k entry without a student piece is an absent bucket (ABSENT on both sides) and its mass joins
    the teacher's rest, which is 1 - (sum of the matched top-k probabilities), floored and renormalised;
    the student's rest is its mass outside the matched ids. With k = V_t this equals shared_buckets with
    the absent buckets removed (tested).
    """
    sid = vocab.teacher_to_student[ids]
    matched = sid >= 0
    n, v = log_s.shape
    s_top = torch.where(matched, log_s.gather(-1, sid.clamp(min=0)), ABSENT)
    hole = torch.where(matched, sid, v)  # unmatched entries scatter into a spare column
    outside = torch.cat([log_s, log_s.new_zeros(n, 1)], -1).scatter(-1, hole, float("-inf"))[:, :v]
    s_rest = torch.logsumexp(outside, -1, keepdim=True).clamp(min=math.log(TAIL_FLOOR))
    t_top = torch.where(matched, logprobs.float(), ABSENT)
    t_rest = torch.log((1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR))
    t_all = torch.cat([t_top, t_rest], -1)
    t_all = torch.where(torch.cat([matched, matched.new_ones(n, 1)], -1),
                        t_all - torch.logsumexp(t_all, -1, keepdim=True), ABSENT)
    return torch.cat([s_top, s_rest], -1), t_all


def sorted_gap(p_s, p_t):
    """ULD's term per row: sum_i |a_i - b_i|, a and b the two probability vectors sorted in decreasing
    order, the shorter padded with zeros: the Wasserstein-1 distance between the two distributions when
    pieces are matched by rank, not by identity (Boizard et al., 2024, "Towards cross-tokenizer
    distillation: the Universal Logit Distillation loss")."""
    a = p_s.sort(-1, descending=True).values
    b = p_t.sort(-1, descending=True).values
    width = max(a.size(-1), b.size(-1))
    a, b = F.pad(a, (0, width - a.size(-1))), F.pad(b, (0, width - b.size(-1)))
    return (a - b).abs().sum(-1)


def char_buckets(log_s, rows: Aligned, temperature: float):
    """Student and teacher next-character distributions at a chunk's positions: each class's probability is
    the sum over the pieces in it (VocabMap.student_class / teacher_class), floored at TAIL_FLOOR.

    At depth k > 0 the student position ends k characters into the teacher's next piece, whose first k
    characters are the string s, and the teacher's row (p) is the one before that piece. Of its pieces,
    those that begin with s remain possible (Z, their total): the ones longer than s say what the next
    character is; the one that is s alone ends there, and what follows it is the teacher's row read after
    s (r, rows.after: the position attached after the row before the piece, LmSeqsDataset.pad_aligned):

        p_t(c | s) = sum of p(P) over the pieces P that begin with s, then c  /  Z  +  u r(c),
        u = p(s) / Z,   r(c) = sum of r(piece) over the pieces that begin with c

    (VocabMap.depth_prefix picks the pieces, depth_class their class at k, CUT for s itself; no attached
    row where s is not a piece, and then u = 0). The teacher writes s then c in other ways too, beginning
    with a shorter piece; neither p nor r holds those, so the distiller counts a position only where there
    is none (VocabMap.exact_at: depth 1 in practice). The student's row is its own next-piece distribution
    at the position, classed by first character as at k = 0.

    Online (Logits): every class, and the two rows are proper distributions. Offline (Topk): the classes
    the teacher's top k reach, plus one rest bucket (last) for the teacher's mass outside its top k,
    matched with the student's mass on the classes not reached; the classes not reached are absent
    (ABSENT) on both sides. At depth k the dump holds the top k of the target's pieces themselves: ids
    below V_t the pieces longer than s (p(P) / Z), ids V_t + i piece i of r (u r(i)), classed at depth k
    and at 0. With k = 2 V_t both equal the online rows (tested).
    """
    inner, vocab, depth, n = rows.inner, rows.vocab, rows.depth, log_s.size(0)
    classes = vocab.n_classes
    s_cls = log_s.new_zeros(n, classes).index_add(1, vocab.student_class, log_s.exp())
    if isinstance(inner, Logits):
        p_t = torch.softmax(inner.logits / temperature, dim=-1)
        if depth is None:
            t_cls = p_t.new_zeros(n, classes).index_add(1, vocab.teacher_class, p_t)
        else:
            begins = vocab.depth_prefix[depth] == rows.prefix[:, None]  # (n, V_t): the pieces that begin with s
            t_all = p_t.new_zeros(n, classes + 1).scatter_add(1, vocab.depth_class[depth], p_t * begins)
            t_all = t_all / t_all.sum(-1, keepdim=True).clamp(min=TAIL_FLOOR)
            t_cls = t_all[:, :classes]
            if rows.after is not None:
                r = torch.softmax(rows.after.logits / temperature, dim=-1)
                r_cls = r.new_zeros(n, classes).index_add(1, vocab.teacher_class, r)
                t_cls = t_cls + t_all[:, classes:] * r_cls * rows.has_after[:, None]
        return s_cls.clamp(min=TAIL_FLOOR).log(), t_cls.clamp(min=TAIL_FLOOR).log()
    v_t = vocab.teacher_class.numel()
    own = inner.ids.clamp(max=v_t - 1)
    at_depth = vocab.teacher_class[own] if depth is None else vocab.depth_class[depth[:, None], own]
    # ids from V_t on: a piece of the row read after s (at depth 0 only -inf filler, of no mass)
    t_class = torch.where(inner.ids >= v_t, vocab.teacher_class[(inner.ids - v_t).clamp(min=0)], at_depth)
    # one spare column for CUT: the dump gives the pieces equal to s no mass (they are -inf filler if listed)
    t_cls = log_s.new_zeros(n, classes + 1).scatter_add(1, t_class, inner.logprobs.to(log_s.dtype).exp())[:, :classes]
    reached = t_cls > 0
    s_rest = torch.where(reached, 0.0, s_cls).sum(-1, keepdim=True).clamp(min=TAIL_FLOOR)
    t_rest = (1 - t_cls.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)
    bucket_s = torch.cat([torch.where(reached, s_cls.clamp(min=TAIL_FLOOR).log(), ABSENT), s_rest.log()], -1)
    t_all = torch.cat([torch.where(reached, t_cls.clamp(min=TAIL_FLOOR).log(), ABSENT), t_rest.log()], -1)
    present = torch.cat([reached, reached.new_ones(n, 1)], -1)
    bucket_t = torch.where(present, t_all - torch.logsumexp(t_all, -1, keepdim=True), ABSENT)
    return bucket_s, bucket_t


def cross_kd_rows(spec: KdSpec, s_logits, rows: Aligned, taid_t=None):
    """Per-row KD term between a student and a teacher of different vocabularies, at aligned positions.

    spec.cross "chars" (the default): T^2 D(student's next-character distribution || the teacher's),
    each class the sum of its pieces' probabilities (char_buckets). The probability that the text
    goes on with character c is the same event for both models whatever their pieces, so nothing is
    biased; what is compared is one character ahead.

    spec.cross "pieces":

        T^2 [ D(s_shared || t_shared) + uld_weight * W1(sort(s_unshared), sort(t_unshared)) ]

    D is the spec's divergence over the shared pieces plus one bucket for the rest (shared_buckets,
    or shared_topk_buckets for an offline teacher); W1 is ULD's sorted gap (sorted_gap) between the
    probabilities of the pieces each side does not share (an offline teacher's: its unmatched top-k
    entries, the rest unknown and taken as 0). Shared pieces mean the same next text on both sides,
    so they are compared exactly; the others have no counterpart, so only the shape of their
    distribution is matched, by rank (the hybrid TRL's GOLD documents).
    """
    temperature, vocab, inner = spec.temperature, rows.vocab, rows.inner
    log_s = F.log_softmax(s_logits / temperature, dim=-1)
    if spec.cross == "chars":
        bucket_s, bucket_t = char_buckets(log_s, rows, temperature)
        return divergence(spec, bucket_s, bucket_t, taid_t, tail_last=isinstance(inner, Topk)) * temperature**2
    p_s_unshared = log_s.exp().masked_fill(vocab.student_shared, 0.0)
    if isinstance(inner, Logits):
        log_t = F.log_softmax(inner.logits / temperature, dim=-1)
        bucket_s, bucket_t = shared_buckets(log_s, log_t, vocab)
        p_t_unshared = log_t.exp().masked_fill(vocab.teacher_shared, 0.0)
    else:
        bucket_s, bucket_t = shared_topk_buckets(log_s, inner.ids, inner.logprobs, vocab)
        p_t_unshared = torch.where(vocab.teacher_to_student[inner.ids] < 0, inner.logprobs.float().exp(), 0.0)
    total = divergence(spec, bucket_s, bucket_t, taid_t, tail_last=True)
    if spec.uld_weight > 0:
        total = total + spec.uld_weight * sorted_gap(p_s_unshared, p_t_unshared)
    return total * temperature**2


def kd_rows(spec: KdSpec, s_logits, rows, taid_t=None):
    """Per-row KD term, T^2 * divergence(student_T, teacher_T), against a teacher's rows (Teacher.chunk).

    Logits: over the full vocabulary; Topk: over the teacher's k ids and a tail bucket (topk_log_probs);
    Aligned (another tokenizer): cross_kd_rows. `taid_t` is TAID's interpolation weight (a 0-dim
    tensor, taid only). The T^2 factor keeps the gradient's scale independent of T for the KL family
    (fkl, rkl, jsd, skew_*, taid, akl), whose gradient shrinks as 1/T^2 at large T (Hinton et al.);
    tvd's shrinks as 1/T only, so T^2 makes its gradient grow about in proportion to T (tested): with
    tvd at T != 1, lower --alpha_ce accordingly.
    """
    if isinstance(rows, Aligned):
        return cross_kd_rows(spec, s_logits, rows, taid_t)
    if isinstance(rows, Logits):
        log_s = F.log_softmax(s_logits / spec.temperature, dim=-1)
        log_t = F.log_softmax(rows.logits / spec.temperature, dim=-1)
    elif isinstance(rows, Topk):
        log_s, log_t = topk_log_probs(s_logits, rows.ids, rows.logprobs, spec.temperature)
    else:
        raise TypeError(f"kd_rows needs materialised teacher rows, got {type(rows).__name__}")
    return divergence(spec, log_s, log_t, taid_t, tail_last=isinstance(rows, Topk)) * spec.temperature**2


def clm_rows(s_logits, targets):
    """Per-row next-token cross-entropy, -log softmax(s)[target]."""
    return F.cross_entropy(s_logits, targets, reduction="none")


def mse_rows(s_logits, t_logits):
    """Per-row squared error between student and teacher logits, summed over the vocabulary."""
    return ((s_logits - t_logits) ** 2).sum(-1)


def masked_sum(rows, keep):
    return torch.where(keep, rows, 0.0).sum()


# ---- the plain path: whole-batch logits, autograd --------------------------------------------


def real_mask(lengths, seq_len: int):
    """(B, S) bool: the real (non-padding) positions of right-padded rows."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def predicted_mask(mask):
    """(B, S) bool: real positions whose next token is real too (they have a CLM target)."""
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) & mask


def counted_masks(lengths, seq_len: int, counted=None):
    """(real, pred), (B, S) bool each: the positions the KD, MSE and cosine terms count, and those the
    CLM term counts.

    Without `counted`: every real position, and every real position whose next token is real. With a
    chat corpus's loss mask (`counted[b, i]`: token i + 1 is an assistant token, so position i predicts
    one; LmSeqsDataset.batch_sequences) both are the counted positions: every term then learns only
    where the model must produce the assistant's text, and none where it reads the prompt.
    """
    real = real_mask(lengths, seq_len)
    if counted is None:
        return real, predicted_mask(real)
    counted = counted & predicted_mask(real)
    return counted, counted


def next_tokens(input_ids):
    """(B, S) targets of each position (the last position's is a placeholder, never counted)."""
    return torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)


def _row_chunks(n_rows: int, size: int):
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def kd_loss_sum(s_logits, teacher, mask, spec: KdSpec, taid_t=None):
    """Sum over masked positions (aligned ones, for another tokenizer) of the KD term (kd_rows).

    `teacher`: a Teacher (LogitsTeacher, TopkTeacher, AlignedTeacher), or the teacher's logits
    (B, S, V) as a tensor; `taid_t`: TAID's interpolation weight (taid only).
    """
    teacher = as_teacher(teacher)
    vocab = s_logits.size(-1)
    s_rows, keep = s_logits.reshape(-1, vocab), mask.reshape(-1)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for rows in _row_chunks(s_rows.size(0), ROW_CHUNK):
        t_rows = materialise(teacher.chunk(rows), torch.float32)
        total = total + masked_sum(kd_rows(spec, s_rows[rows].float(), t_rows, taid_t), kd_positions(t_rows, keep[rows]))
    return total


def clm_loss_sum(s_logits, input_ids, mask, pred=None) -> torch.Tensor:
    """Sum of next-token cross-entropy where both the position and its target are real (or, given
    `pred`, at its positions: counted_masks)."""
    vocab = s_logits.size(-1)
    s_rows, targets = s_logits.reshape(-1, vocab), next_tokens(input_ids).reshape(-1)
    keep = (predicted_mask(mask) if pred is None else pred).reshape(-1)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for rows in _row_chunks(s_rows.size(0), ROW_CHUNK):
        total = total + masked_sum(clm_rows(s_rows[rows].float(), targets[rows]), keep[rows])
    return total


def mse_loss_sum(s_logits, t_logits, mask) -> torch.Tensor:
    """Squared error between logits, summed over the vocabulary and masked positions."""
    vocab = s_logits.size(-1)
    s_rows, t_rows, keep = s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab), mask.reshape(-1)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for rows in _row_chunks(s_rows.size(0), ROW_CHUNK):
        total = total + masked_sum(mse_rows(s_rows[rows].float(), t_rows[rows].float()), keep[rows])
    return total


def cos_loss_sum(s_hidden, t_hidden, mask) -> torch.Tensor:
    """Sum over masked positions of 1 - cos(student hidden, teacher hidden)."""
    if s_hidden.size(-1) != t_hidden.size(-1):
        raise ValueError(
            f"alpha_cos needs equal hidden sizes, got student {s_hidden.size(-1)} "
            f"and teacher {t_hidden.size(-1)}; set --alpha_cos 0.0"
        )
    cos = F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)
    return masked_sum(1.0 - cos, mask)


def count_positions(mask: torch.Tensor) -> tuple[int, int]:
    """(real positions, predicted positions) of a (B, S) bool mask (host ints: tests and tools only)."""
    return int(mask.sum()), int(predicted_mask(mask).sum())


# ---- the fused path: LM-head matmul, terms and gradient, chunk by chunk -----------------------


def fkl_clm_mse_rows(s, t, targets, real, pred, weights, temperature: float, taid_t=None):
    """fp32 math of one chunk for the forward-KL objective: (sums of KD, CLM, MSE; d(weighted sum)/ds).

    Hand-written gradients, the formulas of the docstrings of `divergence`, `clm_rows` and `mse_rows`:
    KD = T^2 KL(softmax(t/T) || softmax(s/T)) has gradient T (softmax(s/T) - softmax(t/T));
    CLM = -log softmax(s)[target] has softmax(s) - onehot(target); MSE = sum (s - t)^2 has 2 (s - t).
    `weights` = (w_kd, w_clm, w_mse), a tensor, so that a compiled version does not recompile per step;
    a weight of exactly 0 on the host side means the term is off (its input may be None).
    taid: the teacher's logits become TAID's interpolation (1 - taid_t) s + taid_t t, s held constant,
    so the same KL and gradient are TAID's (`divergence`).
    """
    kd = clm = mse = s.new_zeros(())
    grad = None
    if t is not None:
        if taid_t is not None:
            t = (1 - taid_t) * s + taid_t * t
        ls_t = torch.log_softmax(s / temperature, dim=-1)
        lt_t = torch.log_softmax(t / temperature, dim=-1)
        pt = lt_t.exp()
        kd = masked_sum((pt * (lt_t - ls_t)).sum(-1), real) * temperature**2
        grad = (weights[0] * temperature) * (ls_t.exp() - pt)
    if targets is not None:
        ls = torch.log_softmax(s, dim=-1)
        clm = -masked_sum(ls.gather(1, targets[:, None]).squeeze(1), pred)
        row_w = torch.where(pred, weights[1], 0.0)[:, None]
        g_clm = (ls.exp() * row_w).scatter_add(1, targets[:, None], -row_w)
        grad = g_clm if grad is None else grad + g_clm
    return kd, clm, mse, grad


def logit_terms_rows(spec: KdSpec, s, teacher, t_for_mse, targets, real, pred, weights, taid_t=None):
    """One chunk of rows: (KD sum, CLM sum, MSE sum, gradient of the weighted sum w.r.t. s), fp32.

    `teacher`: the teacher's materialised rows for the KD term (Logits, Topk or Aligned), or None (KD
    off); `t_for_mse`: teacher logits for the MSE term, or None (MSE off); `targets`: None (CLM off).
    Forward KL and TAID (a forward KL to a detached target) against Logits without MSE keep the
    hand-written gradient (fkl_clm_mse_rows, the default and the fastest); every other combination
    differentiates the textbook per-row formulas with torch.func, inside the chunk, so no objective
    needs a second, hand-derived formula.
    """
    if spec.kind in ("fkl", "taid") and t_for_mse is None and (teacher is None or isinstance(teacher, Logits)):
        kd, clm, mse, grad = fkl_clm_mse_rows(s, None if teacher is None else teacher.logits, targets, real, pred,
                                              weights, spec.temperature, taid_t if spec.kind == "taid" else None)
        return kd, clm, mse, torch.where(real[:, None], grad, 0.0)
    kd_real = None if teacher is None else kd_positions(teacher, real)

    def weighted(s_):
        zero = s_.new_zeros(())
        kd = zero if teacher is None else masked_sum(kd_rows(spec, s_, teacher, taid_t), kd_real)
        clm = zero if targets is None else masked_sum(clm_rows(s_, targets), pred)
        mse = zero if t_for_mse is None else masked_sum(mse_rows(s_, t_for_mse), real)
        return weights[0] * kd + weights[1] * clm + weights[2] * mse, (kd, clm, mse)

    grad, (kd, clm, mse) = torch.func.grad(weighted, has_aux=True)(s)
    return kd, clm, mse, torch.where(real[:, None], grad, 0.0)


def fused_chunk(spec: KdSpec, dtype, h, head, teacher, targets, real, pred, weights, taid_t, enabled):
    """One row chunk: logits from hidden states, the terms, and the gradients for h and the head.

    head = (weight, bias or None) in `dtype`; teacher = the teacher's rows of the chunk (Teacher.chunk:
    Hidden rows are multiplied here) or None; enabled = (KD, CLM, MSE) host booleans. The matmuls run in
    `dtype` (the autocast dtype, as the model's own LM head would) and the loss math in fp32. Returns
    (sums (3,), grad_h, grad_w, grad_bias or None).
    """
    want_kd, want_clm, want_mse = enabled
    w, bias = head
    s_logits = h.to(dtype) @ w.t()
    if bias is not None:
        s_logits = s_logits + bias
    s = s_logits.float()
    teacher = None if teacher is None or not (want_kd or want_mse) else materialise(teacher, dtype)
    kd, clm, mse, g = logit_terms_rows(spec, s, teacher if want_kd else None, teacher.logits if want_mse else None,
                                       targets if want_clm else None, real, pred, weights, taid_t)
    g = g.to(dtype)
    grad_h = g @ w
    grad_w = g.t() @ h.to(dtype)
    grad_bias = g.sum(0) if bias is not None else None
    return torch.stack([kd, clm, mse]), grad_h, grad_w, grad_bias


class FusedLogitTerms(torch.autograd.Function):
    """(KD, CLM, MSE) sums over real (or counted) positions from hidden states and LM heads, gradient computed
    in forward.

    The gradients for the student's hidden states, head weight and bias are accumulated chunk by chunk
    while the terms are computed and kept for backward (hidden-state sized, and one fp32 head-sized
    buffer); the logits of a chunk are dropped as soon as its gradient is taken. One combined gradient
    is stored, so the caller's loss must use the sums as c * (weights . sums) for some scalar c (world
    size, loss scale, normalisation: anything); backward reads c off the incoming gradient of the first
    enabled term, on the device (no host synchronisation).
    """

    @staticmethod
    def forward(ctx, h, w, bias, input_ids, lengths, weights, taid_t, teacher, counted, config):
        spec, dtype, row_chunk, chunk_fn, enabled = config
        batch, seq, width = h.shape
        real, pred = (m.reshape(-1) for m in counted_masks(lengths, seq, counted))
        targets = next_tokens(input_ids).reshape(-1)
        flat = h.detach().reshape(-1, width)
        grad_h = torch.empty_like(flat)
        grad_w = torch.zeros_like(w, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        sums = torch.zeros(3, dtype=torch.float32, device=h.device)
        head = (w.detach().to(dtype), None if bias is None else bias.detach().to(dtype))  # cast once, not per chunk
        with torch.autocast(h.device.type, enabled=False):
            for rows in _row_chunks(flat.size(0), row_chunk):
                out, g_h, g_w, g_b = chunk_fn(
                    spec, dtype, flat[rows], head, None if teacher is None else teacher.chunk(rows),
                    targets[rows], real[rows], pred[rows], weights, taid_t, enabled)
                sums += out
                grad_h[rows] = g_h
                grad_w += g_w
                if g_b is not None:
                    grad_bias += g_b
        ctx.grads = (grad_h.view(batch, seq, width), grad_w, grad_bias)
        ctx.first = enabled.index(True)
        ctx.save_for_backward(weights)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        (weights,) = ctx.saved_tensors
        c = grad_sums[ctx.first] / weights[ctx.first]
        grad_h, grad_w, grad_bias = (None if g is None else g.mul_(c.to(g.dtype)) for g in ctx.grads)
        del ctx.grads
        return grad_h, grad_w, grad_bias, None, None, None, None, None, None, None


def fused_logit_terms(h, head, input_ids, lengths, weights, enabled, spec: KdSpec, teacher: Teacher | None = None,
                      taid_t=None, dtype=torch.float32, chunk_fn=fused_chunk, row_chunk=FUSED_ROW_CHUNK,
                      counted=None):
    """(KD, CLM, MSE) sums of a micro-batch from final hidden states, without B x S x V logits.

    h: the student's final hidden states (B, S, d); head: (weight (V, d), bias or None) of its LM head.
    teacher: the teacher's side (a Teacher: HiddenTeacher for an online teacher, its head cut to the
    student's V rows; TopkTeacher for an offline one; AlignedTeacher for another tokenizer), or None
    when neither KD nor MSE is on. taid_t: TAID's interpolation weight, a 0-dim float32 tensor (taid
    only; a tensor, so a compiled chunk does not recompile as it moves). weights: float32 tensor (3,),
    the loss weights of the terms (see FusedLogitTerms for how the caller must use them); enabled:
    three host booleans saying which terms are on (an off term is returned as 0). counted: a chat
    corpus's (B, S) bool loss mask (counted_masks), or None (every real position counts).
    """
    if not any(enabled):
        raise ValueError("fused_logit_terms needs at least one term")
    if (enabled[0] or enabled[2]) and teacher is None:
        raise ValueError("the KD and MSE terms need a teacher")
    config = (spec, dtype, row_chunk, chunk_fn, tuple(bool(e) for e in enabled))
    return FusedLogitTerms.apply(h, head[0], head[1], input_ids, lengths, weights, taid_t, teacher, counted, config)
