"""Every tested family (GPT-2, GPT-NeoX, Llama, Qwen2) as teacher and student: loading, the split
forward the fused loss relies on, a shared vocabulary, layer extraction, a few KD steps with exact
resume, export, evaluation and sampling. The models are tiny and random, built here with save_pretrained."""

import json
import shutil

import numpy as np
import pytest
import torch

import export
import models
import train
from distil_ja.cli import EXIT_USAGE, UsageError
from helpers import TINY_VOCAB, family_config, load_script, train_args, weights

FAMILIES = models.TESTED_FAMILIES
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers", "qwen2": "model.layers"}
CLASSES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}

extract = load_script("examples/distillation/scripts/extract.py")


def random_model(family, seed=0, **config_kwargs):
    """A tiny random model whose head is scaled up: peaked next-token distributions, so a student
    has something to learn from it in a few steps."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **config_kwargs))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model.eval()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """family -> a saved 2-layer teacher folder."""
    root = tmp_path_factory.mktemp("teachers")
    for family in FAMILIES:
        random_model(family).save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


def write_config(path, config):
    path.write_text(json.dumps(config.to_dict()))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_config_picks_the_class_with_sdpa_in_float32(family, tmp_path):
    """Saved in bfloat16 (as most hub checkpoints are): loaded in float32 all the same, with the
    same values, SDPA attention, and the family's class; a config that names bfloat16 builds a
    float32 student."""
    source = random_model(family)
    source.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    loaded = models.load_pretrained(str(tmp_path / "model"), "auto", "teacher")
    assert type(loaded).__name__ == CLASSES[family] and loaded.config.model_type == family
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded.dtype == torch.float32
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key

    config = family_config(family).to_dict() | {"torch_dtype": "bfloat16", "dtype": "bfloat16"}
    (tmp_path / "student.json").write_text(json.dumps(config))
    student = models.build_student(models.load_config(tmp_path / "student.json", "auto"))
    assert type(student).__name__ == CLASSES[family] and student.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_body_then_head_gives_the_model_logits(family):
    """What the distiller's fused path computes: the head (a plain Linear) on base_model's last
    hidden state (after the final norm) equals the model's own logits, for every tested family."""
    model = random_model(family)
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear
    ids = torch.randint(0, TINY_VOCAB, (2, 24))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(head(hidden), model(input_ids=ids, use_cache=False).logits, rtol=0, atol=1e-5)
    models.check_split_forward(model, "teacher")  # passes


def test_an_untested_family_that_soft_caps_its_logits_is_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UsageError, match="'gemma2' model transforms its logits"):
        models.check_split_forward(model, "teacher")


def test_a_family_without_sdpa_falls_back_to_eager_attention():
    tried = []

    def load(attention):
        tried.append(attention)
        if attention == "sdpa":
            raise ValueError("XForCausalLM does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet.")
        return attention

    assert models.with_attention(load, "teacher") == "eager" and tried == ["sdpa", "eager"]


@pytest.mark.parametrize("family", FAMILIES)
def test_context_length_and_position_embeddings(family):
    model = random_model(family, positions=48)
    assert models.max_positions(model.config) == 48
    positions = models.position_embeddings(model)
    if family == "gpt2":
        assert positions is model.transformer.wpe
    else:  # rotary
        assert positions is None


def test_a_named_type_refuses_another_family(teachers, tiny_setup, tmp_path, capsys):
    args = train_args({**tiny_setup, "teacher": teachers["gpt_neox"]}, tmp_path / "run", "--teacher_type", "llama")
    assert train.main(args) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "teacher" in line and "is a 'gpt_neox' model, but 'llama' was asked for" in line


def test_freeze_pos_embs_keeps_gpt2_positions_fixed(tiny_setup, tmp_path):
    from safetensors.torch import save_file

    initial = random_model("gpt2", n_layer=1).state_dict()
    save_file({k: v for k, v in initial.items() if k != "lm_head.weight"}, str(tmp_path / "init.safetensors"))
    student = write_config(tmp_path / "gpt2.json", family_config("gpt2", n_layer=1))
    train.run(train_args({**tiny_setup, "student_config": student}, tmp_path / "run", "--freeze_pos_embs",
                         "--student_pretrained_weights", str(tmp_path / "init.safetensors"), "--max_steps", "3"))
    final = weights(tmp_path / "run")
    assert torch.equal(final["transformer.wpe.weight"], initial["transformer.wpe.weight"])
    assert not torch.equal(final["transformer.wte.weight"], initial["transformer.wte.weight"])


def test_freeze_pos_embs_needs_learned_position_embeddings(tiny_setup, tmp_path, capsys):
    student = write_config(tmp_path / "llama.json", family_config("llama", n_layer=1))
    args = train_args({**tiny_setup, "student_config": student}, tmp_path / "run", "--freeze_pos_embs")
    assert train.main(args) == EXIT_USAGE
    assert "--freeze_pos_embs: the 'llama' student has no learned position embeddings" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---- vocabulary and special ids ---------------------------------------------------------


def checked(student_config, teacher_config, tokenizer_size=160):
    """train.check_compatibility on models of these configs (token ids of the tiny data only)."""
    student, teacher = (models.from_config(c) for c in (student_config, teacher_config))
    ids = train.SpecialIds(bos=1, eos=2, pad=3, unk=0)
    train.check_compatibility(student, teacher, ids, tokenizer_size, [np.array([1, 7, 100, 2])])


def test_a_teacher_padded_beyond_the_tokenizer_is_accepted(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="distillation"):
        checked(family_config("gpt2", n_layer=1), family_config("llama", n_layer=1, vocab_size=TINY_VOCAB + 64))
    assert f"padded to {TINY_VOCAB + 64} rows: its logits from {TINY_VOCAB} on" in caplog.text


@pytest.mark.parametrize("student_vocab, teacher_vocab, tokenizer_size, message", [
    (TINY_VOCAB + 64, TINY_VOCAB, 160, f"student vocab_size {TINY_VOCAB + 64} > teacher's {TINY_VOCAB}"),
    (TINY_VOCAB, TINY_VOCAB, TINY_VOCAB + 1, f"student vocab_size {TINY_VOCAB} < tokenizer's {TINY_VOCAB + 1}"),
    (TINY_VOCAB + 64, 150, 160, "teacher vocab_size 150 < tokenizer's 160"),
])
def test_a_vocabulary_mismatch_is_refused(student_vocab, teacher_vocab, tokenizer_size, message):
    with pytest.raises(UsageError, match=message):
        checked(family_config("llama", n_layer=1, vocab_size=student_vocab),
                family_config("gpt_neox", n_layer=1, vocab_size=teacher_vocab), tokenizer_size)


def test_a_vocabulary_mismatch_is_one_line_and_exit_2(teachers, tiny_setup, tmp_path, capsys):
    student = write_config(tmp_path / "big.json", family_config("qwen2", n_layer=1, vocab_size=TINY_VOCAB + 64))
    args = train_args({**tiny_setup, "teacher": teachers["llama"], "student_config": student}, tmp_path / "run")
    assert train.main(args) == EXIT_USAGE
    assert f"student vocab_size {TINY_VOCAB + 64} > teacher's {TINY_VOCAB}" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_absent_special_ids_in_a_config_are_tolerated_and_different_ones_refused():
    """Qwen2's config class names no bos/eos by default: the tokenizer's ids decide. An id that
    differs is another tokenizer's, and a list of end ids must hold the tokenizer's."""
    checked(family_config("qwen2", n_layer=1, bos_token_id=None, eos_token_id=None),
            family_config("llama", n_layer=1, eos_token_id=[2, 9]))
    with pytest.raises(UsageError, match="student config bos_token_id=0 but the tokenizer's is 1"):
        checked(family_config("gpt_neox", n_layer=1, bos_token_id=0), family_config("gpt_neox", n_layer=1))
    with pytest.raises(UsageError, match=r"teacher config eos_token_id=\[7, 9\] but the tokenizer's is 2"):
        checked(family_config("llama", n_layer=1), family_config("llama", n_layer=1, eos_token_id=[7, 9]))


# ---- scripts/extract.py -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_with_every_layer_reproduces_the_teacher_exactly(family):
    teacher = random_model(family, n_layer=3)
    config = family_config(family, n_layer=3)
    state = extract.extract(teacher, config)
    student = models.from_config(config)
    models.load_state(student, state, "extracted")  # every key accounted for
    head = next(name for name, m in student.named_modules() if m is student.get_output_embeddings())
    assert (f"{head}.weight" in state) == (not config.tie_word_embeddings)  # lm_head (embed_out: NeoX, 4.x)
    ids = torch.randint(0, TINY_VOCAB, (3, 40))
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_takes_evenly_spread_blocks_and_the_rest(family):
    teacher = random_model(family, n_layer=4)
    config = family_config(family, n_layer=2, positions=32)
    student = models.from_config(config)
    models.load_state(student, extract.extract(teacher, config), "extracted")
    t_blocks, s_blocks = teacher.get_submodule(BLOCKS[family]), student.get_submodule(BLOCKS[family])
    for s_index, t_index in ((0, 0), (1, 3)):
        expected = t_blocks[t_index].state_dict()
        for key, value in s_blocks[s_index].state_dict().items():
            assert torch.equal(value, expected[key]), (s_index, key)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    t_rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith(BLOCKS[family])}
    for key, value in student.state_dict().items():
        if not key.startswith(BLOCKS[family]):  # embeddings, final norm, head (learned positions: the first 32)
            assert torch.equal(value, t_rest[key][: len(value)]), key


def test_extract_refuses_to_copy_across_families(capsys, tmp_path, teachers):
    config = write_config(tmp_path / "gpt2.json", family_config("gpt2", n_layer=1))
    code = extract.main(["--teacher", str(teachers["llama"]), "--student_config", str(config),
                         "--dump_checkpoint", str(tmp_path / "init.pth")])
    assert code == EXIT_USAGE
    assert "the student config is a 'gpt2' model and the teacher a 'llama' one" in one_error_line(capsys)
    assert not (tmp_path / "init.pth").exists()


def test_extract_refuses_another_intermediate_size(capsys, tmp_path, teachers):
    config = write_config(tmp_path / "llama.json", family_config("llama", n_layer=1, intermediate_size=48))
    code = extract.main(["--teacher", str(teachers["llama"]), "--student_config", str(config),
                         "--dump_checkpoint", str(tmp_path / "init.pth")])
    assert code == EXIT_USAGE and "mlp.gate_proj.weight has shape (48, 32) in the student" in one_error_line(capsys)


# ---- training ---------------------------------------------------------------------------


def metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


PAIRS = [(family, family) for family in FAMILIES] + [("gpt_neox", "gpt2"), ("gpt2", "llama")]


@pytest.mark.slow
@pytest.mark.parametrize("teacher_family, student_family", PAIRS, ids=[f"{t}-to-{s}" for t, s in PAIRS])
def test_kd_steps_end_to_end_with_exact_resume(teacher_family, student_family, teachers, tiny_setup, tmp_path):
    """A few KD steps (fused loss, cos term) lower the KD loss; the student is of its config's
    family whatever the teacher's; a resume from the middle checkpoint ends bit for bit the same."""
    from transformers import AutoModelForCausalLM

    student_config = write_config(tmp_path / "student.json", family_config(student_family, n_layer=1))
    setup = {**tiny_setup, "teacher": teachers[teacher_family], "student_config": student_config}

    def args(dump, *extra):
        return train_args(setup, dump, "--alpha_ce", "1", "--alpha_clm", "0.1", "--max_steps", "8",
                          "--checkpoint_interval", "4", "--log_interval", "1", "--learning_rate", "1e-2", *extra)

    run = tmp_path / "run"
    train.run(args(run))
    ce = [m["ce"] for m in metrics(run)]
    assert len(ce) == 8 and all(np.isfinite(ce)) and np.mean(ce[-2:]) < 0.9 * np.mean(ce[:2]), ce
    student = AutoModelForCausalLM.from_pretrained(run)
    assert type(student).__name__ == CLASSES[student_family]

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoint_step00000008")
    (resumed / "model.safetensors").unlink()
    train.run(args(resumed, "--resume"))
    assert metrics(resumed) == metrics(run)
    final, again = weights(run), weights(resumed)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["--fused_loss", "--no-fused_loss"])
def test_a_padded_teacher_distils(tiny_setup, tmp_path, fused):
    """Teacher rows beyond the student's vocabulary (and the tokenizer) are dropped before the loss:
    the run matches one with the same teacher cut to the student's vocabulary."""
    padded = random_model("llama", vocab_size=TINY_VOCAB + 64)
    padded.save_pretrained(tmp_path / "padded")
    cut = random_model("llama")
    cut.load_state_dict({k: v[:TINY_VOCAB] if v.shape[0] == TINY_VOCAB + 64 else v
                         for k, v in padded.state_dict().items()})
    cut.save_pretrained(tmp_path / "cut")
    student = write_config(tmp_path / "student.json", family_config("llama", n_layer=1))
    for name in ("padded", "cut"):
        setup = {**tiny_setup, "teacher": tmp_path / name, "student_config": student}
        train.run(train_args(setup, tmp_path / f"run-{name}", "--max_steps", "3", "--alpha_mse", "0.1", fused))
    a, b = weights(tmp_path / "run-padded"), weights(tmp_path / "run-cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# ---- export, evaluation, sampling -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_export_evaluate_and_generate(family, teachers, tiny_setup, tmp_path, capsys):
    """The exported folder loads with the Auto classes alone and gives the source model's logits;
    the card names the architecture; evaluate.py's perplexity is the model's own mean loss;
    generate.py samples from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import evaluate
    import generate
    from perplexity import perplexity

    out = export.export(str(teachers[family]), str(tiny_setup["tokenizer"]), str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    source = AutoModelForCausalLM.from_pretrained(teachers[family]).eval()
    ids = torch.tensor([tokenizer("今日は駅まで歩いた。")["input_ids"]])
    assert ids[0, 0] == 1 and len(tokenizer) <= model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)
    card = (out / "README.md").read_text()
    assert f"- {family}" in card and CLASSES[family] in card

    sequences = [np.array([1, *range(20, 40), 2]), np.array([1, *range(60, 75), 2])]
    with torch.no_grad():
        losses = [model(torch.tensor(s)[None], labels=torch.tensor(s)[None]).loss.item() for s in sequences]
    expected = float(np.exp(np.average(losses, weights=[len(s) - 1 for s in sequences])))
    result = perplexity(model, sequences, batch_size=2)  # batched: right padding
    assert result["tokens"] == sum(len(s) - 1 for s in sequences)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)

    (tmp_path / "dev.txt").write_text("今日は朝から雨が降っていた。\n\n駅まで傘をさして歩いた。\n", encoding="utf-8")
    assert evaluate.main(["--model", str(out), "--data", str(tmp_path / "dev.txt"), "--device", "cpu"]) == 0
    assert generate.main(["--model", str(out), "--prompt", "今日は", "--num_samples", "2", "--max_new_tokens", "4",
                          "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 2 and "perplexity" in printed


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attached_positions_read_what_a_separate_forward_reads(family, attention):
    """models.attached_rows: positions appended after a row (a 4-D mask, their own position ids) give the
    logits of a forward of that row's prefix followed by them, and leave the batch's own rows as they were."""
    from transformers import AutoModelForCausalLM

    config = family_config(family)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    ids, appended = torch.randint(7, TINY_VOCAB, (2, 10), generator=g), torch.randint(7, TINY_VOCAB, (2, 3), generator=g)
    attach = torch.tensor([[3, 6, -1], [0, 8, 5]])  # -1: padding
    mask, positions = models.attached_rows(10, attach, model.dtype)
    with torch.no_grad():
        got = model(input_ids=torch.cat([ids, appended], 1), attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got[:, :10], model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        for b in range(2):
            for e, j in enumerate(attach[b].tolist()):
                if j >= 0:
                    alone = model(input_ids=torch.cat([ids[b, : j + 1], appended[b, e : e + 1]])[None]).logits[0, -1]
                    torch.testing.assert_close(got[b, 10 + e], alone, rtol=1e-5, atol=1e-5)
