"""The offline teacher's dump: tokens/s and bytes per token of teacher_logits.dump_shard (what each rank of
scripts/dump_teacher_logits.py runs) for a random GPT-2 teacher, and what float16 rows cost in precision.

    python bench/dump_teacher_logits_bench.py                  # 4 layers x 256, vocab 32,000, k = 64 and 8, CPU
    python bench/dump_teacher_logits_bench.py --seq_len 1024 --sequences 32 --threads 2 --json out.json

--sequences random sequences of --seq_len tokens are dumped at each k, with float16 log-probs (the
default) and float32; the teacher's forward alone is timed over the same batches, so the cost of the
top k and the writing shows. The float16 rows are compared with the float32 ones through the tail
mass 1 - sum(exp(top k)) that the KD term derives from them. The data loading and tokenizer of the
command are left out (seconds, once); the sequences all have the same length (no padding).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # run as a script: the repo root and examples/distillation importable (never on import)
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import teacher_logits  # noqa: E402
from lm_seqs_dataset import LmSeqsDataset, SpecialIds  # noqa: E402


def random_teacher(n_layer: int, n_embd: int, vocab: int, seq_len: int, logit_scale: float = 1.0):
    """A random GPT-2, its logits multiplied by logit_scale (through the final layer norm's affine map):
    a random model's next-token distribution is nearly uniform, a trained one's is not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=vocab,
                        n_positions=seq_len, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(logit_scale)
        model.transformer.ln_f.bias.mul_(logit_scale)
    return model


def random_dataset(n: int, seq_len: int, vocab: int) -> LmSeqsDataset:
    rng = np.random.default_rng(0)
    sequences = [np.concatenate(([1], rng.integers(7, vocab, seq_len - 2), [2])).astype(np.uint16) for _ in range(n)]
    return LmSeqsDataset(sequences, seq_len, SpecialIds())


def time_forward(model, dataset, batch_size: int) -> float:
    """tokens/s of the teacher's forward alone, over the dump's batches."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            token_ids, _ = dataset.pad_tokens(dataset.sequences[start : start + batch_size])
            model(input_ids=token_ids, use_cache=False)
    return int(dataset.lengths.sum()) / (time.perf_counter() - t0)


def time_dump(model, dataset, folder: Path, settings) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entry = teacher_logits.dump_shard(model, dataset, 0, len(dataset), folder, 0, settings, torch.device("cpu"),
                                      progress=False)
    seconds = time.perf_counter() - t0
    size = sum((folder / entry[k]["file"]).stat().st_size for k in ("ids", "logprobs"))
    return {"tokens_per_s": entry["tokens"] / seconds, "bytes_per_token": size / entry["tokens"], "entry": entry}


def tail_error(folder16: Path, folder32: Path, entry16: dict, entry32: dict) -> dict:
    """How far the tail mass from float16 rows is from the float32 one (float16 rounds down: tail >= exact)."""
    lp16 = np.load(folder16 / entry16["logprobs"]["file"]).astype(np.float64)
    lp32 = np.load(folder32 / entry32["logprobs"]["file"]).astype(np.float64)
    tail16, tail32 = 1 - np.exp(lp16).sum(-1), 1 - np.exp(lp32).sum(-1)
    return {"tail_mean": float(tail32.mean()), "tail_error_mean": float((tail16 - tail32).mean()),
            "tail_error_max": float(np.abs(tail16 - tail32).max()), "tail16_min": float(tail16.min())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--top_k", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--logit_scale", type=float, default=12.0,
                        help="Sharpens the random teacher: at 12 its entropy is about 4 nats and its top 64 hold "
                             "about 0.8 of the mass, like a trained LM's (1: nearly uniform).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="Write the figures here too.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = random_teacher(args.n_layer, args.n_embd, args.vocab, args.seq_len, args.logit_scale)
    dataset = random_dataset(args.sequences, args.seq_len, args.vocab)
    with torch.inference_mode():  # warm-up
        model(input_ids=dataset.pad_tokens(dataset.sequences[: args.batch_size])[0], use_cache=False)
    results = {"settings": vars(args), "forward_tokens_per_s": time_forward(model, dataset, args.batch_size), "dumps": []}
    print(f"teacher {args.n_layer} x {args.n_embd}, vocab {args.vocab:,}, logits x {args.logit_scale:g}; "
          f"{args.sequences} x {args.seq_len} tokens, "
          f"batch {args.batch_size}, {args.threads} thread(s); forward alone: {results['forward_tokens_per_s']:,.0f} tokens/s")
    print("| k | log-probs | tokens/s | bytes/token | tail mass (mean) | float16 tail error: mean, max |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.top_k:
            folders = {dtype: Path(tmp) / f"k{k}-{dtype}" for dtype in ("float16", "float32")}
            figures = {dtype: time_dump(model, dataset, folder,
                                        teacher_logits.DumpSettings(k, 1.0, args.vocab, args.batch_size, dtype))
                       for dtype, folder in folders.items()}
            error = tail_error(folders["float16"], folders["float32"], figures["float16"]["entry"],
                               figures["float32"]["entry"])
            for dtype, figure in figures.items():
                row = {"top_k": k, "logprobs_dtype": dtype, "tokens_per_s": figure["tokens_per_s"],
                       "bytes_per_token": figure["bytes_per_token"], **(error if dtype == "float16" else {})}
                results["dumps"].append(row)
                tail = f"{error['tail_error_mean']:.1e}, {error['tail_error_max']:.1e}" if dtype == "float16" else "–"
                print(f"| {k} | {dtype} | {row['tokens_per_s']:,.0f} | {row['bytes_per_token']:.1f} | "
                      f"{error['tail_mean']:.3f} | {tail} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
