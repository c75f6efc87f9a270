"""The Distiller's step against the textbook: loss terms and their normalisation, the world-size factor,
DDP gradient sync under accumulation, the non-finite streak counter, and the log window across a resume.

Runs stay in this process (fast): whole runs through train.run / train.main on the tiny setup, single
steps through Distiller.optimize_step on a hand-made window of micro-batches.
"""

import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2LMHeadModel

import checkpoint
import distiller
import plots
import models
import train
from config import parse_config
from distil_ja.cli import EXIT_OK, EXIT_TRAINING
from distiller import Distiller
from helpers import assert_same_weights, assert_taid_t_follows_the_logged_kd, random_sequences, train_args, weights
from losses import TaidSchedule
from lm_seqs_dataset import LmSeqsDataset
from utils import Runtime

TEMPERATURE = 2.0  # not 1, so that a missing T or T^2 shows


def metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


# ---- non-finite steps: --max_nonfinite counts a streak, not a total ------------------------------

def nan_on_steps(monkeypatch, steps):
    """Every loss term (hence every gradient) is NaN on these optimizer steps (1-based)."""
    real = Distiller.loss_sums

    def patched(self, token_ids, lengths):
        sums = real(self, token_ids, lengths)
        return {k: v * float("nan") for k, v in sums.items()} if self.n_steps + 1 in steps else sums

    monkeypatch.setattr(Distiller, "loss_sums", patched)


def test_nonfinite_streaks_shorter_than_the_limit_do_not_stop_the_run(tiny_setup, tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, {2, 3, 5, 6})  # 4 bad steps in all, never 3 in a row
    dump = tmp_path / "run"
    code = train.main(train_args(tiny_setup, dump, "--max_steps", "8", "--max_nonfinite", "3",
                                 "--log_interval", "1", "--checkpoint_interval", "0"))
    assert code == EXIT_OK
    logged = metrics(dump)
    assert [m["step"] for m in logged] == [1, 4, 7, 8]
    assert [m["skipped_steps"] for m in logged] == [0, 2, 4, 4]
    assert (dump / "model.safetensors").is_file()


def test_a_streak_of_max_nonfinite_steps_stops_the_run_and_keeps_the_last_checkpoint(
        tiny_setup, tmp_path, monkeypatch, capsys):
    nan_on_steps(monkeypatch, {2, 3, 5, 6, 9, 10, 11})  # two short streaks, then a full one ending at step 11
    dump = tmp_path / "run"
    code = train.main(train_args(tiny_setup, dump, "--max_steps", "20", "--max_nonfinite", "3",
                                 "--log_interval", "1", "--checkpoint_interval", "4"))
    assert code == EXIT_TRAINING
    assert "error: 3 consecutive steps with non-finite loss or gradients" in capsys.readouterr().err
    assert [m["step"] for m in metrics(dump)] == [1, 4, 7, 8]
    assert checkpoint.list_checkpoints(dump) == [dump / "checkpoint_step00000008", dump / "checkpoint_step00000004"]
    state = torch.load(dump / "checkpoint_step00000008" / "training_state.pt", weights_only=True)
    assert state["loop_state"]["n_steps"] == 8 and state["loop_state"]["n_skipped"] == 4
    assert not (dump / "model.safetensors").exists()


# ---- resume: the log window of a checkpoint ------------------------------------------------------

class Crash(Exception):
    """Stands in for the SIGKILL of utils.inject_fault, so that the run stops inside this process."""


def crash_after_step_5(point, step):
    if (point, step) == ("after_step", 5):
        raise Crash


@pytest.mark.parametrize("objective", [(), ("--kd_loss", "taid", "--taid_alpha", "0.3", "--taid_beta", "0.5")],
                         ids=["fkl", "taid"])
def test_resume_restores_the_log_window(tiny_setup, tmp_path, monkeypatch, objective):
    """Logging every 4 steps and checkpointing every 3: the checkpoint of step 3 holds steps 1-3 of the
    window that the line of step 4 reports, so a resumed run writes it only if it restores the window.
    taid: its t (logged, and steering every step's loss) is loop state, so it resumes exactly too."""
    def args(dump, *extra):
        return train_args(tiny_setup, dump, "--max_steps", "8", "--log_interval", "4", "--checkpoint_interval", "3",
                          *objective, *extra)

    reference, dump = tmp_path / "reference", tmp_path / "run"
    train.run(args(reference))
    with monkeypatch.context() as patch:
        patch.setattr(distiller, "inject_fault", crash_after_step_5)
        with pytest.raises(Crash):
            train.run(args(dump))
    assert [m["step"] for m in metrics(dump)] == [4]  # written before the crash, after the checkpoint of step 3
    assert [p.name for p in checkpoint.list_checkpoints(dump)] == ["checkpoint_step00000003"]
    train.run(args(dump, "--resume"))
    assert [m["step"] for m in metrics(reference)] == [4, 8]
    assert (dump / "metrics.jsonl").read_text().splitlines() == (reference / "metrics.jsonl").read_text().splitlines()
    assert_same_weights(weights(reference), weights(dump), atol=0)
    if objective:
        assert all(0.4 < m["taid_t"] < 1 for m in metrics(dump))


@pytest.mark.parametrize("path", ["--fused_loss", "--no-fused_loss"])
def test_taid_t_follows_the_global_kd_term_and_is_logged(tiny_setup, tmp_path, path):
    """t after each step is TaidSchedule's update from that step's KD term, as the run logged it; the
    adaptive term (alpha 0.3) moves it ahead of the linear path (0.2 to 0.6), so the loss steers t."""
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, path, "--kd_loss", "taid", "--taid_t_start", "0.2", "--taid_t_end", "0.6",
                         "--taid_alpha", "0.3", "--taid_beta", "0.5", "--max_steps", "6", "--log_interval", "1"))
    logged = assert_taid_t_follows_the_logged_kd(dump, TaidSchedule(0.2, 0.6, 0.3, 0.5), 6)
    assert any(t > 0.2 + 0.4 * n / 6 + 1e-3 for n, t in enumerate(logged))
    state = torch.load(dump / "checkpoint_step00000006" / "training_state.pt", weights_only=True)
    assert state["loop_state"]["taid_state"][0].item() == logged[-1]
    assert "taid_t" in plots.panels([plots.Run(dump)])


# ---- the learning rate each optimizer step used -------------------------------------------------

BASE_LR = 1e-3  # train_args' --learning_rate


def textbook_lr(step, total, warmup):
    """The rate of optimizer step `step` (1-based) of `total`, `warmup` of them warming up: a linear rise
    to BASE_LR over the first warmup + 1 steps (never 0), then a linear fall that would reach 0 one
    step after the last."""
    if step <= warmup:
        return BASE_LR * step / (warmup + 1)
    return BASE_LR * (total - step + 1) / (total - warmup)


@pytest.fixture
def used_lrs():
    """[{the learning rates of the param groups}] as each optimizer step read them, in step order, recorded by
    a global optimizer step hook: what the update used, not what the scheduler says it set."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def record(optimizer, args, kwargs):
        seen.append({group["lr"] for group in optimizer.param_groups})

    handle = register_optimizer_step_pre_hook(record)
    yield seen
    handle.remove()


def test_each_step_uses_the_warmup_then_linear_decay_rate(tiny_setup, tmp_path, used_lrs, monkeypatch, caplog):
    """6 steps, --warmup_prop 0.3 (2 warm-up steps), against the formula step by step: a run killed after
    step 5 (steps 1-5), then resumed from its checkpoint of step 3 (steps 4-6). The log line of each step
    reports the rate that step used."""
    def args(*extra):
        return train_args(tiny_setup, tmp_path / "run", "--warmup_prop", "0.3", "--checkpoint_interval", "3",
                          "--log_interval", "1", *extra)

    expected = [textbook_lr(step, 6, 2) for step in range(1, 7)]
    caplog.set_level("INFO", logger="distillation")
    with monkeypatch.context() as patch:
        patch.setattr(distiller, "inject_fault", crash_after_step_5)
        with pytest.raises(Crash):
            train.run(args())
    train.run(args("--resume"))
    assert all(len(rates) == 1 for rates in used_lrs)  # both param groups: one rate
    assert [rates.pop() for rates in used_lrs] == pytest.approx(expected[:5] + expected[3:], rel=1e-12)
    logged = [re.search(r"step (\d+)/6 \|.*\| lr ([-+.e0-9]+) \|", r.getMessage()) for r in caplog.records]
    logged = [(int(m[1]), float(m[2])) for m in logged if m]  # printed with 3 digits
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert [lr for _, lr in logged] == pytest.approx(expected[:5] + expected[3:], rel=2e-3)


# ---- the log window: normalisation, skipped steps -----------------------------------------------

@pytest.fixture
def step_terms(monkeypatch):
    """[(terms, real positions, predicted positions)] of every optimizer step, as optimize_step returned
    them (each term divided by its own step's count) and counted from the micro-batches it was given."""
    steps = []
    real = Distiller.optimize_step

    def recording(self, window):
        terms = real(self, window)
        lengths = torch.cat([batch[1] for batch in window])
        steps.append(({k: v.item() for k, v in terms.items()}, int(lengths.sum()), int((lengths - 1).sum())))
        return terms

    monkeypatch.setattr(Distiller, "optimize_step", recording)
    return steps


def window_mean(steps, term):
    """A term over a window of steps, as the loss defines it: CLM's sums over predicted positions, the
    other terms' over real positions (a step's sum is its mean times its count)."""
    count = 2 if term == "clm" else 1
    return sum(step[0][term] * step[count] for step in steps) / sum(step[count] for step in steps)


def test_a_log_line_is_its_windows_mean_clm_over_predicted_positions(tiny_setup, tmp_path, step_terms):
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--log_interval", "3", "--checkpoint_interval", "0"))
    logged = metrics(dump)
    assert [m["step"] for m in logged] == [3, 6] and len(step_terms) == 6
    assert all(real > predicted for _, real, predicted in step_terms)  # the two normalisations differ
    for line, window in zip(logged, (step_terms[:3], step_terms[3:])):
        for term in ("ce", "clm", "cos"):
            assert line[term] == pytest.approx(window_mean(window, term), rel=1e-9), term


def test_a_skipped_steps_sums_and_counts_stay_out_of_the_log_window(tiny_setup, tmp_path, monkeypatch, step_terms):
    """Step 3 is non-finite: the line of step 4 (window 3-4) is step 4's alone, finite."""
    nan_on_steps(monkeypatch, {3})
    dump = tmp_path / "run"
    train.run(train_args(tiny_setup, dump, "--log_interval", "2", "--checkpoint_interval", "0"))
    logged = metrics(dump)
    assert [m["step"] for m in logged] == [2, 4, 6]
    assert logged[1]["skipped_steps"] == 1
    for term in ("ce", "clm", "cos"):
        assert logged[1][term] == pytest.approx(step_terms[3][0][term], rel=1e-9), term
        assert logged[0][term] == pytest.approx(window_mean(step_terms[:2], term), rel=1e-9), term


# ---- one optimizer step against plain torch ------------------------------------------------------

@pytest.fixture
def make_distiller(tiny_setup, tmp_path):
    """make(world_size, *flags, teacher=None): a Distiller on the tiny teacher (or `teacher`) and a fresh student,
    all four loss terms on, no gradient clipping (so the gradient the optimizer sees is the loss's)."""
    built = []

    def make(world_size, *extra, teacher=None):
        params = parse_config(train_args(tiny_setup, tmp_path / "run", "--alpha_mse", "0.3", "--temperature",
                                         str(TEMPERATURE), "--max_grad_norm", "1e9", *extra))
        if teacher is None:
            teacher = GPT2LMHeadModel.from_pretrained(tiny_setup["teacher"])
        teacher = teacher.requires_grad_(False).eval()
        torch.manual_seed(0)
        student = models.build_student(models.load_config(params.student_config, "gpt2"), "gpt2")
        dataset = LmSeqsDataset(random_sequences(16, seed=1), 64)
        built.append(Distiller(params, Runtime(world_size=world_size), dataset, student, teacher))
        return built[-1]

    yield make
    for made in built:
        made.log.close()


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: enough for the Distiller to wrap its student in DDP inside this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def micro_batches(made, sizes, start=0):
    """Consecutive sequences of the dataset in micro-batches of `sizes`, padded as the DataLoader pads them."""
    window = []
    for size in sizes:
        window.append(made.dataset.batch_sequences(made.dataset.sequences[start : start + size]))
        start += size
    assert all(len(set(lengths.tolist())) > 1 for _, lengths in window)  # padding in every micro-batch
    return window


def textbook_terms(student, teacher, window, alphas):
    """Each weighted loss term of the window as a mean, in plain torch, sequence by sequence without padding:
    KD (T^2 KL(teacher_T || student_T)), MSE of the logits and 1 - cos of the last hidden states over the
    real positions; next-token cross-entropy over the predicted ones (a sequence of n tokens predicts n - 1)."""
    sums = dict.fromkeys(("ce", "clm", "mse", "cos"), 0.0)
    n_real = n_pred = 0
    for token_ids, lengths in window:
        for row, n in zip(token_ids, lengths.tolist()):
            s = student(input_ids=row[None, :n], output_hidden_states=True)
            with torch.no_grad():
                t = teacher(input_ids=row[None, :n], output_hidden_states=True)
            s_logits, t_logits = s.logits[0], t.logits[0]
            log_p_s = torch.log_softmax(s_logits / TEMPERATURE, dim=-1)
            log_p_t = torch.log_softmax(t_logits / TEMPERATURE, dim=-1)
            sums["ce"] = sums["ce"] + TEMPERATURE**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum()
            sums["clm"] = sums["clm"] + F.cross_entropy(s_logits[:-1], row[1:n], reduction="sum")
            sums["mse"] = sums["mse"] + ((s_logits - t_logits) ** 2).sum()
            cos = F.cosine_similarity(s.hidden_states[-1][0], t.hidden_states[-1][0], dim=-1)
            sums["cos"] = sums["cos"] + (1 - cos).sum()
            n_real, n_pred = n_real + n, n_pred + n - 1
    return {k: v / (n_pred if k == "clm" else n_real) for k, v in sums.items() if alphas[k] > 0}


def step_and_copy(made, window):
    """One optimize_step on `window`: (the terms it returned, the gradients the optimizer got, a copy of the
    student as it was before the step)."""
    student = made.raw_student()
    before = GPT2LMHeadModel(student.config)
    before.load_state_dict(student.state_dict())
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in student.named_parameters()})

    hook = made.optimizer.register_step_pre_hook(capture)
    terms = made.optimize_step(window)
    hook.remove()
    return terms, grads, before


@pytest.mark.parametrize("fused", ["--fused_loss", "--no-fused_loss"])
def test_step_terms_are_the_textbook_means(make_distiller, fused):
    """CLM is divided by the predicted positions, the other terms by the real ones, over the whole step."""
    made = make_distiller(1, fused, "--gradient_accumulation_steps", "2")
    window = micro_batches(made, [3, 2])
    terms, _, before = step_and_copy(made, window)
    expected = textbook_terms(before, made.teacher, window, made.alphas)
    assert terms.keys() == expected.keys() == {"ce", "clm", "mse", "cos"}
    for k, value in expected.items():
        assert terms[k].item() == pytest.approx(value.item(), rel=1e-5), k


@pytest.mark.parametrize("fused", ["--fused_loss", "--no-fused_loss"])
def test_a_padded_teachers_head_is_cut_to_the_students_vocabulary(make_distiller, fused):
    """A teacher with 8 rows beyond the student's 192 (an embedding padded for faster matmuls) gives the step
    of the same teacher cut to 192 rows: its extra logits are dropped before every term, not renormalised in."""
    from helpers import TINY_VOCAB, gpt2_config

    torch.manual_seed(2)
    padded = GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32, vocab_size=TINY_VOCAB + 8))
    with torch.no_grad():
        padded.lm_head.weight[TINY_VOCAB:] *= 30  # rows that would carry much of the softmax if they were kept
    cut = GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32)).eval()
    cut.load_state_dict({k: v[:TINY_VOCAB] if v.shape[0] == TINY_VOCAB + 8 else v
                         for k, v in padded.state_dict().items()})
    made = make_distiller(1, fused, teacher=padded)
    window = micro_batches(made, [3, 2])
    terms, _, before = step_and_copy(made, window)
    expected = textbook_terms(before, cut, window, made.alphas)
    for k, value in expected.items():
        assert terms[k].item() == pytest.approx(value.item(), rel=1e-5), k


def test_step_gradient_is_the_global_batch_mean_with_two_ranks(make_distiller, process_group, monkeypatch):
    """The world-size factor, in one process: world_size 2 over a one-process gloo group stands for two ranks
    that hold the same micro-batches. Their all-reduce of position counts is a sum of equal tensors (patched in
    as x2); DDP's average of two equal gradients is the gradient itself (a one-process DDP averages over one).
    The step's gradient must then be that of the textbook mean over the global batch (both ranks' copies),
    which equals the mean over this rank's window; without the factor it would be half of it."""
    made = make_distiller(2, "--gradient_accumulation_steps", "2")
    assert isinstance(made.student, DistributedDataParallel)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: tensor.mul_(2))
    window = micro_batches(made, [3, 2])
    _, grads, before = step_and_copy(made, window)
    expected = textbook_terms(before, made.teacher, window, made.alphas)
    sum(made.alphas[k] * v for k, v in expected.items()).backward()
    assert grads.keys() == dict(before.named_parameters()).keys()
    for name, p in before.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_ddp_syncs_gradients_only_on_the_last_micro_batch(make_distiller, process_group):
    """With 4 micro-batches a step, the first 3 run forward and backward under DDP's no_sync() and the
    gradient all-reduce (seen through a DDP communication hook) fires during the 4th's backward only."""
    made = make_distiller(2, "--gradient_accumulation_steps", "4")
    ddp = made.student
    assert isinstance(ddp, DistributedDataParallel)
    under_no_sync, reduced_on = [], []
    real_loss_sums = made.loss_sums

    def recording_loss_sums(token_ids, lengths):
        under_no_sync.append(not ddp.require_backward_grad_sync)  # what no_sync() sets for the forward
        return real_loss_sums(token_ids, lengths)

    def recording_allreduce(state, bucket):  # a one-process all-reduce: the bucket as it is
        reduced_on.append(len(under_no_sync) - 1)
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    made.loss_sums = recording_loss_sums
    ddp.register_comm_hook(None, recording_allreduce)
    for step in range(2):
        made.optimize_step(micro_batches(made, [2, 2, 2, 2], start=8 * step))
    assert under_no_sync == [True, True, True, False] * 2
    assert reduced_on and sorted(set(reduced_on)) == [3, 7]


# ---- no host-device synchronisation inside a step ------------------------------------------------

class HostSync(AssertionError):
    pass


@pytest.mark.parametrize("flags", [(), ("--no-fused_loss",), ("--kd_loss", "jsd"), ("--precision", "fp16"),
                                   ("--kd_loss", "taid"), ("--kd_loss", "akl")])
def test_optimize_step_never_reads_a_tensor_on_the_host(make_distiller, monkeypatch, flags):
    """Every way of reading a tensor's value on the host (what blocks the CPU until the GPU is done) raises
    inside optimize_step; on the CPU this catches what on CUDA would be a synchronisation. The step must
    still run, skip a non-finite update and give the same terms as with the reads allowed."""
    made = make_distiller(1, "--gradient_accumulation_steps", "2", *flags)
    window = micro_batches(made, [3, 2])
    made.optimize_step(window)  # the first step builds the optimizer state (not what this checks)
    second = micro_batches(made, [2, 3], start=5)

    def refuse(*args, **kwargs):
        raise HostSync("a tensor was read on the host inside optimize_step")

    with monkeypatch.context() as patch:
        # transformers >= 5 looks for packed sequences in the position ids of every eager forward without a
        # mask (one read of the device; traced away under torch.compile, the default on a GPU). Our rows are
        # never packed: stub it with the answer it gives them, so that everything else stays checked.
        import transformers.masking_utils as masking_utils

        if hasattr(masking_utils, "find_packed_sequence_indices"):
            patch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, name, refuse)
        with pytest.raises(HostSync):
            bool(torch.ones(()))  # the patch is in force
        terms = made.optimize_step(second)
    assert made.n_steps == 2 and len(made.pending) == 2
    made.settle(made.n_steps)
    assert made.n_skipped == 0
    assert made.tokens_seen == sum(int(lengths.sum()) for _, lengths in window + second)
    assert all(torch.isfinite(v) for v in terms.values())
