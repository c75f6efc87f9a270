"""Per-process memory of a teacher split with --shard_teacher, measured on the CPU (gloo).

    torchrun --nproc_per_node N bench/shard_memory.py [--layers 4] [--hidden 2816] [--batch 1] [--seq 256]
    python bench/shard_memory.py --count_only --layers 36     (parameter counts of the full shape, no weights)

A GPT-NeoX-shaped teacher (the family and width of rinna/japanese-gpt-neox-3.6b, fewer layers by
default; random weights in bf16) is sharded as train.py does (sharding.shard_teacher; one process:
not sharded, the baseline). Each process reports the parameter bytes it holds, its private memory
once the teacher is in place, and the high-water mark of one no-grad forward above that (the
gathered block, activations and logits): /proc/self/status after resetting VmHWM.
The estimate for the 36-layer teacher (docs/scaling.md) extrapolates these numbers.
"""

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # run as a script: make the repo and the distillation code importable (never on import)
    sys.path[:0] = [str(REPO), str(REPO / "examples" / "distillation")]


def neox_config(layers: int, hidden: int, vocab: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=2048,
                         rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=False)


def parameter_counts(config) -> dict:
    """Parameters of the decoder blocks and of the rest, counted on the meta device (no memory)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    import sharding

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    blocks = sum(p.numel() for p in sharding.decoder_blocks(model).parameters())
    return {"blocks": blocks, "per_block": blocks // config.num_hidden_layers,
            "rest": sum(p.numel() for p in model.parameters()) - blocks}


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def settle() -> None:
    """Return freed memory to the system, so that the resident size counts live tensors."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(args) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM

    import sharding
    from utils import init_distributed

    runtime = init_distributed(0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy on the way
    teacher = GPTNeoXForCausalLM(neox_config(args.layers, args.hidden, args.vocab)).eval().requires_grad_(False)
    if runtime.is_distributed:
        sharding.check_shardable(teacher, runtime)
        sharding.shard_teacher(teacher, runtime)
    settle()
    resident = kib("RssAnon")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = kib("VmRSS")
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
    peak = kib("VmHWM") - before
    return {"rank": runtime.global_rank, "processes": runtime.world_size,
            "parameter_mib": sharding.local_bytes(teacher) / 2**20,
            "resident_mib": resident / 1024, "forward_peak_mib": peak / 1024}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--count_only", action="store_true", help="Print the parameter counts and stop.")
    args = parser.parse_args(argv)
    config = neox_config(args.layers, args.hidden, args.vocab)
    result = {"layers": args.layers, "hidden": args.hidden, **parameter_counts(config)}
    if not args.count_only:
        result.update(measure(args), batch=args.batch, seq=args.seq)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
