"""Run by test_evaluate.py under torchrun (gloo, CPU): score held-out text with the sequences shared between ranks.

    torchrun --nproc_per_node 2 heldout_worker.py MODEL_DIR TOKENIZER TEXT OUT_DIR

Each process writes OUT_DIR/rank{R}.json: the scores every rank received, and the characters of its own share.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from perplexity import held_out_scores, read_eval_data
from utils import init_distributed


def main():
    model_dir, tokenizer, text, out_dir = sys.argv[1:5]
    runtime = init_distributed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = read_eval_data(text, tokenizer)
    scores = held_out_scores(model, data, runtime.global_rank, runtime.world_size, batch_size=2)
    own = sum(data.share(runtime.global_rank, runtime.world_size).chars)
    Path(out_dir, f"rank{runtime.global_rank}.json").write_text(json.dumps({"scores": scores, "own_chars": own}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
