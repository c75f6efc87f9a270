"""Run by test_tasks.py under torchrun (gloo, CPU): score a task with the items shared between the ranks.

    torchrun --nproc_per_node 2 tasks_worker.py MODEL_DIR TOKENIZER TASK_FILE OUT_DIR

Each process writes OUT_DIR/rank{R}.json: the summary every rank received, and how many items it scored.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import tasks
from perplexity import load_encoder
from utils import init_distributed


def main():
    model_dir, tokenizer, task_file, out_dir = sys.argv[1:5]
    runtime = init_distributed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = tasks.prepare_task(tasks.load_task_def("jcommonsenseqa"), task_file, load_encoder(tokenizer))
    scored, score = [], tasks.loglikelihoods

    def counting(model, requests, **kwargs):  # what this rank scores itself
        scored.append(len(requests))
        return score(model, requests, **kwargs)

    tasks.loglikelihoods = counting
    summary = tasks.shared_task_scores(model, data, runtime.global_rank, runtime.world_size, batch_size=4)
    scored_here = sum(scored) // 5  # JCommonsenseQA: five choices an item
    Path(out_dir, f"rank{runtime.global_rank}.json").write_text(json.dumps({"summary": summary,
                                                                            "scored_here": scored_here}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
