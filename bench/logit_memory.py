"""Peak host memory of the logit terms of one micro-batch: the fused LM head + loss against the plain path.

    python bench/logit_memory.py                                   # 4 x 1024 rows, d 1024, vocab 32000 (about 1 min)
    python bench/logit_memory.py --batch 2 --seq 32 --width 32 --vocab 256 --json out.json   # seconds (test)

One forward + backward of the KD (forward KL, T = 1) and CLM terms with the recipe's weights, from
the student's final hidden states and LM head (and the teacher's), on the CPU in fp32, ragged rows:

- plain (train.py --no-fused_loss): `F.linear` to whole B x S x V logits for both models, then
  `losses.kd_loss_sum` and `losses.clm_loss_sum`, and autograd;
- fused (the default): `losses.fused_logit_terms`, the head matmul, the terms and their gradient
  chunk by chunk (`losses.FUSED_ROW_CHUNK` rows), no B x S x V tensor.

Each path runs in a fresh process. Its memory is the peak RSS of the process (ru_maxrss) minus its
RSS just before the step, once the inputs exist: what the step itself adds. The two paths' sums and
gradients (hidden states and head weight) are compared.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("fused", "plain")


def rss_kib() -> int:
    """The process's resident set size now (VmRSS), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args) -> None:
    """One path, in this process: the step, then its numbers (stdout, JSON) and gradients (args.grads)."""
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]
    import torch
    import torch.nn.functional as F

    import losses
    from config import RECIPE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, s, d, v = args.batch, args.seq, args.width, args.vocab
    # Made in place, so that making them leaves no temporary above what the inputs hold.
    h = torch.empty(b, s, d).normal_().requires_grad_()
    w = torch.empty(v, d).normal_(0, 0.02).requires_grad_()
    t_h, t_w = torch.empty(b, s, d).normal_(), torch.empty(v, d).normal_(0, 0.02)
    ids = torch.randint(7, v, (b, s))
    lengths = torch.randint(s // 2, s + 1, (b,))
    lengths[0] = s
    mask = losses.real_mask(lengths, s)
    n_real, n_pred = losses.count_positions(mask)
    weights = torch.tensor([RECIPE["alpha_ce"] / n_real, RECIPE["alpha_clm"] / n_pred, 0.0])
    spec = losses.KdSpec("fkl", 1.0)
    torch.ones(64, 64) @ torch.ones(64, 64)  # thread pools up before the baseline

    before, peak_before = rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.child == "fused":
        sums = losses.fused_logit_terms(h, (w, None), ids, lengths, weights, (True, True, False), spec,
                                        teacher=losses.HiddenTeacher(t_h, (t_w, None)), dtype=torch.float32)
        kd, clm = sums[0], sums[1]
    else:
        s_logits = F.linear(h, w)
        with torch.no_grad():
            t_logits = F.linear(t_h, t_w)
        kd = losses.kd_loss_sum(s_logits, t_logits, mask, spec)
        clm = losses.clm_loss_sum(s_logits, ids, mask)
    (weights[0] * kd + weights[1] * clm).backward()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"h": h.grad, "w": w.grad}, args.grads)
    print(json.dumps({"path": args.child, "rss_before_kib": before, "peak_before_kib": peak_before,
                      "peak_kib": peak, "step_kib": peak - before, "wall_s": wall,
                      "kd": float(kd), "clm": float(clm), "n_real": n_real, "n_pred": n_pred}))


def run_path(path: str, args, grads: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--grads", str(grads), "--batch", str(args.batch),
           "--seq", str(args.seq), "--width", str(args.width), "--vocab", str(args.vocab),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"logit_memory: the {path} path failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024, help="Hidden size d of both models.")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="Write the results here as JSON.")
    parser.add_argument("--child", choices=PATHS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = {p: run_path(p, args, Path(tmp) / f"{p}.pt") for p in PATHS}
        fused, plain = (torch.load(Path(tmp) / f"{p}.pt") for p in PATHS)
        agreement = {
            "kd": abs(results["fused"]["kd"] - results["plain"]["kd"]) / abs(results["plain"]["kd"]),
            "clm": abs(results["fused"]["clm"] - results["plain"]["clm"]) / abs(results["plain"]["clm"]),
            "grad_h": max_rel_diff(fused["h"], plain["h"]),
            "grad_w": max_rel_diff(fused["w"], plain["w"]),
        }
    rows = args.batch * args.seq
    logits_mib = rows * args.vocab * 4 / 2**20
    lines = [
        f"logit terms, one micro-batch | CPU, {args.threads} threads | torch {torch.__version__} | "
        f"{args.batch} x {args.seq} = {rows} rows, d {args.width}, vocab {args.vocab}, fp32 | KD (fkl) + CLM, "
        f"student and teacher heads | one fp32 B x S x V tensor = {logits_mib:,.0f} MiB",
        "",
        "| path | peak RSS above the inputs (MiB) | x logits tensor | step wall s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for p in PATHS:
        mib = results[p]["step_kib"] / 1024
        lines.append(f"| {p} | {mib:,.0f} | {mib / logits_mib:.2f} | {results[p]['wall_s']:.1f} |")
    ratio = results["plain"]["step_kib"] / max(results["fused"]["step_kib"], 1)
    lines += ["", f"plain / fused: {ratio:.1f}x; max relative difference fused vs plain: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items())]
    for p in PATHS:
        if results[p]["peak_before_kib"] > results[p]["peak_kib"] - 1024:
            lines.append(f"warning: the {p} path set no new peak: its figure is an upper bound")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "argv": sys.argv[1:] if argv is None else argv, "torch": torch.__version__,
            "shape": {"batch": args.batch, "seq": args.seq, "width": args.width, "vocab": args.vocab},
            "threads": args.threads, "logits_mib": logits_mib, "results": results, "agreement": agreement,
            "table": lines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
