"""export.py / generate.py: a self-contained folder that plain Auto classes load in a fresh process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import export
from helpers import gpt2_config
from distil_ja.cli import EXIT_USAGE, UsageError

UPPERCASE_TEXT = "GPUとPythonで東京のAIモデルをTrainする。ＡＢＣの本"

FRESH_PROCESS = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out)
generator = pipeline("text-generation", model=model, tokenizer=tok)
sample = generator("今日は", max_new_tokens=5, do_sample=False)[0]["generated_text"]
print(json.dumps({
    "ids": tok(sys.argv[2])["input_ids"],
    "ids_plain": tok(sys.argv[2], add_special_tokens=False)["input_ids"],
    "lower_ids": tok(sys.argv[2].lower())["input_ids"],
    "special": [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
    "config": [model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id],
    "generation": [model.generation_config.bos_token_id, model.generation_config.eos_token_id],
    "sample": sample,
    "data_prep_loaded": any(m.startswith("data_prep") for m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def exported(tiny_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    ppl = folder / "results.json"
    ppl.write_text(json.dumps({"teacher": 12.5, "student_kd": 20.25, "student_no_kd": 24.0}))
    out = export.export(str(tiny_setup["teacher"]), str(tiny_setup["tokenizer"]), str(folder / "out"),
                        perplexity_files=[str(ppl)], eval_data="ja_dev.txt")
    return out


def binarize_ids(tokenizer, tmp_path, text):
    from data_prep.binarize import binarize
    from distil_ja.shards import read_shard

    (tmp_path / "t.txt").write_text(text + "\n", encoding="utf-8")
    binarize([str(tmp_path / "t.txt")], str(tokenizer), str(tmp_path / "bin"), num_workers=1, progress=False)
    return read_shard(str(tmp_path / "bin" / "00000.pickle"))[0].tolist()


def test_export_loads_with_auto_classes_in_a_fresh_process(exported, tiny_setup, tmp_path):
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported), UPPERCASE_TEXT], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["data_prep_loaded"]
    expected = binarize_ids(tiny_setup["tokenizer"], tmp_path, UPPERCASE_TEXT)  # <s> ... </s>
    assert got["ids"] == expected[:-1]  # <s> prepended, no </s> appended
    assert got["ids_plain"] == expected[1:-1]
    assert got["lower_ids"] == got["ids"]
    assert 0 in expected  # the text has characters outside the tiny vocabulary: <unk> 0 (not </s> 2) both ways
    assert got["special"] == [0, 1, 2, 3] and got["config"] == [1, 2, 3] and got["generation"] == [1, 2]
    assert got["sample"].startswith("今日は")


def test_exported_tokenizer_lowercases_by_itself(exported):
    """Direct check (not export.check_tokenizer): uppercase Latin text gets the ids of its lowercase,
    which the vocabulary has, so no <unk>; the reference ids come from sentencepiece, not transformers."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    upper, lower = "GPU Python PYTHON", "gpu python python"
    sp = spm.SentencePieceProcessor(model_file=str(exported / "spiece.model"))
    expected = [sp.bos_id(), *sp.encode(lower)]
    assert sp.unk_id() not in expected  # the test's premise: the vocabulary has these letters in lowercase
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok(lower)["input_ids"] == expected
    assert tok(upper)["input_ids"] == expected
    assert tok.unk_token_id not in tok(upper)["input_ids"]


def test_exported_weights_equal_the_checkpoint(exported, tiny_setup):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_card_has_recipe_and_perplexities(exported):
    card = (exported / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card
    assert "| student_kd | 20.250 |" in card and "ja_dev.txt" in card


def test_export_of_a_training_checkpoint_with_recipe(tiny_setup, tmp_path):
    from transformers import GPT2LMHeadModel

    dump = tmp_path / "dump"
    ckpt = dump / "checkpoint_step00000004"
    ckpt.mkdir(parents=True)
    torch.manual_seed(3)
    student = GPT2LMHeadModel(gpt2_config(n_layer=1))
    torch.save({"student": student.state_dict(), "counters": {"n_steps": 4}}, ckpt / "training_state.pt")
    (dump / "parameters.json").write_text(json.dumps({
        "student_config": str(tiny_setup["student_config"]), "tokenizer_name": str(tiny_setup["tokenizer"]),
        "teacher_name": "rinna/japanese-gpt2-medium", "alpha_ce": 0.5, "temperature": 2.0, "max_steps": 4}))
    (dump / "eval_results.json").write_text(json.dumps({"step": 4, "perplexity": 33.5}))
    out = export.export(str(dump), None, str(tmp_path / "out"))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, student.transformer.h[0].attn.c_attn.weight)
    card = (out / "README.md").read_text()
    assert "rinna/japanese-gpt2-medium" in card and "33.500" in card and "| temperature | 2.0 |" in card


def test_generate_prints_samples(exported, capsys):
    import generate

    generate.main(["--model", str(exported), "--prompt", "今日は", "--num_samples", "2", "--max_new_tokens", "4",
                   "--seed", "0"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "今日は" in out


def test_generate_silences_the_attention_mask_advice(exported):
    """generate() passes the mask, so transformers' advice to pass one is noise; other warnings still show."""
    import logging

    import generate

    generate.main(["--model", str(exported), "--prompt", "今日は", "--num_samples", "1", "--max_new_tokens", "2"])
    seen = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())
    for name in ("transformers.generation.utils", "transformers.modeling_utils"):
        advising = logging.getLogger(name)
        advising.addHandler(collect)
        try:
            advising.warning("Please pass your input's `attention_mask` to obtain reliable results.")
            advising.warning("an unrelated warning")
        finally:
            advising.removeHandler(collect)
    assert seen == ["an unrelated warning"] * 2


@pytest.mark.parametrize("make_args, message", [
    (lambda s, t: ["--checkpoint", str(t / "missing"), "--tokenizer", str(s["tokenizer"])], "no such file"),
    (lambda s, t: ["--checkpoint", str(s["teacher"])], "--tokenizer"),
    (lambda s, t: ["--checkpoint", str(s["teacher"]), "--tokenizer", str(t / "nope")], "cannot load tokenizer"),
])
def test_bad_input_gives_one_clear_line(tiny_setup, tmp_path, capsys, make_args, message):
    assert export.main([*make_args(tiny_setup, tmp_path), "--output_dir", str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


def test_non_empty_output_needs_force(exported, tiny_setup):
    with pytest.raises(UsageError, match="--force"):
        export.export(str(tiny_setup["teacher"]), str(tiny_setup["tokenizer"]), str(exported))


def test_no_exported_file_names_a_folder_of_the_machine(tiny_setup, tmp_path):
    """Issue 22: the card held the absolute paths of the user's folders (student_config, data_file, ...).
    Paths are written relative to the dump path, or as their names; hub names stay as they are."""
    dump = tmp_path / "home" / "alice" / "runs" / "dump"
    ckpt = dump / "checkpoint_step00000002"
    ckpt.mkdir(parents=True)
    from transformers import GPT2LMHeadModel

    student = GPT2LMHeadModel(gpt2_config(n_layer=1))
    torch.save({"student": student.state_dict(), "counters": {"n_steps": 2}}, ckpt / "training_state.pt")
    inside = dump / "init.safetensors"
    inside.write_bytes(b"")
    (dump / "parameters.json").write_text(json.dumps({
        "student_config": str(tiny_setup["student_config"]), "tokenizer_name": str(tiny_setup["tokenizer"]),
        "teacher_name": "rinna/japanese-gpt2-medium", "data_file": [str(tmp_path / "home" / "alice" / "bin")],
        "student_pretrained_weights": str(inside), "max_steps": 2}))
    (dump / "eval_results.json").write_text(json.dumps({"step": 2, "perplexity": 30.0}))
    out = export.export(str(dump), None, str(tmp_path / "out"), eval_data=str(tmp_path / "home" / "alice" / "dev.txt"))
    for path in out.iterdir():
        if path.suffix in (".md", ".json", ".txt") or path.name.startswith("."):
            text = path.read_text(encoding="utf-8", errors="replace")
            assert str(tmp_path) not in text and "alice" not in text, (path.name, text[:2000])
    card = (out / "README.md").read_text()
    assert '| student_pretrained_weights | "init.safetensors" |' in card  # relative to the dump path
    assert '| data_file | ["bin"] |' in card and "| teacher_name | \"rinna/japanese-gpt2-medium\" |" in card
    assert f'| student_config | "{tiny_setup["student_config"].name}" |' in card
    assert "Held-out data: dev.txt." in card
