"""On-policy distillation (--on_policy_fraction): the student writes the answers, the teacher grades them.

For a share of the optimizer steps the student samples a completion of each conversation's prompt, and
the KD term is computed on those sampled tokens against the teacher's distribution there (GKD, Agarwal
et al., 2024; with --kd_loss jsd its generalised JSD). The student then learns where its own mistakes
take it, which off-policy KD on the corpus's answers never shows it.

Everything here is a function of (seed, step, the prompt's tokens), never of a global random state, of
the rank or of the batch a prompt shares: which steps are on-policy (`is_on_policy_step`) and each row's
random draws (`row_uniforms`) are derived from them. So a run resumed from a checkpoint samples what the
uninterrupted run sampled (the "generation RNG" is the step number, which the checkpoint holds), and 2
processes sample what 1 does, whatever rows they share.
"""

import inspect
import zlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (train.py's --gen_* flags)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--gen_temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--gen_top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) samples its completions: a draw of its own, the same on every
    rank and on a resume; fraction 0 never, 1 always."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return bool(np.random.default_rng([seed, step, 0x0B]).random() < fraction)


def row_uniforms(prompt: torch.Tensor, seed: int, step: int, n: int) -> torch.Tensor:
    """n uniform draws in [0, 1) (float64) for one prompt at one step: its own stream, from the prompt's tokens,
    so that no other row, rank or batch changes it. Two equal prompts of one step draw alike."""
    digest = zlib.crc32(prompt.cpu().numpy().astype(np.int64).tobytes())
    return torch.from_numpy(np.random.default_rng([seed, step, digest]).random(n))


def prompts_of(token_ids: torch.Tensor, lengths: torch.Tensor, counted: torch.Tensor) -> list[torch.Tensor]:
    """Each row's prompt: its tokens up to the first assistant token (exclusive), i.e. up to and including the
    first counted position; a row without a counted position has none (None)."""
    prompts = []
    for row in range(token_ids.size(0)):
        where = torch.nonzero(counted[row, : lengths[row]]).flatten()
        prompts.append(None if where.numel() == 0 else token_ids[row, : int(where[0]) + 1])
    return prompts


def sample_next(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One token per row by inverse transform: softmax(logits / temperature), cut to the smallest set of the
    most likely tokens whose mass reaches top_p (nucleus), then the first token whose cumulative mass
    exceeds u times the kept mass. logits (B, V), u (B,) in [0, 1); float64 cumulative sums, so a row's draw
    does not depend on float noise from the batch it is in except within 1e-15 of a boundary."""
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    if sampling.top_p < 1:
        keep = (cumulative - sorted_probs) < sampling.top_p  # the token that crosses top_p is kept
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
        cumulative = sorted_probs.cumsum(-1)
    target = (u.to(cumulative) * cumulative[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cumulative, target, right=True).clamp(max=probs.size(-1) - 1)
    return order.gather(1, pick).squeeze(1)


@torch.no_grad()
def generate(model, prompts: list, sampling: Sampling, stop_ids: set[int], max_positions: int, pad_id: int,
             seed: int, step: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts with the student's sampled completions, as a chat batch: (token_ids (B, S), lengths (B,),
    counted (B, S)), right-padded with pad_id, counted at the positions that predict a sampled token.

    Batched with the model's KV cache: the prompts are left-padded (an attention mask and position ids skip
    the padding), one forward per new token. A row stops after a stop token (kept: the model learns to end)
    or at max_new_tokens or the model context. A row without a prompt (None) comes back as one pad token,
    length 0, nothing counted. The model is put in eval mode (no dropout) and back.
    """
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, sampling, stop_ids, max_positions, pad_id, seed, step, device)
    finally:
        model.train(was_training)


def _generate(model, prompts, sampling, stop_ids, max_positions, pad_id, seed, step, device):
    rows = len(prompts)
    present = [p for p in prompts if p is not None]
    if not present:
        return (torch.full((rows, 1), pad_id, dtype=torch.long, device=device),
                torch.zeros(rows, dtype=torch.long, device=device), torch.zeros(rows, 1, dtype=torch.bool, device=device))
    longest = max(len(p) for p in present)
    budget = max(0, min(sampling.max_new_tokens, max_positions - longest))
    ids = torch.full((rows, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt is not None:
            ids[row, longest - len(prompt):] = prompt.to(device)
            mask[row, longest - len(prompt):] = 1
    uniforms = torch.stack([row_uniforms(p, seed, step, max(budget, 1)) if p is not None else
                            torch.zeros(max(budget, 1), dtype=torch.float64) for p in prompts]).to(device)
    done = torch.tensor([p is None for p in prompts], device=device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    new = torch.full((rows, budget), pad_id, dtype=torch.long, device=device)
    n_new = torch.zeros(rows, dtype=torch.long, device=device)
    cache, keep_last = _forward_names(model)
    past, step_ids, positions = None, ids, (mask.cumsum(1) - 1).clamp(min=0)
    for t in range(budget):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache: past}, **keep_last)
        past = out.get(cache)
        token = sample_next(out.logits[:, -1].float(), uniforms[:, t], sampling)
        token = torch.where(done, pad_id, token)
        new[:, t] = token
        n_new += (~done).long()
        done = done | torch.isin(token, stops)
        if bool(done.all()):
            break
        step_ids = token[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)  # a finished row's pads are never read
    return _as_batch(prompts, new, n_new, pad_id, device)


def _forward_names(model) -> tuple[str, dict]:
    """The KV cache's keyword (transformers 5.2x names it `cache`, earlier ones `past_key_values`), and
    logits_to_keep=1 where the model takes it (only the last position's logits are sampled from)."""
    names = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in names else "past_key_values"), ({"logits_to_keep": 1} if "logits_to_keep" in names
                                                                  else {})


def _as_batch(prompts, new, n_new, pad_id, device):
    """Right-padded prompt + completion rows, and the positions that predict a completion token."""
    lengths = torch.tensor([0 if p is None else len(p) + int(n) for p, n in zip(prompts, n_new)], device=device)
    width = max(int(lengths.max()), 1)
    token_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    counted = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt is None:
            continue
        p, n = len(prompt), int(n_new[row])
        token_ids[row, :p] = prompt.to(device)
        token_ids[row, p : p + n] = new[row, :n]
        counted[row, p - 1 : p + n - 1] = True
    return token_ids, lengths, counted


def end_of_turn_ids(dataset, eos_id: int | None, sample: int = 1000) -> set[int]:
    """The tokens that end the assistant's turns, where sampling stops: the last token of each assistant span
    of the first `sample` sequences (the template's end-of-turn, which binarize.py counts as the assistant's)
    that ends at least a tenth of them, and the tokenizer's eos."""
    ends = {}
    n = min(len(dataset), sample)
    for index in range(n):
        mask = np.asarray(dataset.loss_masks[index]).astype(bool)
        seq = np.asarray(dataset.sequences[index])
        last = np.flatnonzero(mask & ~np.append(mask[1:], False))  # a 1 followed by a 0 (or the end)
        for token in seq[last].tolist():
            ends[token] = ends.get(token, 0) + 1
    total = sum(ends.values())
    stops = {token for token, count in ends.items() if count >= 0.1 * total}
    return stops | ({eos_id} if eos_id is not None else set())
