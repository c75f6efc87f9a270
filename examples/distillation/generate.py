#!/usr/bin/env python
"""Print text sampled from a causal LM (an export.py folder, a dump_path or a hub name).

    python examples/distillation/generate.py --model exports/distilgpt2-ja --prompt "今日は" \
        [--num_samples 3] [--max_new_tokens 64] [--temperature 1.0] [--top_p 0.95] [--top_k 50] [--greedy]

The prompt is lowercased (the vocabulary is lowercase) and encoded without special tokens;
`<s>` is put in front, as in training. Exit status: 0 done, 2 bad arguments or model.
"""

import argparse
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo root importable (never on import)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from distil_ja.cli import ArgumentParser, UsageError, first_line, run_command, setup_logging  # noqa: E402
from distil_ja.tokenization import load_tokenizer, normalize_text  # noqa: E402
from models import load_causal_lm  # noqa: E402
from utils import silence_attention_mask_advice  # noqa: E402

logger = logging.getLogger("distillation.generate")


def load(model_name: str, tokenizer_name: str | None = None):
    model = load_causal_lm(model_name).eval()
    try:
        tokenizer = load_tokenizer(tokenizer_name or model_name)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/name
        raise UsageError(f"cannot load tokenizer {tokenizer_name or model_name!r}: {first_line(err)}") from err
    return model, tokenizer


def generate(model, tokenizer, prompt: str, num_samples: int = 1, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 0.95, top_k: int = 50, seed: int | None = None) -> list[str]:
    ids = tokenizer(normalize_text(prompt), add_special_tokens=False)["input_ids"]
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([ids] * num_samples, device=model.device)
    sampling = {} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **({"do_sample": False} if greedy else sampling))
    return [prompt + tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model folder or hub name.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer, if not in the model folder.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    return parser


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0:
        raise UsageError("--num_samples and --max_new_tokens must be >= 1 and --temperature > 0")
    model, tokenizer = load(args.model, args.tokenizer)
    samples = generate(model, tokenizer, args.prompt, args.num_samples, args.max_new_tokens, args.greedy,
                       args.temperature, args.top_p, args.top_k, args.seed)
    for i, text in enumerate(samples, 1):
        print(f"--- sample {i} ---\n{text}")


def main(argv=None) -> int:
    setup_logging()
    silence_attention_mask_advice()  # generate() passes the mask: the advice to pass one does not apply
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
