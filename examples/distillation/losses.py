"""Distillation loss terms, each summed over real (non-padding) positions.

Every function returns a *sum* over the selected positions, not a mean: the
distiller divides by the number of positions in the whole optimizer step
(all micro-batches, all ranks), so the loss of a step does not depend on how
the global batch was split between ranks and accumulation steps.

Logits are gathered to the selected rows first and processed in row chunks in
float32, so no full batch x seq x vocab float32 copy is ever made.
"""

import torch
import torch.nn.functional as F

ROW_CHUNK = 4096


def _chunks(n_rows: int):
    for start in range(0, n_rows, ROW_CHUNK):
        yield slice(start, min(start + ROW_CHUNK, n_rows))


def select_rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, D) tensor, (B, S) bool mask -> (N, D) rows where mask is True."""
    flat_index = mask.reshape(-1).nonzero().squeeze(1)
    return tensor.reshape(-1, tensor.size(-1)).index_select(0, flat_index)


def kd_loss_sum(s_logits, t_logits, mask, temperature: float) -> torch.Tensor:
    """Sum over masked positions of KL(teacher_T || student_T) * T^2."""
    s_rows, t_rows = select_rows(s_logits, mask), select_rows(t_logits, mask)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for rows in _chunks(s_rows.size(0)):
        s_logp = F.log_softmax(s_rows[rows].float() / temperature, dim=-1)
        t_logp = F.log_softmax(t_rows[rows].float() / temperature, dim=-1)
        total = total + F.kl_div(s_logp, t_logp, reduction="sum", log_target=True)
    return total * temperature**2


def clm_loss_sum(s_logits, input_ids, mask) -> torch.Tensor:
    """Sum of next-token cross-entropy where both the position and its target are real."""
    pred_mask = mask[:, :-1] & mask[:, 1:]
    rows = select_rows(s_logits[:, :-1], pred_mask)
    targets = input_ids[:, 1:][pred_mask]
    total = s_logits.new_zeros((), dtype=torch.float32)
    for part in _chunks(rows.size(0)):
        total = total + F.cross_entropy(rows[part].float(), targets[part], reduction="sum")
    return total


def mse_loss_sum(s_logits, t_logits, mask) -> torch.Tensor:
    """Squared error between logits, summed over the vocabulary and masked positions."""
    s_rows, t_rows = select_rows(s_logits, mask), select_rows(t_logits, mask)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for rows in _chunks(s_rows.size(0)):
        total = total + F.mse_loss(s_rows[rows].float(), t_rows[rows].float(), reduction="sum")
    return total


def cos_loss_sum(s_hidden, t_hidden, mask) -> torch.Tensor:
    """Sum over masked positions of 1 - cos(student hidden, teacher hidden)."""
    if s_hidden.size(-1) != t_hidden.size(-1):
        raise ValueError(
            f"alpha_cos needs equal hidden sizes, got student {s_hidden.size(-1)} "
            f"and teacher {t_hidden.size(-1)}; set --alpha_cos 0.0"
        )
    s_rows, t_rows = select_rows(s_hidden, mask).float(), select_rows(t_hidden, mask).float()
    return (1.0 - F.cosine_similarity(s_rows, t_rows, dim=-1)).sum()


def count_positions(mask: torch.Tensor) -> tuple[int, int]:
    """(real positions, predicted positions) of a (B, S) bool mask."""
    n_real = int(mask.sum())
    n_pred = int((mask[:, :-1] & mask[:, 1:]).sum())
    return n_real, n_pred


# ---- fused KD + CE: loss and gradient in one pass over the logits ----------------------------

FUSED_ROW_CHUNK = 1024  # rows of fp32 temporaries per chunk: 1024 x 32000 x 4 B = 131 MB each


def fused_rows(s_rows, t_rows, targets, has_target, weights, temperature: float, want_kd: bool, want_clm: bool):
    """fp32 math on one chunk of real rows: (KD sum, CLM sum, a*dKD/ds + b*dCLM/ds).

    `weights` is a float32 tensor [a, b] (a tensor, so a compiled version of this function does
    not recompile when the ratio changes); `has_target` is 1.0 where the row has a real next
    token. KD = T^2 * KL(softmax(t/T) || softmax(s/T)), whose gradient is T * (softmax(s/T) - softmax(t/T));
    CLM = -log softmax(s)[target], whose gradient is softmax(s) - onehot(target).
    """
    s = s_rows.float()
    kd = clm = s.new_zeros(())
    grad = None
    if want_kd:
        ls_t = torch.log_softmax(s / temperature, dim=-1)
        lt_t = torch.log_softmax(t_rows.float() / temperature, dim=-1)
        pt = lt_t.exp()
        kd = (pt * (lt_t - ls_t)).sum() * temperature**2
        grad = (weights[0] * temperature) * (ls_t.exp() - pt)
    if want_clm:
        ls = torch.log_softmax(s, dim=-1)
        clm = -(ls.gather(1, targets[:, None]).squeeze(1) * has_target).sum()
        row_w = (weights[1] * has_target)[:, None]
        g_clm = ls.exp() * row_w
        g_clm = g_clm.scatter_add(1, targets[:, None], -row_w)
        grad = g_clm if grad is None else grad + g_clm
    return kd, clm, grad


class KdClmFused(torch.autograd.Function):
    """(KD sum, CLM sum) over real positions, with the gradient computed in the forward pass.

    The gradient w.r.t. the student logits is computed chunk by chunk while the losses are, and
    kept in the logits' dtype, so backward needs no fp32 batch x seq x vocab tensor. One combined
    gradient is stored, which assumes the caller's loss uses the two outputs as
    c * (w_ce * kd_sum + w_clm * clm_sum) for some c (any scalar: world size, loss scale,
    normalisation): `w_ce`, `w_clm` fix the ratio, backward recovers c from the incoming gradient.
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, input_ids, mask, temperature, w_ce, w_clm, chunk_fn, row_chunk):
        batch, seq, vocab = s_logits.shape
        want_kd, want_clm = w_ce > 0, w_clm > 0
        w_max = max(w_ce, w_clm)
        weights = torch.tensor([w_ce / w_max, w_clm / w_max], dtype=torch.float32, device=s_logits.device)
        flat_s = s_logits.detach().reshape(-1, vocab)
        flat_t = t_logits.detach().reshape(-1, vocab) if want_kd else None
        no_next = torch.zeros_like(mask[:, :1])
        has_next = torch.cat([mask[:, :-1] & mask[:, 1:], no_next], dim=1).reshape(-1)
        targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)
        rows = mask.reshape(-1).nonzero().squeeze(1)
        grad = torch.zeros_like(flat_s)
        kd_sum = clm_sum = s_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.numel(), row_chunk):
            idx = rows[start : start + row_chunk]
            kd, clm, g = chunk_fn(
                flat_s.index_select(0, idx), flat_t.index_select(0, idx) if want_kd else None,
                targets.index_select(0, idx), has_next.index_select(0, idx).float(), weights,
                temperature, want_kd, want_clm,
            )
            kd_sum, clm_sum = kd_sum + kd, clm_sum + clm
            grad.index_copy_(0, idx, g.to(grad.dtype))
        ctx.grad, ctx.shape, ctx.w = grad, s_logits.shape, (w_ce, w_clm, w_max)
        return kd_sum, clm_sum

    @staticmethod
    def backward(ctx, grad_kd, grad_clm):
        w_ce, w_clm, w_max = ctx.w
        c = grad_kd / w_ce if w_ce > 0 else grad_clm / w_clm
        grad = ctx.grad.mul_(float(c) * w_max).view(ctx.shape)  # one sync per micro-batch; exact scale
        del ctx.grad
        return grad, None, None, None, None, None, None, None, None


def kd_clm_loss_sums(s_logits, t_logits, input_ids, mask, temperature: float, w_ce: float, w_clm: float,
                     chunk_fn=fused_rows, row_chunk: int = FUSED_ROW_CHUNK):
    """Fused kd_loss_sum and clm_loss_sum (same values); see KdClmFused for how the weights are used.

    Set w_ce (or w_clm) to 0 to skip that term (it is then returned as 0).
    """
    if w_ce <= 0 and w_clm <= 0:
        raise ValueError("kd_clm_loss_sums needs w_ce > 0 or w_clm > 0")
    return KdClmFused.apply(s_logits, t_logits, input_ids, mask, float(temperature), float(w_ce), float(w_clm),
                            chunk_fn, row_chunk)
