"""Plain helpers shared by the tests (fixtures live in conftest.py): tiny configs, random shards,
train.py argument lists, and readers of what a run wrote."""

import pickle
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "examples" / "distillation" / "train.py"
DUMP_PY = REPO / "examples" / "distillation" / "scripts" / "dump_teacher_logits.py"
TINY_VOCAB = 192


def gpt2_config(n_layer=2, n_embd=32, n_head=2, vocab_size=TINY_VOCAB, n_positions=64):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: runs are comparable bit for bit
    )


def family_config(family, n_layer=2, hidden=32, vocab_size=TINY_VOCAB, positions=64, **overrides):
    """A tiny config of a tested family (models.TESTED_FAMILIES), without dropout, bos 1 / eos 2 / pad 3
    like the tiny tokenizer. GPT-2 and Qwen2 tie the head to the embeddings (as Qwen2's small
    models do), GPT-NeoX and Llama do not; Llama and Qwen2 use grouped-query attention."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    if family == "gpt2":
        config = gpt2_config(n_layer=n_layer, n_embd=hidden, vocab_size=vocab_size, n_positions=positions)
    else:
        common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
        config = {
            "gpt_neox": lambda: GPTNeoXConfig(**common, hidden_dropout=0.0, attention_dropout=0.0,
                                              tie_word_embeddings=False),
            "llama": lambda: LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False),
            "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True),
        }[family]()
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def random_sequences(n, min_len=12, max_len=40, vocab_size=TINY_VOCAB, seed=0):
    """`<s> ... </s>` sequences of random ordinary tokens (ids 7..vocab-1)."""
    rng = np.random.default_rng(seed)
    return [
        np.concatenate(([1], rng.integers(7, vocab_size, rng.integers(min_len, max_len + 1) - 2), [2])).astype(np.uint16)
        for _ in range(n)
    ]


def write_shard(path: Path, sequences) -> Path:
    with open(path, "wb") as f:
        pickle.dump(sequences, f)
    return path


def train_args(setup, dump_path, *extra):
    """A complete train.py argument list for the tiny setup, CPU, fp32."""
    return [
        "--dump_path", str(dump_path), "--data_file", str(setup["data"]),
        "--student_config", str(setup["student_config"]), "--teacher_name", str(setup["teacher"]),
        "--tokenizer_name", str(setup["tokenizer"]), "--n_gpu", "0",
        "--batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "6",
        "--learning_rate", "1e-3", "--warmup_prop", "0.0", "--log_interval", "2", "--checkpoint_interval", "3",
        "--alpha_ce", "0.5", "--alpha_clm", "0.5", "--alpha_cos", "0.1", "--no-group_by_size",
        *extra,
    ]


def dump_args(setup, output_dir, *extra):
    """A complete dump_teacher_logits.py argument list for the offline setup: top 8, max_len 32, CPU."""
    return ["--teacher", str(setup["teacher"]), "--tokenizer_name", str(setup["tokenizer"]),
            "--data_file", str(setup["data"]), "--output_dir", str(output_dir), "--top_k", "8",
            "--max_len", "32", "--batch_size", "2", "--n_gpu", "0", *extra]


def load_script(relative_path: str):
    """A command (bench/, examples/distillation/scripts/: no packages) as a module, imported without running
    its `__main__` block, so it edits no sys.path."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dump_script():
    """scripts/dump_teacher_logits.py as a module."""
    return load_script("examples/distillation/scripts/dump_teacher_logits.py")


def weights(dump_path):
    """The final student's tensors (model.safetensors) of a run."""
    from safetensors.torch import load_file

    return load_file(str(dump_path / "model.safetensors"))


def assert_same_weights(a, b, atol):
    import torch

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def read_scalars(log_dir, tag):
    """A tensorboard scalar's values, read from the event files with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    values = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def assert_taid_t_follows_the_logged_kd(dump_path, schedule, total_steps):
    """A run logged at every step (--log_interval 1): its taid_t, in metrics.jsonl and tensorboard, is
    losses.TaidSchedule replayed over the KD term it logged (ce, the mean over the step's global batch)."""
    import json

    import pytest
    import torch

    lines = [json.loads(line) for line in (dump_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, total_steps + 1))
    state, replayed = schedule.initial(), []
    for n, line in enumerate(lines):
        state = schedule.update(state, torch.tensor(line["ce"], dtype=torch.float64), n, total_steps)
        replayed.append(state[0].item())
    logged = [m["taid_t"] for m in lines]
    assert logged == pytest.approx(replayed, rel=0, abs=1e-9)
    assert logged[0] == schedule.t_start and logged[-1] > logged[1] > schedule.t_start  # it moved
    assert read_scalars(dump_path / "log", "kd/taid_t") == pytest.approx(logged, abs=1e-6)
    return logged


def free_port() -> str:
    """A TCP port nobody listens on now, for torchrun's rendezvous: fixed ports collide between test runs
    sharing a machine, and a port still in TIME_WAIT refuses to listen."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(script, args, nproc: int = 2, timeout: int = 300):
    """A script under torchrun, `nproc` gloo processes on this machine, one thread each, the repo root and
    examples/distillation importable: the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           free_port(), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def torchrun_train(args, nproc: int = 2, timeout: int = 300):
    """train.py under torchrun (torchrun above)."""
    return torchrun(TRAIN_PY, args, nproc, timeout)


def chat_masks(sequences, seed=0):
    """Per sequence: a prompt, an assistant span, then trailing prompt tokens before </s> (mask 0)."""
    rng = np.random.default_rng(seed)
    masks = []
    for seq in sequences:
        n = len(seq)
        start = int(rng.integers(1, n // 2))
        end = int(rng.integers(start + 2, n - 2))
        mask = np.zeros(n, dtype=np.uint8)
        mask[start:end] = 1
        masks.append(mask)
    return masks


def write_corpus(folder, sequences, masks):
    """A binarized directory as binarize.py writes a chat corpus: one shard, its loss_mask extra, the manifest."""
    from distil_ja import shards

    folder.mkdir(parents=True)
    entry = {"file": "00000.pickle", "sequences": len(sequences), "tokens": int(sum(len(s) for s in sequences)),
             **shards.write_shard(folder / "00000.pickle", sequences)}
    entry["extras"] = shards.write_extras(folder, entry["file"], {"loss_mask": masks})
    shards.write_manifest(folder, {"shards": [entry]})
    return folder


def chat_args(setup, dump, data, *extra, offline=None):
    """train_args on `data`, no cosine term; offline: --teacher_logits DIR instead of the teacher."""
    args = train_args(setup, dump, "--alpha_cos", "0", *extra)
    args[args.index("--data_file") + 1] = str(data)
    if offline is not None:
        for flag in ("--teacher_name", "--tokenizer_name"):
            i = args.index(flag)
            del args[i : i + 2]
        args += ["--teacher_logits", str(offline)]
    return args
