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
