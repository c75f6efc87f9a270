"""--shard_teacher (sharding.py): which modules FSDP2 wraps, and that the teacher still computes the same.

FSDP2 runs on the CPU with gloo, bf16 parameters included: the worker shards tiny teachers between
two torchrun processes. train.py with --shard_teacher, end to end: tests/test_scaling.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import sharding
from distil_ja.cli import UsageError
from helpers import REPO, free_port, gpt2_config
from utils import Runtime

WORKER = Path(__file__).with_name("sharding_worker.py")


def tiny(family: str):
    import transformers as t

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "vocab_size": 192}
    if family == "gpt2":
        return t.GPT2LMHeadModel(gpt2_config())
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **small))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **small))
    return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**small))


@pytest.mark.parametrize("family, path", [("gpt2", "transformer.h"), ("llama", "model.layers"),
                                          ("qwen2", "model.layers"), ("gpt_neox", "gpt_neox.layers")])
def test_the_decoder_blocks_are_found_in_every_family(family, path):
    model = tiny(family)
    assert sharding.decoder_blocks(model) is model.get_submodule(path)


def test_a_model_without_a_stack_of_blocks_is_refused():
    class Flat(nn.Module):
        base_model = nn.Linear(2, 2)

    with pytest.raises(UsageError, match="no stack of decoder blocks in Flat"):
        sharding.decoder_blocks(Flat())


@pytest.mark.parametrize("runtime, words", [
    (Runtime(world_size=1), "this node runs 1"),
    (Runtime(world_size=2, local_world_size=1), "this node runs 1"),  # two nodes of one process
    (Runtime(world_size=6, local_world_size=4), "6 processes in all is no multiple of this node's 4"),
])
def test_what_cannot_be_split_between_a_nodes_processes_is_refused(runtime, words):
    with pytest.raises(UsageError, match=words):
        sharding.check_shardable(tiny("gpt2"), runtime)


@pytest.mark.slow
def test_fsdp2_shards_only_the_blocks_in_bf16_and_the_teacher_computes_the_same(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, REPO / "examples" / "distillation", REPO / "tests"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(WORKER), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(line) for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    assert sorted((f["model"], f["rank"]) for f in found) == \
        [(m, r) for m in ("gpt2_bf16", "gpt2_fp32", "llama_bf16") for r in (0, 1)]
    for f in found:
        assert f["sharded_blocks"] == f["blocks"] == 3 and f["other_fsdp_modules"] == 0, f
        assert f["block_params_sharded"], f
        assert f["local_block_rows"] == [n // 2 for n in f["full_block_rows"]], f
        assert f["head_is_plain_and_equal"] and f["logits_equal"] and f["hidden_equal"] and f["base_equal"], f
        assert f["local_bytes"] == f["expected_bytes"], f
        assert f["dtypes"] == (["torch.float32"] if f["model"] == "gpt2_fp32" else ["torch.bfloat16"]), f
        if f["model"].startswith("gpt2"):
            assert f["whole"] == ["transformer.ln_f.bias", "transformer.ln_f.weight",
                                  "transformer.wpe.weight", "transformer.wte.weight"], f
            assert f["head_tied"], f  # GPT-2's LM head is its token embedding, still one tensor
        else:
            assert f["whole"] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"], f
            assert not f["head_tied"], f


def test_the_distiller_leaves_a_sharded_teacher_where_it_is_and_uncompiled(tiny_setup, tmp_path, monkeypatch):
    """train.py placed it; compiling it would break the graph at every block's FSDP2 hooks (and recompile per
    block, past dynamo's limit: seen on the CPU)."""
    import distiller
    import models
    from config import parse_config
    from helpers import random_sequences, train_args
    from lm_seqs_dataset import LmSeqsDataset
    from transformers import GPT2LMHeadModel

    def moved(*args, **kwargs):
        raise AssertionError("a sharded teacher was moved")

    teacher = GPT2LMHeadModel.from_pretrained(tiny_setup["teacher"]).requires_grad_(False).eval()
    teacher.to = moved
    monkeypatch.setattr(distiller, "is_sharded", lambda model: model is teacher)
    params = parse_config(train_args(tiny_setup, tmp_path / "run", "--compile"))
    student = models.build_student(models.load_config(params.student_config, "gpt2"), "gpt2")
    built = distiller.Distiller(params, Runtime(), LmSeqsDataset(random_sequences(8), 64), student, teacher)
    assert built.teacher_body is not None and built.teacher_body._compiled_call_impl is None
    assert built.student._compiled_call_impl is not None  # --compile still compiles the student


def test_train_py_refuses_shard_teacher_on_one_process_in_one_line_before_writing(tiny_setup, tmp_path, capsys):
    import train
    from distil_ja.cli import EXIT_USAGE
    from helpers import train_args

    assert train.main(train_args(tiny_setup, tmp_path / "run", "--shard_teacher")) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --shard_teacher splits the teacher between the processes of a node, and this node "
                       "runs 1: start several (torchrun --nproc_per_node N)")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


def test_shard_teacher_needs_a_teacher():
    from config import parse_config

    alone = ["--data_file", "d", "--student_config", "s.json", "--tokenizer_name", "tok", "--n_gpu", "0",
             "--alpha_ce", "0", "--alpha_cos", "0", "--shard_teacher"]
    with pytest.raises(UsageError, match="--shard_teacher needs a teacher"):
        parse_config(alone)
