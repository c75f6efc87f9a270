"""Shared fixtures: a tiny rinna-layout tokenizer, a tiny byte-level BPE, tiny GPT-2 models and random token shards."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import (chat_masks, dump_args, dump_script, gpt2_config, random_sequences, train_args, write_corpus,
                     write_shard)

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


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer(tmp_path_factory) -> Path:
    """A folder holding a byte-level BPE of about 400 ids trained on TOKENIZER_TEXT, laid out like Qwen's:
    tokenizer.json only (no spiece.model), cased, no normaliser, one special token `<|endoftext|>`
    (id 0: eos and pad) and no bos. Another family and granularity than tiny_tokenizer's unigram."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TOKENIZER_TEXT.splitlines() * 3, vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    folder = tmp_path_factory.mktemp("bpe") / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="session")
def offline_setup(tiny_setup, tmp_path_factory):
    """The tiny setup with data in the tokenizer's ids (the teacher's 192 logits are padded beyond its
    vocabulary, "vocab"), many sequences longer than the dumps' max_len of 32."""
    from distil_ja.tokenization import load_tokenizer

    vocab = len(load_tokenizer(str(tiny_setup["tokenizer"])))
    folder = tmp_path_factory.mktemp("offline")
    data = write_shard(folder / "data.pickle", random_sequences(40, max_len=90, vocab_size=vocab, seed=1))
    return {**tiny_setup, "data": data, "vocab": vocab}


@pytest.fixture(scope="session")
def offline_dump(offline_setup, tmp_path_factory) -> Path:
    """dump_teacher_logits.py's default dump of the offline setup (float16, T = 1), one process."""
    folder = tmp_path_factory.mktemp("dumps") / "top8"
    assert dump_script().main(dump_args(offline_setup, folder)) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_setup, tmp_path_factory) -> Path:
    """The dump path of train.py's run of the tiny setup with train_args as they are (6 steps, logged every 2,
    checkpoints at 3 and 6), made once for the session. Read it, never write into it: copy it first."""
    import torch

    import train

    dump = tmp_path_factory.mktemp("tiny_run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside the tests (one_thread starts after session fixtures): the same floats
    try:
        train.run(train_args(tiny_setup, dump))
    finally:
        torch.set_num_threads(threads)
    return dump


@pytest.fixture(scope="session")
def chat_setup(offline_setup, tmp_path_factory):
    """offline_setup with a chat corpus of its sequences (cut to 60 tokens, so nothing is cut again) and a
    twin whose trailing prompt tokens (after the last assistant token, before </s>) are other tokens."""
    folder = tmp_path_factory.mktemp("chat")
    sequences = random_sequences(24, min_len=16, max_len=60, vocab_size=offline_setup["vocab"], seed=3)
    masks = chat_masks(sequences)
    twin = []
    rng = np.random.default_rng(9)
    for seq, mask in zip(sequences, masks):
        last = int(np.flatnonzero(mask)[-1])
        other = seq.copy()
        other[last + 1 : -1] = rng.integers(7, offline_setup["vocab"], len(seq) - last - 2)
        twin.append(other)
    return {**offline_setup, "data": write_corpus(folder / "data", sequences, masks),
            "twin": write_corpus(folder / "twin", twin, masks), "sequences": sequences, "masks": masks}


CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_tokenizer(tmp_path_factory, tiny_tokenizer) -> Path:
    """tiny_tokenizer with CHAT_MARKERS as special tokens (ids after its pieces) and CHAT_TEMPLATE as its
    chat template: a folder holding tokenizer.json and the same spiece.model, as binarize.py reads it."""
    import shutil

    from distil_ja.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_MARKERS})
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("chat_tokenizer") / "tok"
    tokenizer.save_pretrained(folder)
    shutil.copyfile(tiny_tokenizer / "spiece.model", folder / "spiece.model")
    return folder
