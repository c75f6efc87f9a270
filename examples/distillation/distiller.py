"""The training loop: a frozen teacher, a student, and the weighted sum of the loss terms."""

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import losses
import models
import on_policy
from config import amp_dtype, kd_spec, sampling, taid_schedule
from distil_ja.cli import TrainingError, UsageError
from grouped_batch_sampler import GroupedBatchSampler, SkippingBatchSampler, length_groups
from lm_seqs_dataset import LmSeqsDataset
from losses import (LOGIT_TERMS, clm_loss_sum, cos_loss_sum, counted_masks, fused_logit_terms, kd_loss_sum,
                    mse_loss_sum)
from perplexity import held_out_scores
from records import LOSS_TERMS
from sharding import is_sharded
from tasks import shared_task_scores
from training_log import TrainingLog
from utils import Runtime, inject_fault

logger = logging.getLogger("distillation")

# Loop state saved in checkpoints, beside the weights and optimizer.
LOOP_STATE = ("epoch", "batches_done", "n_steps", "n_nonfinite", "n_skipped", "tokens_seen", "eval_history",
              "taid_state")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices only: biases and every LayerNorm weight (GPT-2's ln_1, ln_2, ln_f) are 1-D."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _no_padding_check(input_ids, attention_mask):
    return None


class HiddenStates(torch.nn.Module):
    """A causal LM without its head: its final (post-norm) hidden states.

    DDP and torch.compile wrap this, not the LM, so the forward never computes the B x S x V logits:
    the loss applies the head (`head_of`) chunk by chunk. The head's weight is the LM's own parameter
    (GPT-2 ties it to the embedding), so it is trained, all-reduced and saved as before. `projection`,
    the student's learned map to the teacher's width for --alpha_cos, is held here for the same reason
    (DDP all-reduces what its module holds); the loss applies it.
    """

    def __init__(self, lm, projection=None):
        super().__init__()
        self.lm = lm
        self.projection = projection
        # transformers looks for padding in every eager forward without a mask by reading the ids on
        # the host, a device synchronisation per forward. Right padding of causal rows is on purpose here.
        lm.base_model.warn_if_padding_and_no_attention_mask = _no_padding_check

    def forward(self, input_ids, attach=None):
        """attach (B, E): the last E columns of input_ids are attached positions (models.attached_rows)."""
        if attach is None or attach.size(1) == 0:
            return self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        mask, positions = models.attached_rows(input_ids.size(1) - attach.size(1), attach, self.lm.dtype)
        return self.lm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state


def head_of(lm, vocab_size: int):
    """(weight, bias or None) of the LM head, cut to the first `vocab_size` rows (a padded teacher)."""
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UsageError(f"{type(lm).__name__}: the LM head is a {type(head).__name__}, not a linear layer")
    bias = None if head.bias is None else head.bias[:vocab_size]
    return head.weight[:vocab_size], bias


class TeacherSide(NamedTuple):
    """A batch's teacher side for a teacher of another tokenizer (LmSeqsDataset.pad_aligned): its ids with
    the attached positions (attach) last, per student position the aligned teacher position, the depth
    into the teacher's next piece and the attached position read after the characters so far (after)."""

    teacher_ids: torch.Tensor
    alignment: torch.Tensor
    depth: torch.Tensor | None
    attach: torch.Tensor
    after: torch.Tensor


@dataclass
class PendingStep:
    """What the host learns of a step once the device has done it: read one step late (see settle)."""

    step: int
    flags: torch.Tensor  # host copy of (finite, real tokens), possibly still in flight
    grad_norm: torch.Tensor  # on the device
    done: object  # a CUDA event after the copy, or None on the CPU


class Distiller:
    """Trains `student` to match `teacher` (and the data) on `dataset`; params is train.py's config."""

    def __init__(self, params, runtime: Runtime, dataset: LmSeqsDataset, student, teacher=None, eval_sequences=None,
                 eval_tasks=(), cross=None):
        self.params = params
        self.runtime = runtime
        self.device = runtime.device
        self.dump_path = Path(params.dump_path)
        self.dataset = dataset
        self.masked = dataset.loss_masks is not None  # a chat corpus: the loss counts assistant positions only
        self.teacher = teacher
        self.eval_sequences = eval_sequences  # held-out sequences and their text's size (--eval_data: EvalData)
        self.eval_tasks = list(eval_tasks)  # tasks.TaskData (--eval_tasks)
        self.evaluates = eval_sequences is not None or bool(self.eval_tasks)
        self.eval_history = []
        self.alphas = {"ce": params.alpha_ce, "clm": params.alpha_clm, "mse": params.alpha_mse, "cos": params.alpha_cos}
        self.kd = kd_spec(params)
        # --kd_loss taid: t, the previous loss and the momentum on the device (losses.TaidSchedule)
        self.taid = taid_schedule(params) if self.alphas["ce"] > 0 else None
        self.taid_state = None if self.taid is None else self.taid.initial(self.device)
        self.step_taid_t = None  # the t of the current step (float32, on the device)
        self.amp_dtype = amp_dtype(params.precision)
        self.fused_loss = params.fused_loss  # head matmul, logit terms and their gradient in one chunked pass
        self.chunk_fn = losses.fused_chunk
        self.vocab_size = student.config.vocab_size
        # A teacher of another tokenizer (train.CrossTokenizer): the shared pieces on the device, and the
        # teacher's vocabulary (its head cut to its tokenizer). The batches then carry the teacher's ids and
        # the alignment (LmSeqsDataset.batch_sequences); the KD term counts aligned positions only.
        self.cross = cross
        self.vocab_map = None if cross is None else losses.VocabMap.build(
            cross.student_ids, cross.teacher_ids, self.vocab_size, cross.teacher_vocab_size, self.device,
            classes=cross.classes, depth_tables=cross.depth_tables)
        # The weights of the terms, in LOSS_TERMS order, on the device once: a step divides them by its
        # position counts there, so no step copies host values to the device (each copy would be a sync).
        self.alpha_vector = torch.tensor([self.alphas[k] for k in LOSS_TERMS], dtype=torch.float32,
                                         device=self.device)
        # --on_policy_fraction: the share of steps whose answers the student samples (on_policy.py); on those
        # steps the CLM term is off (the student's own samples are not data) and the KD term grades its answers.
        self.on_policy_fraction = params.on_policy_fraction
        self.sampling = sampling(params)
        self.stop_ids = on_policy.end_of_turn_ids(dataset, student.config.eos_token_id) if \
            self.on_policy_fraction > 0 else set()
        self.step_on_policy = False
        self._build_data(params, runtime, dataset)
        self._build_optimization(params, runtime, student)

        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch consumed (the same on every rank)
        self.n_steps = 0
        self.n_nonfinite = 0  # consecutive steps with non-finite gradients
        self.n_skipped = 0
        self.tokens_seen = 0
        self.pending: list[PendingStep] = []  # steps the host has not read back yet
        self.last_checkpoint_step = None
        self.last_grad_norm = None  # of the last finite step, for a log line written at the end
        self.log = TrainingLog(self.dump_path, runtime, self.alphas, plots=params.plots)

    def _build_data(self, params, runtime, dataset):
        self.sampler = DistributedSampler(
            dataset, num_replicas=runtime.world_size, rank=runtime.global_rank, shuffle=True, seed=params.seed
        )
        if params.group_by_size:
            batch_sampler = GroupedBatchSampler(self.sampler, length_groups(dataset.lengths), params.batch_size)
        else:
            batch_sampler = BatchSampler(self.sampler, params.batch_size, drop_last=False)
        self.batch_sampler = SkippingBatchSampler(batch_sampler)
        # Padded to --pad_multiple in the collate itself (before pinning, so the copy stays asynchronous).
        # An online teacher of another tokenizer reads, inside its pieces, the attached positions (pad_aligned)
        online_depths = self.teacher is not None and self.cross is not None and self.cross.depth_tables is not None
        collate = functools.partial(dataset.batch_sequences, multiple=params.pad_multiple,
                                    within=self.cross.depth_tables[2:] if online_depths else None)
        # Items hold no randomness, so worker processes change nothing in the batches (exact resume holds).
        self.dataloader = DataLoader(
            dataset, batch_sampler=self.batch_sampler, collate_fn=collate,
            pin_memory=self.device.type == "cuda", num_workers=params.num_workers,
            prefetch_factor=4 if params.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(params.seed),  # else each new iterator draws from the global RNG
        )
        self.batches_per_epoch = micro_batches = len(batch_sampler)
        steps_per_epoch = math.ceil(micro_batches / params.gradient_accumulation_steps)
        self.total_steps = params.max_steps if params.max_steps > 0 else steps_per_epoch * params.n_epoch
        logger.info(
            "%d micro-batches per epoch per rank, %d optimizer steps per epoch, %d steps over %d epoch(s)",
            micro_batches, steps_per_epoch, self.total_steps, math.ceil(self.total_steps / steps_per_epoch),
        )

    def _build_optimization(self, params, runtime, student):
        student.to(self.device)
        if params.freeze_pos_embs:
            models.position_embeddings(student).weight.requires_grad_(False)
        self.cos_projection = None
        width = student.config.hidden_size
        t_width = None if self.teacher is None else self.teacher.config.hidden_size
        if self.alphas["cos"] > 0 and t_width is not None and t_width != width:
            # Widths differ: a learned linear map of the student's last hidden state to the teacher's width.
            # Trained with the student, saved in checkpoints, not part of the student (export drops it).
            self.cos_projection = torch.nn.Linear(width, t_width, bias=False).to(self.device)
            logger.info("--alpha_cos: a learned %d -> %d projection of the student's last hidden state", width, t_width)
        self.raw = student
        self.student = HiddenStates(student, self.cos_projection)
        # fused: one kernel per step, and it reads the skip flag (found_inf) on the device.
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, params.weight_decay), lr=params.learning_rate, eps=params.adam_epsilon,
            betas=(0.9, 0.98), fused=True,
        )
        warmup_steps = math.ceil(self.total_steps * params.warmup_prop)
        self.scheduler = linear_warmup_decay(self.optimizer, warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=params.precision == "fp16")
        if runtime.is_distributed:
            ids = [runtime.local_rank] if self.device.type == "cuda" else None
            self.student = DistributedDataParallel(self.student, device_ids=ids, output_device=ids and ids[0])
        self.teacher_body = None
        sharded_teacher = self.teacher is not None and is_sharded(self.teacher)  # train.py placed it (sharding.py)
        if self.teacher is not None:
            if not sharded_teacher:
                self.teacher.to(self.device)
            self.teacher_body = HiddenStates(self.teacher)
        if params.compile:
            # In place (nn.Module.compile): state_dict keys, DDP and checkpoints are unchanged.
            mode = params.compile_mode
            (self.student.module if runtime.is_distributed else self.student).compile(mode=mode)
            if self.teacher_body is not None and not sharded_teacher:  # FSDP2's hooks break the graph at every block
                self.teacher_body.compile(mode=mode)
            # CUDA graphs (reduce-overhead) would recycle the chunk's outputs while they are accumulated.
            # Shapes: static for the first (the full 1024-row chunk), dynamic from the second on (remainders).
            self.chunk_fn = torch.compile(losses.fused_chunk, mode=None if mode == "reduce-overhead" else mode)

    # ---- loss of one micro-batch ----------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss_sums(self, token_ids: torch.Tensor, lengths: torch.Tensor, *rest) -> dict[str, torch.Tensor]:
        """Summed (not averaged) loss terms of one micro-batch, over real positions only (with a chat
        corpus's loss masks, over the counted ones: losses.counted_masks).

        `rest`: what the batch carries beside the ids (LmSeqsDataset.batch_sequences): the counted positions
        with loss masks, then for the teacher: nothing (online teacher, or none), (topk_ids, topk_logprobs)
        (offline), a TeacherSide's five (another tokenizer), or both (another tokenizer, offline).
        Padding is on the right and attention is
        causal, so no real position can attend to padding: the models run without an attention mask,
        which keeps SDPA on its fused causal kernels (but for a teacher with attached positions, whose
        4-D mask models.attached_rows builds). They return final hidden states; the logit terms
        apply the heads (fused: chunk by chunk). The loss weights of this step are `self.step_weights`
        (set by optimize_step).
        """
        want = {k: self.alphas[k] > 0 and not (self.step_on_policy and k == "clm") for k in LOSS_TERMS}
        counted, side, topk = self.split_batch(rest)
        with self.autocast():
            s_hidden = self.student(token_ids)
            t_hidden = None
            if self.teacher_body is not None:
                with torch.no_grad():
                    t_hidden = self.teacher_body(token_ids) if side is None else \
                        self.teacher_body(side.teacher_ids, side.attach)
        head = head_of(self.raw, self.vocab_size)
        sums = {}
        if want["ce"] or want["clm"] or want["mse"]:
            plain = not self.fused_loss
            teacher = self.teacher_side(t_hidden, side, topk, want, self.amp_dtype or torch.float32, plain)
            if not plain:
                enabled = (want["ce"], want["clm"], want["mse"])
                out = fused_logit_terms(  # LOSS_TERMS begins with LOGIT_TERMS: the weights line up
                    s_hidden, head, token_ids, lengths, self.step_weights[:len(LOGIT_TERMS)], enabled, self.kd,
                    teacher=teacher, taid_t=self.step_taid_t, dtype=self.amp_dtype or torch.float32,
                    chunk_fn=self.chunk_fn, row_chunk=self.row_chunk, counted=counted)
                sums = {k: out[i] for i, k in enumerate(LOGIT_TERMS) if want[k]}
            else:
                sums = self.plain_logit_terms(s_hidden, head, teacher, token_ids, lengths, want, counted)
        if want["cos"]:
            if self.cos_projection is not None:
                with self.autocast():
                    s_hidden = self.cos_projection(s_hidden)
            sums["cos"] = cos_loss_sum(s_hidden, t_hidden, counted_masks(lengths, token_ids.size(1), counted)[0])
        return sums

    def split_batch(self, rest):
        """(counted, side, (topk_ids, topk_logprobs)), each None where absent: what a batch carries after its
        ids and lengths. side: the teacher side of another tokenizer (TeacherSide), its alignment and depth
        those the KD term reads (kd_alignment)."""
        counted = side = None
        if self.masked:
            counted, *rest = rest
        if self.cross is not None:
            side, rest = TeacherSide(*rest[:5]), rest[5:]
            side = self.kd_alignment(side)
        return counted, side, tuple(rest) or None

    def kd_alignment(self, side):
        """The teacher rows the KD term reads: with depth tables (--cross_kd chars --within_pieces) the
        positions inside a teacher piece too, wherever that target is exact (VocabMap.exact_at, depth 1 in
        practice; losses.char_buckets); otherwise the aligned ones only (depth None)."""
        if self.vocab_map.depth_prefix is None:
            return side._replace(alignment=torch.where(side.depth == 0, side.alignment, -1), depth=None)
        exact = self.vocab_map.exact_at(side.teacher_ids, side.alignment, side.depth)
        return side._replace(alignment=torch.where(exact, side.alignment, -1))

    @property
    def row_chunk(self) -> int:
        """Rows per fused chunk: fewer for another tokenizer, whose chunk also holds the teacher's full
        vocabulary (and sorts both for ULD)."""
        return losses.FUSED_ROW_CHUNK if self.cross is None else losses.FUSED_ROW_CHUNK // 4

    def teacher_side(self, t_hidden, side, topk, want, dtype, plain: bool) -> losses.Teacher | None:
        """The teacher's side of the logit terms (losses.Teacher), None when neither KD nor MSE is on.

        Online: its hidden states and head (plain path: its whole-batch logits); offline: its top-k rows;
        another tokenizer (side, the batch's TeacherSide; None otherwise): either of those, aligned
        (AlignedTeacher; offline, the dump's rows are the student's positions, so an aligned position
        indexes its own row, and a dump's row inside a teacher piece holds the teacher's row after s).
        """
        if not (want["ce"] or want["mse"]):
            return None
        if topk is not None:
            inner = losses.TopkTeacher(*topk)
            if side is not None:
                own = torch.arange(side.alignment.numel(), device=side.alignment.device).view_as(side.alignment)
                return losses.AlignedTeacher(inner, torch.where(side.alignment >= 0, own, -1), self.vocab_map,
                                             side.depth)
            return inner
        if t_hidden is None:
            return None
        t_vocab = self.vocab_size if self.cross is None else self.cross.teacher_vocab_size
        t_head = head_of(self.teacher, t_vocab)
        if plain:
            with self.autocast(), torch.no_grad():
                inner = losses.LogitsTeacher(F.linear(t_hidden, *t_head))
        else:
            inner = losses.HiddenTeacher(t_hidden, t_head, dtype)
        if side is None:
            return inner
        prefix = None if side.depth is None else self.vocab_map.prefix_of(side.teacher_ids, side.alignment, side.depth)
        after = None if side.depth is None else side.after
        return losses.AlignedTeacher(inner, side.alignment, self.vocab_map, side.depth, prefix, after)

    def plain_logit_terms(self, s_hidden, head, teacher, token_ids, lengths, want, counted=None):
        """The logit terms through whole-batch logits and autograd (--no-fused_loss): the reference path."""
        mask, pred = counted_masks(lengths, token_ids.size(1), counted)
        with self.autocast():
            s_logits = F.linear(s_hidden, *head)
        sums = {}
        if want["ce"]:
            sums["ce"] = kd_loss_sum(s_logits, teacher, mask, self.kd, taid_t=self.step_taid_t)
        if want["clm"]:
            sums["clm"] = clm_loss_sum(s_logits, token_ids, mask, pred)
        if want["mse"]:
            sums["mse"] = mse_loss_sum(s_logits, teacher.logits, mask)
        return sums

    # ---- one optimizer step ---------------------------------------------------------------

    def to_device(self, batch):
        return tuple(x.to(self.device, non_blocking=True) for x in batch)

    def global_counts(self, batches) -> torch.Tensor:
        """(tokens, real positions, predicted positions, KD positions) over every micro-batch of this step on
        every rank, on the device. KD positions are the real ones, or for another tokenizer the aligned ones;
        with loss masks the real, predicted and KD positions are the counted ones (and aligned)."""
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)
        for token_ids, lengths, *rest in batches:
            counted, side, _ = self.split_batch(rest)
            real, pred = counted_masks(lengths, token_ids.size(1), counted)
            kd = real if side is None else real & (side.alignment >= 0)
            n_pred = pred.sum() * (not self.step_on_policy)  # an on-policy step has no CLM term
            counts += torch.stack([lengths.sum(), real.sum(), n_pred, kd.sum()]).to(counts.dtype)
        if self.runtime.is_distributed:
            dist.all_reduce(counts)
        return counts

    def optimize_step(self, window) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches in `window`, then one optimizer step.

        Each term is divided by the position count of the whole global batch, so
        the step equals one big batch whatever the split across ranks and
        accumulation; DDP averages gradients over ranks, hence the world-size factor.
        Gradients are all-reduced only on the last micro-batch. Returns each loss term of the
        step (a tensor, not synchronised), as logged.

        Nothing here waits for the device: counts, weights and the non-finite skip stay on it (the
        fused AdamW reads its skip flag, found_inf, there), and what the host needs of the step is
        copied back asynchronously and read one step later (settle).
        """
        batches = [self.to_device(batch) for batch in window]
        self.step_on_policy = on_policy.is_on_policy_step(self.params.seed, self.n_steps, self.on_policy_fraction)
        if self.step_on_policy:
            batches = [self.sampled_batch(batch) for batch in batches]
        counts = self.global_counts(batches)
        n_real, n_pred, n_kd = counts[1:].clamp(min=1).unbind()
        norms = torch.stack([n_pred if k == "clm" else n_kd if k == "ce" else n_real for k in LOSS_TERMS])
        self.step_weights = (self.alpha_vector.double() / norms * self.runtime.world_size).float()
        self.step_taid_t = None if self.taid is None else self.taid_state[0].float()
        step_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not self.runtime.is_distributed else self.student.no_sync()
            with sync:
                sums = self.loss_sums(*batch)
                loss = sum(self.step_weights[LOSS_TERMS.index(k)] * v for k, v in sums.items())
                self.scaler.scale(loss).backward()
            for k, v in sums.items():
                step_sums[LOSS_TERMS.index(k)] += v.detach().double()

        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.params.max_grad_norm)
        finite = torch.isfinite(grad_norm)  # same on every rank: gradients are already all-reduced
        if self.taid is not None:
            self.update_taid(step_sums[LOSS_TERMS.index("ce")], n_kd, finite)
        if not self.scaler.is_enabled():  # under fp16 the scaler sets found_inf from its own check
            self.optimizer.found_inf = (~finite).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.n_steps += 1
        self.log.add_step(torch.where(finite, step_sums, 0.0), torch.where(finite, counts, 0.0),  # tokens first
                          self.step_on_policy)
        self._queue_readback(finite, counts[0], grad_norm)
        return {k: step_sums[i] / norms[i] for i, k in enumerate(LOSS_TERMS) if self.alphas[k] > 0}

    def sampled_batch(self, batch):
        """An on-policy micro-batch: each row's prompt with the student's sampled answer (on_policy.generate,
        the unwrapped student: no DDP all-reduce), counted where it predicts a sampled token. Its time goes
        to the log."""
        token_ids, lengths, counted = batch[:3]
        start = time.perf_counter()
        with self.autocast():
            sampled = on_policy.generate(self.raw, on_policy.prompts_of(token_ids, lengths, counted), self.sampling,
                                         self.stop_ids, models.max_positions(self.raw.config) or token_ids.size(1),
                                         self.dataset.ids.pad, self.params.seed, self.n_steps, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.log.add_generation(time.perf_counter() - start)
        return sampled

    def update_taid(self, kd_sum, n_real, finite):
        """TAID's t after this step, from the step's KD term over the global batch (the same on every rank)."""
        kd_sum = kd_sum.clone()
        if self.runtime.is_distributed:
            dist.all_reduce(kd_sum)
        self.taid_state = self.taid.update(self.taid_state, kd_sum / n_real, self.n_steps, self.total_steps, finite)

    def _queue_readback(self, finite, n_real, grad_norm):
        flags = torch.stack([finite.double(), n_real])
        done = None
        if flags.device.type == "cuda":
            flags = flags.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.pending.append(PendingStep(self.n_steps, flags, grad_norm, done))

    def settle(self, upto: int) -> None:
        """Read back the steps up to `upto`: count skipped steps and tokens, stop after a streak.

        The training loop settles the previous step right after queueing the current one, so the
        wait is for work the device has finished or is about to finish while the next step is queued
        behind it; steps that log, evaluate or checkpoint settle themselves first (those read the
        device anyway).
        """
        while self.pending and self.pending[0].step <= upto:
            record = self.pending.pop(0)
            if record.done is not None:
                record.done.synchronize()
            finite, n_real = record.flags.tolist()
            self.tokens_seen += int(n_real)
            if finite:
                self.n_nonfinite = 0
                self.last_grad_norm = record.grad_norm
                continue
            self.n_nonfinite += 1
            self.n_skipped += 1
            logger.warning("Step %d: non-finite gradients (norm %s), update skipped", record.step,
                           record.grad_norm.item())
            if self.n_nonfinite >= self.params.max_nonfinite:
                self.pending.clear()
                raise TrainingError(f"{self.n_nonfinite} consecutive steps with non-finite loss or gradients; stopping")

    def _after_step(self):
        """Settle the previous step; on this step's intervals, settle it too, then log, evaluate, checkpoint."""
        self.settle(self.n_steps - 1)
        step, params = self.n_steps, self.params
        due_log = step % params.log_interval == 0
        due_eval = self.evaluates and params.eval_interval > 0 and step % params.eval_interval == 0
        due_checkpoint = params.checkpoint_interval > 0 and step % params.checkpoint_interval == 0
        if due_log or due_eval or due_checkpoint:
            self.settle(step)
            if self.n_nonfinite == 0:  # a skipped step logs, evaluates and checkpoints nothing
                if due_log:
                    self.log.write(step, self.total_steps, self.step_lr(), self.last_grad_norm, self.n_skipped,
                                   self.tokens_seen, self.logged_state())
                if due_eval:
                    self.evaluate()  # before the checkpoint, which saves the evaluation history
                if due_checkpoint:
                    self.save_checkpoint()
        inject_fault("after_step", step)

    def step_lr(self) -> float:
        """The learning rate the last optimizer step used, as its log line reports it. The scheduler has
        already stepped to the next step's rate (get_last_lr), which would put the curve one step early
        and show 0 at the end of the decay."""
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](max(self.n_steps - 1, 0))

    def logged_state(self) -> dict[str, float]:
        """Loop state logged beside the loss terms (records.LOGGED_STATE): TAID's t after the last step."""
        return {} if self.taid is None else {"taid_t": self.taid_state[0].item()}

    def evaluate(self):
        """Student perplexity and bits per character on --eval_data and accuracy on --eval_tasks, shared
        between ranks (perplexity.py and tasks.py, as evaluate.py)."""
        record = {"step": self.n_steps, "tokens_seen": self.tokens_seen}
        shared = dict(rank=self.runtime.global_rank, world_size=self.runtime.world_size,
                      batch_size=self.params.batch_size, device=self.device, amp_dtype=self.amp_dtype,
                      pad_id=self.dataset.ids.pad)
        if self.eval_sequences is not None:
            record.update(held_out_scores(self.raw_student(), self.eval_sequences, **shared))
        if self.eval_tasks:
            record["tasks"] = {data.task.name: shared_task_scores(self.raw_student(), data, **shared)
                               for data in self.eval_tasks}
        self.eval_history.append(record)
        self.log.write_eval(record, self.eval_history)

    def raw_student(self):
        """The student LM itself (no DDP, no head-less wrapper): what is evaluated, saved and exported."""
        return self.raw

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self):
        """Everything needed to continue exactly where this step left off (collective)."""
        training_state = None
        if self.runtime.writes_training_state:  # rank 0, and the writer of a node's own folder (node_local.py)
            training_state = {
                "student": self.raw_student().state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "loop_state": {name: getattr(self, name) for name in LOOP_STATE},
                "world_size": self.runtime.world_size,
            }
            if self.cos_projection is not None:
                training_state["cos_projection"] = self.cos_projection.state_dict()
        rank_state = {"rng": checkpoint.rng_state(), **self.log.state_dict()}
        checkpoint.save(self.dump_path, self.n_steps, training_state, rank_state, self.runtime.global_rank,
                        self.params.keep_checkpoints, fault=inject_fault)
        self.last_checkpoint_step = self.n_steps

    def resume(self) -> bool:
        """Load the newest readable checkpoint; False when there is none."""
        found = checkpoint.load_latest(self.dump_path, self.runtime.global_rank, self.device)
        if found is None:
            return False
        path, training_state, rank_state = found
        if training_state["world_size"] != self.runtime.world_size:
            raise UsageError(f"{path} was written by {training_state['world_size']} process(es), "
                                f"this run has {self.runtime.world_size}; resume with the same number")
        self.raw_student().load_state_dict(training_state["student"])
        if self.cos_projection is not None:
            self.cos_projection.load_state_dict(training_state["cos_projection"])
        self.optimizer.load_state_dict(training_state["optimizer"])
        self.scheduler.load_state_dict(training_state["scheduler"])
        self.scaler.load_state_dict(training_state["scaler"])
        for name, value in training_state["loop_state"].items():
            setattr(self, name, value)
        checkpoint.set_rng_state(rank_state["rng"])
        self.log.load_state_dict(rank_state)
        self.log.truncate_metrics(self.n_steps)
        self.last_checkpoint_step = self.n_steps
        logger.info("Resumed from %s: step %d, epoch %d, %d micro-batches into the epoch",
                    path, self.n_steps, self.epoch, self.batches_done)
        return True

    # ---- the loop -------------------------------------------------------------------------

    def train(self):
        if self.teacher is not None:
            self.teacher.eval()
        self.student.train()
        accumulate = self.params.gradient_accumulation_steps
        progress = tqdm(total=self.total_steps, initial=self.n_steps, desc="Steps", disable=not self.runtime.is_master)
        with progress:  # closed on an error too, so the error line does not share the bar's line
            while self.n_steps < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                self.batch_sampler.skip = self.batches_done
                window = []
                for batch in self.dataloader:
                    self.batches_done += 1
                    self.log.add_batch(batch[0], batch[1])  # host tensors: the padding fraction
                    window.append(batch)
                    if len(window) == accumulate or self.batches_done == self.batches_per_epoch:
                        self.optimize_step(window)
                        self._after_step()
                        progress.update(1)
                        window = []
                        if self.n_steps >= self.total_steps:
                            break
                if self.batches_done == self.batches_per_epoch:
                    self.epoch += 1
                    self.batches_done = 0
                    logger.info("Epoch %d done (%d steps)", self.epoch, self.n_steps)
        self.end_training()

    def end_training(self):
        self.settle(self.n_steps)
        if not self.log.empty:  # the last steps, when the run does not end on a log interval
            self.log.write(self.n_steps, self.total_steps, self.step_lr(), self.last_grad_norm, self.n_skipped,
                           self.tokens_seen, self.logged_state())
        if self.evaluates and (not self.eval_history or self.eval_history[-1]["step"] != self.n_steps):
            self.evaluate()
        if self.last_checkpoint_step != self.n_steps:
            self.save_checkpoint()  # so that a later --resume with more steps continues from here
        if self.runtime.is_master:
            self.raw_student().save_pretrained(self.dump_path, safe_serialization=True)
            logger.info("Saved the student to %s (%d steps, %d skipped, %d tokens)",
                        self.dump_path, self.n_steps, self.n_skipped, self.tokens_seen)
        self.log.close()
