"""One distillation step: the project's Distiller against the 2019 upstream-style step, same batch.

    python bench/distill_step.py                 # full size on CUDA: 24x1024 teacher -> 6x1024 student, 8 x 1024
    python bench/distill_step.py --tiny          # small shapes on the CPU, seconds (CI)

Both sides start from the same random weights and see the same random batch. The first step of
each side runs with dropout off and its loss terms are printed side by side (they must agree
within the precision's tolerance); then dropout is on, `--warmup` steps are run (compilation)
and `--steps` steps are timed. (--no-comparison_step, project side only: the first step runs with
dropout on too, which spares a compiled student its second compilation.)

- reference: what the seed model was trained with (huggingface/transformers
  examples/distillation, 2019): fp32, eager attention with an attention mask, masked_select
  over the full logits, KLDivLoss(batchmean) on softmax(teacher / T), CrossEntropyLoss with
  ignore_index, CosineEmbeddingLoss, a per-parameter AdamW loop. Written here, on purpose.
- project: examples/distillation/distiller.py's Distiller.optimize_step, the real training
  code path, with train.py's own settings (config.parse_config) and defaults.
  --fused_loss/--no-fused_loss, --compile/--no-compile, --compile_mode and --kd_loss are passed
  to parse_config as train.py's flags of the same names. (--pad_multiple has no meaning here: the
  batch is given, it does not come through the DataLoader.)

--profile prints a torch.profiler table of 3 project steps and, on a GPU, how busy it was: the
kernels' time over the steps' wall time (also in the JSON, results[].gpu_busy).

Both sides use the project's recipe (config.RECIPE): its temperature, loss weights and learning
rate, so the loss terms they compare are the same ones; the JSON records it.

MFU = tokens/s x FLOPs per token / peak, FLOPs per token = F(teacher) + 3 F(student) (forward,
and backward at twice the forward), F(model) = 2 x (12 L d^2 + d V + 2 L S d) multiply-adds x 2:
the block matmuls, the vocabulary projection and the attention scores and values over the
batch's sequence length S (no causal halving). This is the definition of issue 5 (it gives its
3.4% for 22.5k tokens/s). Peak: --peak_tflops (989: H100/H200 dense bf16).
"""

import argparse
import copy
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import COMPILE_MODES, RECIPE, parse_config  # noqa: E402
from losses import KD_LOSSES  # noqa: E402

STUDENT_CONFIG = REPO / "examples" / "distillation" / "training_configs" / "distilgpt2-ja.json"
# The loss terms of the 2019 GPT-2 step that the recipe weighs (its MSE term is not part of that step).
TERMS = tuple(k for k in ("ce", "clm", "cos") if RECIPE[f"alpha_{k}"] > 0)


def model_flops_per_token(n_layer: int, d: int, vocab: int, seq: int) -> float:
    """Forward FLOPs per token: 2 x multiply-adds of the block matmuls, vocab projection, attention."""
    return 2.0 * (12 * n_layer * d * d + d * vocab + 2 * n_layer * seq * d)


def step_flops_per_token(teacher_cfg, student_cfg, seq: int) -> float:
    t = model_flops_per_token(teacher_cfg.n_layer, teacher_cfg.n_embd, teacher_cfg.vocab_size, seq)
    s = model_flops_per_token(student_cfg.n_layer, student_cfg.n_embd, student_cfg.vocab_size, seq)
    return t + 3 * s


def configs(tiny: bool):
    from transformers import GPT2Config

    if tiny:
        common = dict(vocab_size=512, n_positions=64, n_embd=64, n_head=4, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3, activation_function="gelu_new")
        return GPT2Config(n_layer=4, **common), GPT2Config(n_layer=2, **common)
    teacher = GPT2Config(vocab_size=32000, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, activation_function="gelu_new")
    return teacher, GPT2Config.from_json_file(STUDENT_CONFIG)


def build(config, attn: str, state=None):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model


def make_batch(batch_size, seq_len, vocab, ragged, seed=0):
    """Random tokens (ids 7..vocab-1) between <s> and </s>; ragged: some rows shorter, right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (batch_size, seq_len), generator=g)
    lengths = torch.full((batch_size,), seq_len, dtype=torch.long)
    if ragged:
        lengths = torch.randint(max(12, seq_len // 3), seq_len + 1, (batch_size,), generator=g)
        lengths[0] = seq_len
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = 1, 2
        ids[row, n:] = 3
    return ids, lengths


class UpstreamStep:
    """The 2019 huggingface distiller's step for GPT-2 (alpha_mlm 0), fp32 and eager."""

    def __init__(self, student, teacher, lr, temperature, alphas, max_grad_norm=5.0):
        self.student, self.teacher = student, teacher
        self.temperature, self.alphas = temperature, alphas
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, eps=1e-6, betas=(0.9, 0.98),
                                           foreach=False)  # transformers.AdamW looped over parameters
        self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        self.lm_loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
        self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")

    def step(self, token_ids, lengths):
        attn_mask = torch.arange(token_ids.size(1), device=lengths.device)[None] < lengths[:, None]
        lm_labels = token_ids.new(token_ids.size()).copy_(token_ids)
        lm_labels[~attn_mask] = -100
        s_out = self.student(input_ids=token_ids, attention_mask=attn_mask, output_hidden_states=True)
        with torch.no_grad():
            t_out = self.teacher(input_ids=token_ids, attention_mask=attn_mask, output_hidden_states=True)
        s_logits, t_logits = s_out.logits, t_out.logits
        mask = attn_mask.unsqueeze(-1).expand_as(s_logits)
        s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
        t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
        T = self.temperature
        loss_ce = self.ce_loss_fct(F.log_softmax(s_logits_slct / T, dim=-1),
                                   F.softmax(t_logits_slct / T, dim=-1)) * T**2
        loss = self.alphas["ce"] * loss_ce
        shift_logits = s_logits[..., :-1, :].contiguous()
        shift_labels = lm_labels[..., 1:].contiguous()
        loss_clm = self.lm_loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        loss = loss + self.alphas["clm"] * loss_clm
        s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
        mask = attn_mask.unsqueeze(-1).expand_as(s_hidden)
        dim = s_hidden.size(-1)
        s_hidden_slct = torch.masked_select(s_hidden, mask).view(-1, dim)
        t_hidden_slct = torch.masked_select(t_hidden, mask).view(-1, dim)
        target = s_hidden_slct.new(s_hidden_slct.size(0)).fill_(1)
        loss_cos = self.cosine_loss_fct(s_hidden_slct, t_hidden_slct, target)
        loss = loss + self.alphas["cos"] * loss_cos
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"ce": loss_ce.item(), "clm": loss_clm.item(), "cos": loss_cos.item()}  # upstream logged .item()


def project_config(args, device, dump_path):
    """train.py's settings (config.parse_config): the recipe's defaults, one step per batch, no records."""
    argv = ["--data_file", "unused", "--teacher_name", "random-init", "--student_config", str(STUDENT_CONFIG),
            "--dump_path", str(dump_path), "--warmup_prop", "0", "--batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", "1", "--max_steps", "1000000", "--log_interval", "1000000000",
            "--checkpoint_interval", "0", "--num_workers", "0", "--n_gpu", "1" if device.type == "cuda" else "0",
            "--precision", "bf16" if args.bf16 else "fp32"]
    argv += [] if args.compile is None else (["--compile"] if args.compile else ["--no-compile"])
    argv += [] if args.fused_loss else ["--no-fused_loss"]
    argv += [] if args.compile_mode is None else ["--compile_mode", args.compile_mode]
    argv += ["--kd_loss", args.kd_loss]
    return parse_config(argv)


def project_side(args, device, teacher_cfg, student_cfg, states, batch):
    from distiller import Distiller
    from lm_seqs_dataset import LmSeqsDataset, SpecialIds
    from utils import Runtime

    work = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # the run's dump_path, while the side lives
    params = project_config(args, device, work.name)
    teacher = build(teacher_cfg, "sdpa", states["teacher"])
    teacher.requires_grad_(False)
    teacher.eval()
    if params.precision == "bf16":
        teacher.to(torch.bfloat16)  # as train.py loads it
    student = build(student_cfg, "sdpa", states["student"])
    seqs = [row[: n].numpy() for row, n in zip(*batch)]  # the sampler needs a dataset; the batch is given
    dataset = LmSeqsDataset(seqs, student_cfg.n_positions, SpecialIds())
    distiller = Distiller(params, Runtime(device=device), dataset, student, teacher)
    return (distiller, work), lambda: distiller.optimize_step([batch]), distiller.raw_student()


def reference_side(args, device, teacher_cfg, student_cfg, states, batch):
    teacher = build(teacher_cfg, "eager", states["teacher"]).to(device)
    teacher.requires_grad_(False)
    teacher.eval()
    student = build(student_cfg, "eager", states["student"]).to(device)
    alphas = {k: RECIPE[f"alpha_{k}"] for k in ("ce", "clm", "cos")}
    upstream = UpstreamStep(student, teacher, RECIPE["learning_rate"], RECIPE["temperature"], alphas)
    token_ids, lengths = batch[0].to(device), batch[1].to(device)
    return upstream, lambda: upstream.step(token_ids, lengths), student


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, builder, args, device, teacher_cfg, student_cfg, states, batch):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    keep, step, student = builder(args, device, teacher_cfg, student_cfg, states, batch)
    if args.comparison_step:
        student.eval()  # the comparison step: no dropout, so both sides compute the same function
    terms = {k: float(v) for k, v in step().items()}
    student.train()
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        out = step()
    {k: float(v) for k, v in out.items()}  # the last step's values reach the host before the clock stops
    sync(device)
    elapsed = time.perf_counter() - start
    tokens = int(batch[1].sum()) * args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS, both sides so far
    profile = gpu_busy = None
    if args.profile and name == "project":
        profile, gpu_busy = profile_steps(step, device)
    del keep, step, student
    return {"name": name, "tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps, "peak_gib": peak,
            "terms": terms, "profile": profile, "gpu_busy": gpu_busy}


def profile_steps(step, device, n=3):
    """(table of the n steps' top operators, how busy the GPU was: kernel time / wall time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    try:
        table = averages.table(sort_by=key, row_limit=25)
    except Exception as err:  # the column name moved between torch versions
        table = averages.table(sort_by="self_" + key.replace("cuda", "device"), row_limit=25) \
            if "cuda" in key else f"profile unavailable ({err})"
    busy = None
    if device.type == "cuda":
        # The device's own events (kernels, copies), as the table's "Self CUDA time total": the CPU-side
        # operators report their kernels' time too, so counting every event would count it twice.
        from torch.autograd import DeviceType

        kernel_us = sum(e.self_device_time_total for e in averages
                        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        busy = {"steps": n, "wall_ms": 1e3 * wall, "kernel_ms": kernel_us / 1e3,
                "busy": kernel_us / 1e6 / wall}
    return table, busy


def close(a, b, rtol, atol):
    return abs(a - b) <= atol + rtol * abs(b)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Small models and batch, on the CPU unless --device.")
    parser.add_argument("--device", default=None, help="Default: cuda when available (cpu with --tiny).")
    parser.add_argument("--batch_size", type=int, default=None, help="Default 8 (4 with --tiny).")
    parser.add_argument("--seq_len", type=int, default=None, help="Default 1024 (64 with --tiny).")
    parser.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=None,
                        help="Rows of different lengths, right-padded (default: with --tiny only).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 10; 2 with --tiny).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3; 1 with --tiny).")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="Project side in bf16 (default: on with CUDA, off on the CPU).")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="Project side compiled (train.py's default: on with CUDA, off on the CPU).")
    parser.add_argument("--fused_loss", action=argparse.BooleanOptionalAction, default=True,
                        help="Project side: train.py's --fused_loss (on) or --no-fused_loss (whole logits).")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default=None,
                        help="Project side: train.py's --compile_mode (default: torch's default mode).")
    parser.add_argument("--kd_loss", choices=KD_LOSSES, default="fkl",
                        help="Project side: train.py's --kd_loss; the 2019 reference has fkl only, so another "
                             "objective needs --skip_reference.")
    parser.add_argument("--skip_reference", action="store_true", help="Time the project side only.")
    parser.add_argument("--comparison_step", action=argparse.BooleanOptionalAction, default=True,
                        help="Run the first step with dropout off, the one whose loss terms are compared (on). "
                             "--no-comparison_step (with --skip_reference) runs it in training mode: a compiled "
                             "student is then compiled once, not twice (eval, then train).")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="Peak dense TFLOP/s for MFU (989: H100/H200 bf16).")
    parser.add_argument("--profile", action="store_true", help="Print a torch.profiler table of 3 project steps.")
    parser.add_argument("--json", default=None, help="Write the results here as JSON.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args(argv)
    if not args.comparison_step and not args.skip_reference:
        parser.error("--no-comparison_step leaves nothing to compare the reference with: add --skip_reference")
    if args.kd_loss != "fkl" and not args.skip_reference:
        parser.error(f"--kd_loss {args.kd_loss}: the 2019 reference computes forward KL only; add --skip_reference")

    import logging

    from utils import _no_attention_mask_advice  # both sides' models: no mask on purpose, or a real one

    logging.getLogger("transformers.modeling_utils").addFilter(_no_attention_mask_advice)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.batch_size = args.batch_size or (4 if args.tiny else 8)
    args.seq_len = args.seq_len or (64 if args.tiny else 1024)
    args.ragged = args.tiny if args.ragged is None else args.ragged
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
    args.bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32, as in 2019
        torch.backends.cudnn.allow_tf32 = False

    teacher_cfg, student_cfg = configs(args.tiny)
    torch.manual_seed(0)
    states = {"teacher": build(teacher_cfg, "eager").state_dict(), "student": build(student_cfg, "eager").state_dict()}
    batch = make_batch(args.batch_size, args.seq_len, teacher_cfg.vocab_size, args.ragged)
    seq = batch[0].size(1)
    flops = step_flops_per_token(teacher_cfg, student_cfg, seq)

    results = []
    if not args.skip_reference:
        results.append(measure("reference", reference_side, args, device, teacher_cfg, student_cfg, states, batch))
    results.append(measure("project", project_side, args, device, teacher_cfg, student_cfg, states, batch))
    for r in results:
        r["mfu"] = r["tokens_per_s"] * flops / (args.peak_tflops * 1e12)

    rtol, atol = (3e-2, 1e-3) if args.bf16 else (1e-4, 1e-6)
    by_name = {r["name"]: r for r in results}
    match = None
    if "reference" in by_name:
        match = all(close(by_name["project"]["terms"][k], by_name["reference"]["terms"][k], rtol, atol) for k in TERMS)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    project_label = "project (Distiller: " + ", ".join(
        [("bf16" if args.bf16 else "fp32"), "sdpa", ("fused loss" if args.fused_loss else "chunked loss")]
        + ([] if args.kd_loss == "fkl" else [args.kd_loss])
        + ([f"compile {args.compile_mode}" if args.compile_mode else "compile"] if by_compile(args, device) else [])) + ")"
    labels = {"reference": "reference (2019: fp32, eager, masked_select)", "project": project_label}
    lines = [
        f"distill step | {card} | torch {torch.__version__} | teacher {teacher_cfg.n_layer}x{teacher_cfg.n_embd} "
        f"student {student_cfg.n_layer}x{student_cfg.n_embd} vocab {teacher_cfg.vocab_size} | batch "
        f"{args.batch_size}x{seq} ({int(batch[1].sum())} real tokens) | {args.warmup} warm-up + {args.steps} timed steps",
        f"MFU = tokens/s x {flops / 1e6:.1f} MFLOP/token / {args.peak_tflops:g} TFLOP/s; FLOP/token = F(teacher) + "
        "3 F(student), F = 2(12 L d^2 + d V + 2 L S d)",
        "",
        "| step | tokens/s | MFU | peak GiB" + (" (GPU)" if device.type == "cuda" else " (RSS)")
        + " | " + " | ".join(TERMS) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in TERMS) + " |",
    ]
    for r in results:
        lines.append(f"| {labels[r['name']]} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.3g}% | {r['peak_gib']:.2f} | "
                     + " | ".join(f"{r['terms'][k]:.6f}" for k in TERMS) + " |")
    lines.append("")
    if match is not None:
        ratio = by_name["project"]["tokens_per_s"] / by_name["reference"]["tokens_per_s"]
        lines.append(f"speed ratio project/reference: {ratio:.2f}x")
        diffs = ", ".join(f"{k} {abs(by_name['project']['terms'][k] - by_name['reference']['terms'][k]):.2e}" for k in TERMS)
        lines.append(f"loss terms (first step, dropout off): |project - reference| {diffs}; "
                     f"tolerance {atol:g} + {rtol:g} x |reference|: {'MATCH' if match else 'MISMATCH'}")
    print("\n".join(lines))
    if by_name["project"]["profile"]:
        busy = by_name["project"]["gpu_busy"]
        if busy:
            lines.append(f"profile: {busy['kernel_ms']:.1f} ms of GPU kernels in {busy['steps']} steps of "
                         f"{busy['wall_ms'] / busy['steps']:.1f} ms: the GPU is busy {100 * busy['busy']:.0f}% of the time")
            print(lines[-1])
        print("\nprofile of 3 project steps:\n" + by_name["project"]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps({
            "card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv[1:] if argv is None else argv, "flops_per_token": flops, "peak_tflops": args.peak_tflops,
            "comparison_step": args.comparison_step,
            "batch": [args.batch_size, seq], "real_tokens": int(batch[1].sum()), "recipe": RECIPE, "match": match,
            "project_settings": {"precision": "bf16" if args.bf16 else "fp32", "fused_loss": args.fused_loss,
                                 "compile": by_compile(args, device), "compile_mode": args.compile_mode,
                                 "kd_loss": args.kd_loss},
            "results": [{k: v for k, v in r.items() if k != "profile"} for r in results], "table": lines,
        }, indent=2))
    return 0 if match in (None, True) else 1


def by_compile(args, device):
    return device.type == "cuda" if args.compile is None else args.compile


if __name__ == "__main__":
    sys.exit(main())
