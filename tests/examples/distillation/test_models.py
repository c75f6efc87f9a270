"""models.py: a model of another family than the one named is refused in one line everywhere a model
is loaded; configs, state-dict files and training checkpoints load with every key accounted for."""

import json

import pytest
import torch

import export
import models
import train
from helpers import TINY_VOCAB, gpt2_config, load_script, train_args
from distil_ja.cli import EXIT_USAGE, UsageError

extract = load_script("examples/distillation/scripts/extract.py")


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama model folder and its config JSON: loadable as GPT-2 by transformers, with random weights."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(folder / "model")
    (folder / "config.json").write_text(json.dumps(llama_config().to_dict()))
    return {"dir": folder / "model", "config": folder / "config.json"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flag, key, what, expected", [
    ("--teacher_name", "dir", "teacher", "but 'gpt2' was asked for"),
    ("--student_config", "config", "student config", "but 'gpt2' was asked for"),
    ("--student_pretrained_weights", "dir", "--student_pretrained_weights", "the student config is a 'gpt2' one"),
])
def test_train_refuses_another_family_than_named(tiny_setup, llama, tmp_path, capsys, flag, key, what, expected):
    args = train_args(tiny_setup, tmp_path / "run", "--student_type", "gpt2", "--teacher_type", "gpt2")
    if flag in args:
        args[args.index(flag) + 1] = str(llama[key])
    else:
        args += [flag, str(llama[key])]
    assert train.main(args) == EXIT_USAGE
    line = one_error_line(capsys)
    assert what in line and "is a 'llama' model" in line and expected in line
    assert not (tmp_path / "run").exists()


def test_student_weights_of_another_family_are_refused_under_auto(tiny_setup, llama, tmp_path, capsys):
    """auto takes the family from the student config; weights of another family would load as random."""
    args = train_args(tiny_setup, tmp_path / "run", "--student_pretrained_weights", str(llama["dir"]))
    assert train.main(args) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "is a 'llama' model, but the student config is a 'gpt2' one" in line


def test_transformers_alone_would_load_the_llama_teacher_as_a_random_gpt2(llama):
    """Why the check exists: the plain class call succeeds and gives weights that are not the teacher's."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    silently = GPT2LMHeadModel.from_pretrained(llama["dir"])  # no error: a GPT-2 with fresh random weights
    real = LlamaForCausalLM.from_pretrained(llama["dir"])
    assert not torch.equal(silently.transformer.wte.weight, real.model.embed_tokens.weight)
    with pytest.raises(UsageError, match="is a 'llama' model"):
        models.load_pretrained(str(llama["dir"]), "gpt2", "teacher")


def test_extract_refuses_another_family(tiny_setup, llama, tmp_path, capsys):
    student = tmp_path / "student.json"
    student.write_text(json.dumps(gpt2_config(n_layer=1).to_dict()))
    out = tmp_path / "init.pth"
    assert extract.main(["--teacher", str(llama["dir"]), "--student_config", str(student),
                         "--dump_checkpoint", str(out)]) == EXIT_USAGE
    assert "teacher" in one_error_line(capsys)
    assert extract.main(["--teacher", str(tiny_setup["teacher"]), "--student_config", str(llama["config"]),
                         "--dump_checkpoint", str(out)]) == EXIT_USAGE
    assert "is a 'llama' model" in one_error_line(capsys)
    assert not out.exists()


def test_export_refuses_another_family_than_the_run_named(tiny_setup, llama, tmp_path, capsys):
    import shutil

    dump = tmp_path / "dump"
    shutil.copytree(llama["dir"], dump)
    (dump / "parameters.json").write_text(json.dumps({"student_type": "gpt2"}))
    code = export.main(["--checkpoint", str(dump), "--tokenizer", str(tiny_setup["tokenizer"]),
                        "--output_dir", str(tmp_path / "out")])
    assert code == EXIT_USAGE and "is a 'llama' model" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_config_without_model_type_is_read_as_the_family(tmp_path):
    data = gpt2_config(n_layer=3, n_embd=48).to_dict()
    del data["model_type"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    config = models.load_config(path, "gpt2")
    assert (config.model_type, config.n_layer, config.n_embd) == ("gpt2", 3, 48)
    with pytest.raises(UsageError, match="names no model_type"):
        models.load_config(path, "auto")
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="unreadable student config"):
        models.load_config(path, "gpt2")


def test_a_config_that_is_no_causal_lm_is_refused(tmp_path):
    from transformers import T5Config

    path = tmp_path / "t5.json"
    path.write_text(json.dumps(T5Config(d_model=32).to_dict()))
    with pytest.raises(UsageError, match="is a 't5' model, which is not a causal LM"):
        models.load_config(path, "auto")


def test_state_dict_files_and_training_checkpoints(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    source = GPT2LMHeadModel(gpt2_config(n_layer=1))
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # tied: extract.py omits it
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"student": state, "optimizer": {}}, tmp_path / "training_state.pt")
    for path in (tmp_path / "w.safetensors", tmp_path / "training_state.pt"):
        loaded = models.read_state_dict(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        student = models.build_student(gpt2_config(n_layer=1), "gpt2", str(path))
        assert torch.equal(student.lm_head.weight, state["transformer.wte.weight"])

    untied = gpt2_config(n_layer=1)
    untied.tie_word_embeddings = False
    with pytest.raises(UsageError, match=r"missing \['lm_head.weight'\]"):
        models.load_state(GPT2LMHeadModel(untied), state, "w.safetensors")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="neither a state dict nor a training checkpoint"):
        models.read_state_dict(tmp_path / "list.pt")
