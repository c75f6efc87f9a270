"""The training loop: a frozen teacher, a student, and the weighted sum of the loss terms."""

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import losses
from config import amp_dtype
from distil_ja.cli import TrainingError, UsageError
from grouped_batch_sampler import GroupedBatchSampler, SkippingBatchSampler, length_groups
from lm_seqs_dataset import LmSeqsDataset
from losses import clm_loss_sum, cos_loss_sum, kd_clm_loss_sums, kd_loss_sum, mse_loss_sum
from perplexity import shared_perplexity
from sharding import is_sharded
from training_log import LOSS_TERMS, TrainingLog
from utils import Runtime, inject_fault

logger = logging.getLogger("distillation")

# Loop state saved in checkpoints, beside the weights and optimizer.
LOOP_STATE = ("epoch", "batches_done", "n_steps", "n_nonfinite", "n_skipped", "tokens_seen", "eval_history")


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


class Distiller:
    """Trains `student` to match `teacher` (and the data) on `dataset`; params is train.py's config."""

    def __init__(self, params, runtime: Runtime, dataset: LmSeqsDataset, student, teacher=None, eval_sequences=None):
        self.params = params
        self.runtime = runtime
        self.device = runtime.device
        self.dump_path = Path(params.dump_path)
        self.dataset = dataset
        self.teacher = teacher
        self.eval_sequences = eval_sequences  # held-out sequences (--eval_data)
        self.eval_history = []
        self.alphas = {"ce": params.alpha_ce, "clm": params.alpha_clm, "mse": params.alpha_mse, "cos": params.alpha_cos}
        self.need_hidden = params.alpha_cos > 0
        self.amp_dtype = amp_dtype(params.precision)
        self.fused_loss = params.fused_loss  # KD + CLM with the gradient in the forward
        self.loss_weights = dict(self.alphas)  # fused KD/CLM weight ratio; optimize_step sets it per step
        self.chunk_fn = losses.fused_rows
        self._build_data(params, runtime, dataset)
        self._build_optimization(params, runtime, student)

        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch consumed (the same on every rank)
        self.n_steps = 0
        self.n_nonfinite = 0  # consecutive steps with non-finite gradients
        self.n_skipped = 0
        self.tokens_seen = 0
        self.last_checkpoint_step = None
        self.last_grad_norm = None  # of the last finite step, for a log line written at the end
        self.log = TrainingLog(self.dump_path, runtime, self.alphas)

    def _build_data(self, params, runtime, dataset):
        self.sampler = DistributedSampler(
            dataset, num_replicas=runtime.world_size, rank=runtime.global_rank, shuffle=True, seed=params.seed
        )
        if params.group_by_size:
            batch_sampler = GroupedBatchSampler(self.sampler, length_groups(dataset.lengths), params.batch_size)
        else:
            batch_sampler = BatchSampler(self.sampler, params.batch_size, drop_last=False)
        self.batch_sampler = SkippingBatchSampler(batch_sampler)
        # Items hold no randomness, so worker processes change nothing in the batches (exact resume holds).
        self.dataloader = DataLoader(
            dataset, batch_sampler=self.batch_sampler, collate_fn=dataset.batch_sequences,
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
            student.transformer.wpe.weight.requires_grad = False
        self.optimizer = torch.optim.AdamW(
            param_groups(student, params.weight_decay), lr=params.learning_rate, eps=params.adam_epsilon,
            betas=(0.9, 0.98), fused=self.device.type == "cuda",
        )
        warmup_steps = math.ceil(self.total_steps * params.warmup_prop)
        self.scheduler = linear_warmup_decay(self.optimizer, warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=params.precision == "fp16")
        self.student = student
        if runtime.is_distributed:
            ids = [runtime.local_rank] if self.device.type == "cuda" else None
            self.student = DistributedDataParallel(student, device_ids=ids, output_device=ids and ids[0])
        sharded_teacher = self.teacher is not None and is_sharded(self.teacher)  # train.py placed it (sharding.py)
        if self.teacher is not None and not sharded_teacher:
            self.teacher.to(self.device)
        if params.compile:
            # In place (nn.Module.compile): state_dict keys, DDP and checkpoints are unchanged.
            student.compile()
            if self.teacher is not None and not sharded_teacher:  # FSDP2's hooks break the graph at every block
                self.teacher.compile()
            self.chunk_fn = torch.compile(losses.fused_rows, dynamic=True)

    # ---- loss of one micro-batch ----------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss_sums(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summed (not averaged) loss terms of one micro-batch, over real positions only.

        Padding is on the right and attention is causal, so no real position can
        attend to padding: the models run without an attention mask, which keeps
        SDPA on its fused causal kernels.
        """
        mask = torch.arange(token_ids.size(1), device=token_ids.device)[None, :] < lengths[:, None]
        with self.autocast():
            s_out = self.student(input_ids=token_ids, output_hidden_states=self.need_hidden, use_cache=False)
            t_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=token_ids, output_hidden_states=self.need_hidden, use_cache=False)
        sums = {}
        if self.fused_loss and (self.alphas["ce"] > 0 or self.alphas["clm"] > 0):
            # Loss and gradient in one chunked pass: no fp32 batch x seq x vocab tensor is kept for backward.
            ce, clm = kd_clm_loss_sums(
                s_out.logits, t_out.logits if self.alphas["ce"] > 0 else None, token_ids, mask,
                self.params.temperature, self.loss_weights["ce"] if self.alphas["ce"] > 0 else 0.0,
                self.loss_weights["clm"] if self.alphas["clm"] > 0 else 0.0, chunk_fn=self.chunk_fn,
            )
            sums.update({k: v for k, v in (("ce", ce), ("clm", clm)) if self.alphas[k] > 0})
        else:
            if self.alphas["ce"] > 0:
                sums["ce"] = kd_loss_sum(s_out.logits, t_out.logits, mask, self.params.temperature)
            if self.alphas["clm"] > 0:
                sums["clm"] = clm_loss_sum(s_out.logits, token_ids, mask)
        if self.alphas["mse"] > 0:
            sums["mse"] = mse_loss_sum(s_out.logits, t_out.logits, mask)
        if self.alphas["cos"] > 0:
            sums["cos"] = cos_loss_sum(s_out.hidden_states[-1], t_out.hidden_states[-1], mask)
        return sums

    # ---- one optimizer step ---------------------------------------------------------------

    def global_counts(self, window) -> torch.Tensor:
        """(real positions, predicted positions) over every micro-batch of this step on every rank."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for token_ids, lengths in window:
            n_pred = (lengths - 1).clamp(min=0).sum()
            counts += torch.stack([lengths.sum(), n_pred]).to(counts)
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
        """
        counts = self.global_counts(window)
        n_real, n_pred = counts.clamp(min=1).tolist()
        norm = {"ce": n_real, "mse": n_real, "cos": n_real, "clm": n_pred}
        self.loss_weights = {k: self.alphas[k] / norm[k] for k in LOSS_TERMS}  # how loss uses the sums below
        step_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)
        for i, (token_ids, lengths) in enumerate(window):
            self.log.add_batch(token_ids, lengths)
            token_ids = token_ids.to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
            last = i == len(window) - 1
            sync = contextlib.nullcontext() if last or not self.runtime.is_distributed else self.student.no_sync()
            with sync:
                sums = self.loss_sums(token_ids, lengths)
                loss = sum(self.alphas[k] * v / norm[k] for k, v in sums.items()) * self.runtime.world_size
                self.scaler.scale(loss).backward()
            for k, v in sums.items():
                step_sums[LOSS_TERMS.index(k)] += v.detach().double()

        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.params.max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))  # same on every rank: gradients are already all-reduced
        if finite or self.params.precision == "fp16":
            self.scaler.step(self.optimizer)  # under fp16 the scaler skips non-finite steps itself
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.n_steps += 1
        self.tokens_seen += int(n_real)
        self._after_step(step_sums, counts, grad_norm, finite)
        return {k: step_sums[i] / norm[k] for i, k in enumerate(LOSS_TERMS) if self.alphas[k] > 0}

    def _after_step(self, step_sums, counts, grad_norm, finite):
        """Count a skipped step, or log, evaluate and checkpoint on their intervals."""
        if not finite:
            self.n_nonfinite += 1
            self.n_skipped += 1
            logger.warning("Step %d: non-finite gradients (norm %s), update skipped", self.n_steps, grad_norm.item())
            if self.n_nonfinite >= self.params.max_nonfinite:
                raise TrainingError(f"{self.n_nonfinite} consecutive steps with non-finite loss or gradients; stopping")
            return
        self.n_nonfinite = 0
        self.last_grad_norm = grad_norm
        self.log.add_step(step_sums, counts)
        if self.n_steps % self.params.log_interval == 0:
            self.log.write(self.n_steps, self.total_steps, self.scheduler.get_last_lr()[0], grad_norm, self.n_skipped)
        if self.eval_sequences is not None and self.params.eval_interval > 0 \
                and self.n_steps % self.params.eval_interval == 0:
            self.evaluate()  # before the checkpoint, which saves the evaluation history
        if self.params.checkpoint_interval > 0 and self.n_steps % self.params.checkpoint_interval == 0:
            self.save_checkpoint()
        inject_fault("after_step", self.n_steps)

    def evaluate(self):
        """Student perplexity on --eval_data, shared between ranks (perplexity.py, as evaluate.py)."""
        out = shared_perplexity(self.raw_student(), self.eval_sequences, self.runtime.global_rank,
                                self.runtime.world_size, batch_size=self.params.batch_size, device=self.device,
                                amp_dtype=self.amp_dtype, pad_id=self.dataset.ids.pad)
        record = {"step": self.n_steps, **out}
        self.eval_history.append(record)
        self.log.write_eval(record, self.eval_history)

    def raw_student(self):
        return self.student.module if isinstance(self.student, DistributedDataParallel) else self.student

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
                    window.append(batch)
                    if len(window) == accumulate or self.batches_done == self.batches_per_epoch:
                        self.optimize_step(window)
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
        if not self.log.empty:  # the last steps, when the run does not end on a log interval
            self.log.write(self.n_steps, self.total_steps, self.scheduler.get_last_lr()[0], self.last_grad_norm,
                           self.n_skipped)
        if self.eval_sequences is not None and (not self.eval_history or self.eval_history[-1]["step"] != self.n_steps):
            self.evaluate()
        if self.last_checkpoint_step != self.n_steps:
            self.save_checkpoint()  # so that a later --resume with more steps continues from here
        if self.runtime.is_master:
            self.raw_student().save_pretrained(self.dump_path, safe_serialization=True)
            logger.info("Saved the student to %s (%d steps, %d skipped, %d tokens)",
                        self.dump_path, self.n_steps, self.n_skipped, self.tokens_seen)
        self.log.close()
