"""Shared fixtures: a tiny rinna-layout tokenizer, tiny GPT-2 models and random token shards."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "examples" / "distillation" / "train.py"
TINY_VOCAB = 192

TOKENIZER_TEXT = """\
今日は朝から雨が降っていたので、駅まで傘をさして歩いた。
電車の中では本を読みながら、窓の外の景色を眺めていた。
この町には古い寺があり、春になると桜を見に多くの人が訪れる。
祖母が作る味噌汁は、昆布と鰹節でていねいに出汁をとっている。
新しい駅ビルには本屋と喫茶店が入っていて、週末はとても混む。
Pythonで小さなプログラムを書き、GPUで計算を速くする方法を学んだ。
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and far faster than two on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    from data_prep.make_tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    text = folder / "text.txt"
    text.write_text(TOKENIZER_TEXT * 3, encoding="utf-8")
    train_tokenizer([str(text)], 160, str(folder / "tok"))
    return folder / "tok"


def gpt2_config(n_layer=2, n_embd=32, n_head=2, vocab_size=TINY_VOCAB, n_positions=64):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: runs are comparable bit for bit
    )


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


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, tiny_tokenizer):
    """Paths: a teacher directory, a student config, a data shard and the tokenizer."""
    import torch
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32)).save_pretrained(folder / "teacher")
    student_config = folder / "student.json"
    student_config.write_text(json.dumps(gpt2_config(n_layer=1, n_embd=32).to_dict()))
    shard = write_shard(folder / "data.pickle", random_sequences(64))
    return {"teacher": folder / "teacher", "student_config": student_config, "data": shard,
            "tokenizer": tiny_tokenizer}


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
