"""Training across tokenizers, end to end: binarize.py --teacher_tokenizer, train.py online and offline,
fused against plain, exact resume after SIGKILL, 2 processes against 1, each tested teacher family,
and every refusal in one line with its exit status."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from distil_ja.cli import EXIT_DATA, EXIT_USAGE
from helpers import (REPO, TRAIN_PY, assert_same_weights, dump_script, family_config, gpt2_config, torchrun_train,
                     weights)

SAMPLE = REPO / "data_prep" / "sample" / "ja_train.txt"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'examples' / 'distillation'}", "OMP_NUM_THREADS": "1"}


def tokenizer_size(path) -> int:
    from distil_ja.tokenization import load_tokenizer

    return len(load_tokenizer(str(path)))


@pytest.fixture(scope="module")
def cross_setup(tmp_path_factory):
    """A student tokenizer of about 1,100 pieces and a teacher tokenizer of about 1,600 trained on the sample
    text; a tiny GPT-2 teacher of the teacher's vocabulary saved with its tokenizer; the sample text
    binarized for the pair."""
    from transformers import GPT2LMHeadModel

    from data_prep.binarize import binarize
    from data_prep.make_tokenizer import train_tokenizer
    from distil_ja.tokenization import load_tokenizer

    folder = tmp_path_factory.mktemp("cross")
    train_tokenizer([str(SAMPLE)], 1100, str(folder / "student_tok"))
    train_tokenizer([str(SAMPLE)], 1600, str(folder / "teacher_tok"))
    t_vocab = tokenizer_size(folder / "teacher_tok")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_layer=2, n_embd=32, vocab_size=t_vocab, n_positions=128)).save_pretrained(
        folder / "teacher")
    load_tokenizer(str(folder / "teacher_tok")).save_pretrained(folder / "teacher")
    shutil.copyfile(folder / "teacher_tok" / "spiece.model", folder / "teacher" / "spiece.model")
    student = folder / "student.json"
    student.write_text(json.dumps(gpt2_config(n_layer=1, n_embd=32, vocab_size=tokenizer_size(folder / "student_tok"),
                                              n_positions=64).to_dict()))
    binarize([str(SAMPLE)], str(folder / "student_tok"), str(folder / "data"), num_workers=1, progress=False,
             teacher_tokenizer=str(folder / "teacher_tok"))
    binarize([str(SAMPLE)], str(folder / "student_tok"), str(folder / "plain_data"), num_workers=1, progress=False)
    return {"folder": folder, "teacher": folder / "teacher", "student_config": student, "data": folder / "data",
            "plain_data": folder / "plain_data", "tokenizer": folder / "student_tok",
            "teacher_tokenizer": folder / "teacher_tok", "teacher_vocab": t_vocab}


def cross_args(setup, dump, *extra):
    return ["--dump_path", str(dump), "--data_file", str(setup["data"]), "--student_config",
            str(setup["student_config"]), "--teacher_name", str(setup["teacher"]), "--tokenizer_name",
            str(setup["tokenizer"]), "--n_gpu", "0", "--batch_size", "4", "--gradient_accumulation_steps", "1",
            "--max_steps", "4", "--learning_rate", "1e-3", "--warmup_prop", "0.0", "--log_interval", "1",
            "--checkpoint_interval", "2", "--alpha_ce", "0.5", "--alpha_clm", "0.5", "--alpha_cos", "0.0",
            "--no-group_by_size", *extra]


def metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def test_binarize_writes_the_teachers_ids_and_the_alignment(cross_setup):
    manifest = json.loads((cross_setup["data"] / "manifest.json").read_text())
    assert manifest["teacher_tokenizer"]["vocab_size"] == cross_setup["teacher_vocab"]
    assert set(manifest["shards"][0]["extras"]) == {"teacher_ids", "alignment", "depth"}
    assert 0.5 < manifest["totals"]["aligned_share"] <= 1


def test_online_training_across_tokenizers(cross_setup, tmp_path, caplog):
    with caplog.at_level("INFO"):
        train.run(cross_args(cross_setup, tmp_path / "run"))
    assert "Cross-tokenizer distillation" in caplog.text and "aligned with a teacher position" in caplog.text
    steps = metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(0 < m["ce"] < 50 for m in steps)
    assert steps[-1]["ce"] < steps[0]["ce"]  # it learns from the teacher


WITHIN = [pytest.param((), id="aligned"), pytest.param(("--within_pieces",), id="within_pieces")]


@pytest.mark.parametrize("within", WITHIN)
def test_the_fused_path_equals_the_plain_one(cross_setup, tmp_path, within):
    for name, flag in (("fused", "--fused_loss"), ("plain", "--no-fused_loss")):
        train.run(cross_args(cross_setup, tmp_path / name, "--max_steps", "2", flag, *within))
    for a, b in zip(metrics(tmp_path / "fused"), metrics(tmp_path / "plain")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5) and a["clm"] == pytest.approx(b["clm"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "fused"), weights(tmp_path / "plain"), atol=1e-5)


def dump_every_piece(cross_setup, dump, *extra):
    k = cross_setup["teacher_vocab"] * (2 if "--within_pieces" in extra else 1)
    assert dump_script().main([
        "--teacher", str(cross_setup["teacher"]), "--tokenizer_name", str(cross_setup["tokenizer"]),
        "--data_file", str(cross_setup["data"]), "--output_dir", str(dump), "--max_len", "64",
        "--top_k", str(k), "--logprobs_dtype", "float32", "--batch_size", "4",
        "--n_gpu", "0", *extra]) == 0
    return dump


@pytest.fixture(scope="module")
def full_dump(cross_setup, tmp_path_factory):
    """The teacher's rows over every id a row holds (top_k = its vocabulary; with --within_pieces twice that,
    its pieces and those of the row read after s), float32: offline equals online."""
    return dump_every_piece(cross_setup, tmp_path_factory.mktemp("cross_dump") / "dump")


@pytest.fixture(scope="module")
def full_within_dump(cross_setup, tmp_path_factory):
    """full_dump made with --within_pieces."""
    return dump_every_piece(cross_setup, tmp_path_factory.mktemp("cross_within_dump") / "dump", "--within_pieces")


def offline_args(cross_setup, dump, run, *extra):
    args = cross_args(cross_setup, run, "--max_steps", "2", *extra)
    args[args.index("--teacher_name"):args.index("--teacher_name") + 2] = ["--teacher_logits", str(dump)]
    return args


@pytest.mark.parametrize("within", WITHIN)
def test_offline_with_every_teacher_piece_equals_online(cross_setup, full_dump, full_within_dump, tmp_path, within):
    dump = full_within_dump if within else full_dump
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["teacher_tokenizer"]["vocab_size"] == cross_setup["teacher_vocab"]
    assert manifest.get("depths") == ("exact" if within else None)
    train.run(offline_args(cross_setup, dump, tmp_path / "offline", *within))
    train.run(cross_args(cross_setup, tmp_path / "online", "--max_steps", "2", *within))
    for a, b in zip(metrics(tmp_path / "offline"), metrics(tmp_path / "online")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def n_classes(cross_setup) -> int:
    from distil_ja.alignment import next_character_classes
    from distil_ja.tokenization import load_tokenizer

    return next_character_classes(load_tokenizer(str(cross_setup["tokenizer"])),
                                  load_tokenizer(str(cross_setup["teacher_tokenizer"])))[2]


@pytest.mark.parametrize("within", WITHIN)
def test_offline_with_every_character_class_equals_online(cross_setup, tmp_path, capsys, within):
    """--char_classes at k = the number of classes: the same KD term as the online teacher's, with and
    without --within_pieces; training --cross_kd pieces from it is refused in one line."""
    dump = tmp_path / "dump"
    assert dump_script().main([
        "--teacher", str(cross_setup["teacher"]), "--tokenizer_name", str(cross_setup["tokenizer"]),
        "--data_file", str(cross_setup["data"]), "--output_dir", str(dump), "--max_len", "64",
        "--top_k", str(n_classes(cross_setup)), "--logprobs_dtype", "float32", "--batch_size", "4",
        "--n_gpu", "0", "--char_classes", *within]) == 0
    assert json.loads((dump / "manifest.json").read_text())["rows"] == "classes"
    train.run(offline_args(cross_setup, dump, tmp_path / "offline", *within))
    train.run(cross_args(cross_setup, tmp_path / "online", "--max_steps", "2", *within))
    for a, b in zip(metrics(tmp_path / "offline"), metrics(tmp_path / "online")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
    code, err = main_here(offline_args(cross_setup, dump, tmp_path / "pieces", "--cross_kd", "pieces", *within),
                          capsys)
    assert code == EXIT_USAGE and "holds next-character classes" in err and "--cross_kd chars only" in err


@pytest.mark.parametrize("depths", [None, True], ids=["without", "restricted_rows_only"])
def test_a_dump_without_within_pieces_reaches_the_aligned_positions_only(cross_setup, full_dump, full_within_dump,
                                                                          tmp_path, caplog, depths):
    old = tmp_path / "old_dump"  # rows inside teacher pieces of zeros, or of an older kind: not read
    shutil.copytree(full_dump, old)
    if depths is not None:
        manifest = json.loads((old / "manifest.json").read_text())
        manifest["depths"] = depths
        (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        train.run(offline_args(cross_setup, old, tmp_path / "offline", "--within_pieces"))
    assert "--within_pieces reaches the aligned positions only; dump it again with --within_pieces" in caplog.text
    train.run(offline_args(cross_setup, full_within_dump, tmp_path / "with_depths", "--within_pieces"))
    train.run(cross_args(cross_setup, tmp_path / "aligned_only", "--max_steps", "2"))  # without --within_pieces
    for a, b, c in zip(metrics(tmp_path / "offline"), metrics(tmp_path / "aligned_only"),
                       metrics(tmp_path / "with_depths")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4) and a["ce"] != pytest.approx(c["ce"], rel=1e-3)


def test_a_within_pieces_dump_trains_the_aligned_positions_as_any_dump(cross_setup, full_dump, full_within_dump,
                                                                        tmp_path):
    train.run(offline_args(cross_setup, full_within_dump, tmp_path / "within_dump"))
    train.run(offline_args(cross_setup, full_dump, tmp_path / "plain_dump"))
    for a, b in zip(metrics(tmp_path / "within_dump"), metrics(tmp_path / "plain_dump")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(cross_setup, tmp_path):
    args = cross_args(cross_setup, tmp_path / "killed", "--max_steps", "6", "--within_pieces")  # attached rows too
    train.run(cross_args(cross_setup, tmp_path / "whole", "--max_steps", "6", "--within_pieces"))
    env = {**ENV, "DISTIL_FAULT": "after_step:3"}
    killed = subprocess.run([sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(TRAIN_PY), *args, "--resume"], capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stderr
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    assert_same_weights(weights(tmp_path / "killed"), weights(tmp_path / "whole"), atol=0)


@pytest.mark.slow
def test_two_processes_equal_one(cross_setup, tmp_path):
    train.run(cross_args(cross_setup, tmp_path / "one", "--max_steps", "3", "--within_pieces"))
    result = torchrun_train(cross_args(cross_setup, tmp_path / "two", "--max_steps", "3", "--batch_size", "2",
                                       "--within_pieces"))
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen2"])
def test_each_family_teaches_across_tokenizers(cross_setup, family, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(family, vocab_size=cross_setup["teacher_vocab"],
                                                   positions=128)).save_pretrained(teacher)
    for name in os.listdir(cross_setup["teacher"]):
        if not name.startswith(("model", "config", "generation")):
            shutil.copyfile(cross_setup["teacher"] / name, teacher / name)
    train.run(cross_args({**cross_setup, "teacher": teacher}, tmp_path / "run", "--max_steps", "2", "--within_pieces"))
    assert all(0 < m["ce"] < 50 for m in metrics(tmp_path / "run"))


def main_here(args, capsys):
    """train.main in this process: (exit status, its one "error:" line, which must be the last of stderr)."""
    code = train.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("error: ") for line in err) == 1 and err[-1].startswith("error: "), err[-5:]
    return code, err[-1]


def test_data_without_the_teachers_ids_is_refused(cross_setup, tmp_path, capsys):
    args = cross_args(cross_setup, tmp_path / "run")
    args[args.index("--data_file") + 1] = str(cross_setup["plain_data"])
    code, err = main_here(args, capsys)
    assert code == EXIT_DATA and "binarized without --teacher_tokenizer" in err
    assert not (tmp_path / "run").exists()


def test_data_for_another_teacher_tokenizer_is_refused(cross_setup, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(cross_setup["data"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["teacher_tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = cross_args(cross_setup, tmp_path / "run")
    args[args.index("--data_file") + 1] = str(other)
    code, err = main_here(args, capsys)
    assert code == EXIT_DATA and "binarized for the teacher tokenizer" in err


def test_a_pair_that_hardly_aligns_is_refused(cross_setup, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(cross_setup["data"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["totals"]["boundary_agreement"] = 0.05
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = cross_args(cross_setup, tmp_path / "run")
    args[args.index("--data_file") + 1] = str(other)
    code, err = main_here(args, capsys)
    assert code == EXIT_DATA and "only 5.0% of the boundaries of the two tokenizations agree" in err


@pytest.mark.parametrize("flag", ["--alpha_cos", "--alpha_mse"])
def test_position_by_position_terms_are_refused(cross_setup, tmp_path, capsys, flag):
    code, err = main_here(cross_args(cross_setup, tmp_path / "run", flag, "0.1"), capsys)
    assert code == EXIT_USAGE and "with a teacher of another tokenizer set them to 0" in err
    assert not (tmp_path / "run").exists()


def test_a_class_dump_with_more_rows_than_classes_is_refused(cross_setup, tmp_path, capsys):
    k = n_classes(cross_setup) + 1
    code = dump_script().main([
        "--teacher", str(cross_setup["teacher"]), "--tokenizer_name", str(cross_setup["tokenizer"]),
        "--data_file", str(cross_setup["data"]), "--output_dir", str(tmp_path / "dump"), "--top_k", str(k),
        "--n_gpu", "0", "--char_classes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and err[-1].startswith("error: ")
    assert f"--top_k {k} exceeds the {k - 1} next-character classes" in err[-1]
    assert not (tmp_path / "dump" / "manifest.json").exists()
