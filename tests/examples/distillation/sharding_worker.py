"""Run by test_sharding.py under torchrun (gloo, CPU): shard tiny teachers and record what came out.

    torchrun --nproc_per_node 2 sharding_worker.py OUT_DIR

Each process writes OUT_DIR/rank{R}.jsonl, one line per model: how the teacher was wrapped, and
whether its outputs equal those of an unsharded copy bit for bit.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import sharding
from helpers import gpt2_config
from utils import init_distributed


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=192,
                                        tie_word_embeddings=False))


def tiny_gpt2():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(n_layer=3, n_embd=32))


def facts(build, dtype, runtime) -> dict:
    torch.manual_seed(0)
    teacher = build().eval().requires_grad_(False).to(dtype)
    plain = build().eval().requires_grad_(False).to(dtype)
    plain.load_state_dict(teacher.state_dict())
    report = sharding.shard_teacher(teacher, runtime)
    blocks = sharding.decoder_blocks(teacher)
    ids = torch.randint(7, 192, (2, 12))
    with torch.no_grad():
        out, ref = (m(input_ids=ids, output_hidden_states=True, use_cache=False) for m in (teacher, plain))
        base, ref_base = (m.base_model(input_ids=ids, use_cache=False).last_hidden_state for m in (teacher, plain))
    block_params = list(blocks.parameters())
    head = teacher.get_output_embeddings().weight
    n_block = sum(p.numel() for p in block_params)
    return {
        "rank": runtime.global_rank,
        "sharded_blocks": sum(isinstance(b, FSDPModule) for b in blocks),
        "blocks": len(blocks),
        "other_fsdp_modules": sum(isinstance(m, FSDPModule) for m in teacher.modules()) - len(blocks),
        "block_params_sharded": all(isinstance(p, DTensor) for p in block_params),  # after the forwards: resharded
        "local_block_rows": [p.to_local().shape[0] for p in block_params][:2],
        "full_block_rows": [p.shape[0] for p in block_params][:2],
        "whole": sorted(n for n, p in teacher.named_parameters() if not isinstance(p, DTensor)),
        "dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
        "head_is_plain_and_equal": type(head) is torch.nn.Parameter
                                   and torch.equal(head, plain.get_output_embeddings().weight),
        "head_tied": head is teacher.get_input_embeddings().weight,
        "logits_equal": torch.equal(out.logits, ref.logits),
        "hidden_equal": len(out.hidden_states) == len(ref.hidden_states)
                        and all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states)),
        "base_equal": torch.equal(base, ref_base),
        "local_bytes": report.local_bytes,
        "expected_bytes": (sum(p.numel() for p in teacher.parameters()) - n_block // 2) * head.element_size(),
    }


def main():
    runtime = init_distributed(0)
    lines = []
    for name, build, dtype in (("gpt2_bf16", tiny_gpt2, torch.bfloat16), ("gpt2_fp32", tiny_gpt2, torch.float32),
                               ("llama_bf16", tiny_llama, torch.bfloat16)):
        lines.append(json.dumps({"model": name, **facts(build, dtype, runtime)}) + "\n")
    Path(sys.argv[1], f"rank{runtime.global_rank}.jsonl").write_text("".join(lines))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # else a process that ends first can abort the other's gloo thread


if __name__ == "__main__":
    sys.exit(main())
