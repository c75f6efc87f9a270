"""What a run records besides its weights: tensorboard scalars, metrics.jsonl, log lines, eval_results.json.

The Distiller hands each optimizer step's loss sums and position counts to a TrainingLog; every
`log_interval` steps the window is reduced over the ranks, divided by its position counts (the
same normalisation as the loss), written, and reset. The window is part of a checkpoint
(state_dict), so a resumed run logs exactly what an uninterrupted one does.

Each metrics.jsonl line and each evaluation carries `tokens_seen` (the Distiller's count: real tokens
of every step so far, all ranks), so that runs with other batch shapes share one axis (plots.py draws
them; `records.read_records` reads them back).

Nothing here reads the device per step: a step's sums and counts are added on the device, and read
when a line is written.
"""

import json
import logging
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

import plots
from distil_ja import fileio
from distil_ja.cli import DataError
from records import EVAL_RESULTS, HELD_OUT_PER_TEXT, LOSS_TERMS, METRICS

logger = logging.getLogger("distillation")



class TrainingLog:
    def __init__(self, dump_path, runtime, alphas: dict[str, float], plots: bool = False):
        self.dump_path = Path(dump_path)
        self.runtime = runtime
        self.alphas = alphas
        # DUMP_PATH/curves.png at each evaluation and at the end (--plots, rank 0 draws).
        self.plots = plots and runtime.is_master
        self.writer = None
        if runtime.is_master:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(self.dump_path / "log"))
        self.reset()

    def reset(self) -> None:
        device = self.runtime.device
        self.sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device)  # this rank's, unreduced
        # (tokens, real, predicted, KD positions), global; with a chat corpus's loss masks the last three
        # are the counted positions (Distiller.global_counts)
        self.counts = torch.zeros(4, dtype=torch.float64, device=device)
        self.slots = self.real = 0  # this rank's positions with and without padding
        self.start = time.perf_counter()
        self.generation_s = 0.0  # this rank's time sampling on-policy answers since the last log line
        self.on_policy_steps = 0

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"log_sums": self.sums.cpu(), "log_counts": self.counts.cpu(), "log_slots": self.slots,
                "log_real": self.real, "log_on_policy_steps": self.on_policy_steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["log_sums"].to(self.runtime.device)
        counts = state["log_counts"].to(self.runtime.device)
        if counts.numel() == 2:  # a checkpoint from before the KD count: KD counted the real positions
            counts = torch.cat([counts, counts[:1]])
        if counts.numel() == 3:  # from before loss masks: every real position was a token
            counts = torch.cat([counts[:1], counts])
        self.counts = counts
        self.slots, self.real = state.get("log_slots", 0), state.get("log_real", 0)
        self.on_policy_steps = state.get("log_on_policy_steps", 0)

    def truncate_metrics(self, step: int) -> None:
        """Drop the lines a crashed run wrote after its last checkpoint (master only)."""
        path = self.dump_path / METRICS
        if self.runtime.is_master and path.exists():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            fileio.write_text(path, "".join(line + "\n" for line in lines))

    def clear(self) -> None:
        """Forget the records of an earlier attempt that wrote no checkpoint (--resume from step 1)."""
        if self.runtime.is_master:
            for name in (METRICS, EVAL_RESULTS):
                (self.dump_path / name).unlink(missing_ok=True)

    @property
    def empty(self) -> bool:
        """No optimizer step since the last log line (skipped steps do not count). Reads the device."""
        return bool(self.counts[0] == 0)

    # ---- accumulation -------------------------------------------------------------------

    def add_batch(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """A micro-batch as it left the DataLoader (host tensors): for the padding fraction."""
        self.slots += token_ids.numel()
        self.real += int(lengths.sum())

    def add_step(self, step_sums: torch.Tensor, counts: torch.Tensor, on_policy: bool = False) -> None:
        self.sums += step_sums
        self.counts += counts
        self.on_policy_steps += on_policy

    def add_generation(self, seconds: float) -> None:
        """Time this rank spent sampling an on-policy micro-batch (the device synchronised after it)."""
        self.generation_s += seconds

    # ---- writing ------------------------------------------------------------------------

    def write(self, step: int, total_steps: int, lr: float, grad_norm: torch.Tensor | None, skipped: int,
              tokens_seen: int, state: dict[str, float] | None = None) -> None:
        """Reduce, write and reset the window (collective: every rank calls it).

        `state`: loop state logged beside the terms (records.LOGGED_STATE, e.g. TAID's t), the same on every rank.
        """
        state = state or {}
        sums = self.sums.clone()
        if self.runtime.is_distributed:
            dist.all_reduce(sums)  # counts are already global
        n_real, n_pred, n_kd = self.counts[1:].clamp(min=1).tolist()
        terms = {k: sums[i].item() / (n_pred if k == "clm" else n_kd if k == "ce" else n_real)
                 for i, k in enumerate(LOSS_TERMS) if self.alphas[k] > 0}
        terms["loss"] = sum(self.alphas[k] * v for k, v in terms.items())
        seconds = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.counts[0].item() / seconds  # real tokens, all ranks
        # on-policy steps: how many, and the share of this window's time rank 0 spent sampling
        generation = {} if not self.on_policy_steps else {"on_policy_steps": self.on_policy_steps,
                                                         "generation_share": self.generation_s / seconds}
        if self.writer is not None:
            scalars = {**{f"losses/{k}": v for k, v in terms.items()}, "global/lr": lr,
                       "global/tokens_per_s": tokens_per_s, "global/skipped_steps": skipped,
                       "global/memory_gib": self.memory_gib(), "global/padding_fraction": self.padding_fraction()}
            if grad_norm is not None:  # None: the window was restored from a checkpoint and no step ran since
                scalars["global/grad_norm"] = float(grad_norm)
            scalars.update({f"kd/{k}": v for k, v in state.items()})
            scalars.update({f"on_policy/{k}": v for k, v in generation.items()})
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.runtime.is_master:
            with open(self.dump_path / METRICS, "a") as f:
                f.write(json.dumps({"step": step, "tokens_seen": tokens_seen, **terms, **state,
                                    "skipped_steps": skipped, **generation}) + "\n")
            said = "" if not generation else (f" | {generation['on_policy_steps']} on-policy step(s), "
                                              f"{100 * generation['generation_share']:.0f}% of the time sampling")
            logger.info("step %d/%d | %s | lr %.3g | %.0f tok/s%s", step, total_steps,
                        " ".join(f"{k} {v:.4f}" for k, v in {**terms, **state}.items()), lr, tokens_per_s, said)
        self.reset()

    def write_eval(self, record: dict, history: list[dict]) -> None:
        if "perplexity" in record:
            per_char = ("" if record.get("bits_per_char") is None else
                        f", {record['bits_per_char']:.4f} bits/char, {record['bits_per_byte']:.4f} bits/byte over "
                        f"{record['chars']:,} characters")
            logger.info("step %d | eval perplexity %.3f over %d tokens%s", record["step"], record["perplexity"],
                        record["tokens"], per_char)
            if self.writer is not None:
                self.writer.add_scalar("eval/perplexity", record["perplexity"], record["step"])
                self.writer.add_scalar("eval/nll", record["nll_sum"] / max(record["tokens"], 1), record["step"])
                for key in HELD_OUT_PER_TEXT:  # text data only: binarized data holds no characters
                    if record.get(key) is not None:
                        self.writer.add_scalar(f"eval/{key}", record[key], record["step"])
        for name, r in record.get("tasks", {}).items():
            logger.info("step %d | eval %s (%s) acc %.4f ± %.4f, acc_norm %.4f over %d items (chance %.4f)",
                        record["step"], name, r["prompt_id"], r["acc"], r["acc_stderr"], r["acc_norm"], r["n"],
                        r["chance"])
            if self.writer is not None:
                for metric in ("acc", "acc_norm"):
                    self.writer.add_scalar(f"eval/{name}/{metric}", r[metric], record["step"])
        if self.runtime.is_master:
            fileio.write_json(self.dump_path / EVAL_RESULTS, {**record, "history": history})
        self.plot()

    def padding_fraction(self) -> float:
        """Share of padding in this rank's micro-batches since the last log line."""
        return 1.0 - self.real / self.slots if self.slots else 0.0

    def memory_gib(self) -> float:
        device = self.runtime.device
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def plot(self) -> None:
        """Redraw DUMP_PATH/curves.png from the files just written (when self.plots).

        Without matplotlib (the GPU machine has none) the run warns once and goes on without plots.
        """
        if not self.plots:
            return
        try:
            plots.write_plot([self.dump_path], self.dump_path / plots.PLOT_FILE)
        except (plots.PlotsUnavailable, DataError) as err:
            logger.warning("No plots for this run: %s", err)
            self.plots = False

    def close(self) -> None:
        self.plot()
        if self.writer is not None:
            self.writer.close()
