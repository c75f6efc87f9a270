"""scripts/extract.py: layer choice, exact copy, a useful start, clear errors, train.py integration."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, TINY_VOCAB, gpt2_config, load_script
from distil_ja.cli import EXIT_USAGE, UsageError

extract = load_script("examples/distillation/scripts/extract.py")

EXTRACT_PY = REPO / "examples" / "distillation" / "scripts" / "extract.py"


def test_default_layers_spread_over_the_depth():
    assert extract.default_layers(24, 6) == [0, 5, 9, 14, 18, 23]
    assert extract.default_layers(4, 2) == [0, 3]
    assert extract.default_layers(12, 12) == list(range(12))
    assert extract.default_layers(24, 1) == [23]
    for n_t, n_s in [(24, 4), (7, 3), (36, 6)]:
        layers = extract.default_layers(n_t, n_s)
        assert len(layers) == n_s and layers[0] == 0 and layers[-1] == n_t - 1 and layers == sorted(set(layers))
    with pytest.raises(UsageError):
        extract.default_layers(4, 6)


def test_keeping_every_layer_reproduces_the_teacher_exactly():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = gpt2_config(n_layer=3)
    teacher = GPT2LMHeadModel(config).eval()
    student = GPT2LMHeadModel(config)
    missing, unexpected = student.load_state_dict(extract.extract(teacher, config), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    student.eval()
    ids = torch.randint(7, TINY_VOCAB, (3, 40))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def markov_batch(rng, n, length=32):
    """Sequences where each token mostly follows a fixed rule from the previous one: learnable."""
    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, 0] = rng.integers(7, TINY_VOCAB, n)
    for t in range(1, length):
        follow = (seqs[:, t - 1] * 7 + 3) % (TINY_VOCAB - 7) + 7
        seqs[:, t] = np.where(rng.random(n) < 0.9, follow, rng.integers(7, TINY_VOCAB, n))
    return torch.from_numpy(seqs)


def lm_loss(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_two_of_four_layers_start_far_below_random_init():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    teacher = GPT2LMHeadModel(gpt2_config(n_layer=4, n_embd=32))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=5e-3)
    for _ in range(60):
        ids = markov_batch(rng, 16)
        teacher(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()
    held_out = markov_batch(np.random.default_rng(1), 64)

    config = gpt2_config(n_layer=2, n_embd=32)
    extracted = GPT2LMHeadModel(config)
    extracted.load_state_dict(extract.extract(teacher, config), strict=False)
    random_init = GPT2LMHeadModel(config)
    teacher_loss, extracted_loss, random_loss = (lm_loss(m.eval(), held_out) for m in (teacher, extracted, random_init))
    assert teacher_loss < 1.5
    assert extracted_loss < random_loss - 2.0, (teacher_loss, extracted_loss, random_loss)


def run_extract(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXTRACT_PY), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_output_feeds_train_py(tiny_setup, tmp_path):
    import train
    from transformers import GPT2LMHeadModel

    config = tmp_path / "student.json"
    config.write_text(json.dumps(gpt2_config(n_layer=1, n_embd=32, n_positions=32).to_dict()))
    out = tmp_path / "init.safetensors"
    proc = run_extract("--teacher", tiny_setup["teacher"], "--student_config", config, "--layers", "1",
                       "--dump_checkpoint", out)
    assert proc.returncode == 0, proc.stderr
    params = argparse.Namespace(student_type="gpt2", student_config=str(config), student_pretrained_weights=str(out),
                                freeze_pos_embs=False)
    student = train.load_student(params)
    teacher = GPT2LMHeadModel.from_pretrained(tiny_setup["teacher"])
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[1].mlp.c_fc.weight)
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight[:32])
    assert torch.equal(student.lm_head.weight, teacher.transformer.wte.weight)


@pytest.mark.parametrize("config_kwargs, layers, message", [
    ({"n_layer": 1, "n_embd": 64}, None, "hidden_size differs"),
    ({"n_layer": 2}, "0,5", "outside the teacher"),
    ({"n_layer": 2}, "0", "1 layer(s) chosen for a 2-layer student"),
    ({"n_layer": 2}, "a,b", "comma-separated"),
])
def test_cli_incompatible_models_give_one_clear_line(tiny_setup, tmp_path, capsys, config_kwargs, layers, message):
    config = tmp_path / "student.json"
    config.write_text(json.dumps(gpt2_config(**config_kwargs).to_dict()))
    extra = ["--layers", layers] if layers else []
    code = extract.main(["--teacher", str(tiny_setup["teacher"]), "--student_config", str(config),
                         "--dump_checkpoint", str(tmp_path / "x.pth"), *extra])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and message in err and err.count("error:") == 1
    assert not (tmp_path / "x.pth").exists()
