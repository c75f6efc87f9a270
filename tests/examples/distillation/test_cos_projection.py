"""--alpha_cos with a student narrower than its teacher: a learned projection of the student's last hidden
state to the teacher's width, trained with the student, saved in checkpoints (so a resume is exact) and
left out of the student (export and model.safetensors hold the student alone)."""

import json

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import distiller
import export
import train
from helpers import assert_same_weights, gpt2_config, train_args, weights


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def narrow(tiny_setup, tmp_path_factory):
    """tiny_setup with a 1 x 16 student under the 2 x 32 teacher."""
    folder = tmp_path_factory.mktemp("narrow")
    config = folder / "student16.json"
    config.write_text(json.dumps(gpt2_config(n_layer=1, n_embd=16).to_dict()))
    return {**tiny_setup, "student_config": config}


def args(setup, dump, *extra):
    return train_args(setup, dump, "--max_steps", "6", "--checkpoint_interval", "3", "--alpha_cos", "1.0", *extra)


@pytest.fixture(scope="module")
def reference(narrow, tmp_path_factory):
    dump = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed run (autouse one_thread starts after module fixtures): bit for bit
    try:
        train.run(args(narrow, dump))
    finally:
        torch.set_num_threads(threads)
    return dump


def test_the_projection_is_trained_and_checkpointed(reference):
    state = torch.load(checkpoint.list_checkpoints(reference)[0] / "training_state.pt", weights_only=True)
    projection = state["cos_projection"]["weight"]
    assert projection.shape == (32, 16)  # student width 16 -> teacher width 32
    first = torch.load(reference / "checkpoint_step00000003" / "training_state.pt", weights_only=True)
    assert not torch.equal(first["cos_projection"]["weight"], projection)  # it learns
    assert not any("projection" in k for k in weights(reference))  # the student alone


def test_cos_term_is_one_minus_cosine_of_the_projected_state(narrow, tmp_path):
    """The logged cos term at step 1 equals 1 - cos(P h_student, h_teacher) over the real positions of the
    step's batch, recomputed here from the initial student, the initial projection and the teacher."""
    from transformers import GPT2LMHeadModel

    from config import parse_config
    from lm_seqs_dataset import LmSeqsDataset
    from utils import Runtime
    from helpers import random_sequences

    params = parse_config(args(narrow, tmp_path / "one", "--alpha_ce", "0", "--alpha_clm", "0"))
    teacher = GPT2LMHeadModel.from_pretrained(narrow["teacher"]).eval()
    torch.manual_seed(0)
    student = GPT2LMHeadModel(gpt2_config(n_layer=1, n_embd=16))
    dataset = LmSeqsDataset(random_sequences(8, seed=2), 64)
    made = distiller.Distiller(params, Runtime(), dataset, student, teacher)
    projection = made.cos_projection.weight.detach().clone()
    batch = dataset.batch_sequences(dataset.sequences[:3])
    want, n = 0.0, 0
    with torch.no_grad():
        for row, length in zip(batch[0], batch[1].tolist()):
            s = student(input_ids=row[None, :length], output_hidden_states=True).hidden_states[-1][0]
            t = teacher(input_ids=row[None, :length], output_hidden_states=True).hidden_states[-1][0]
            want += (1 - F.cosine_similarity(s @ projection.t(), t, dim=-1)).sum().item()
            n += length
    terms = made.optimize_step([batch])
    made.log.close()
    assert terms["cos"].item() == pytest.approx(want / n, rel=1e-5)


def test_a_resumed_run_continues_the_projection_exactly(narrow, reference, tmp_path, monkeypatch):
    def crash_after_step_4(point, step):
        if (point, step) == ("after_step", 4):
            raise Crash

    dump = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(distiller, "inject_fault", crash_after_step_4)
        with pytest.raises(Crash):
            train.run(args(narrow, dump))
    train.run(args(narrow, dump, "--resume"))
    assert_same_weights(weights(reference), weights(dump), atol=0)
    final = [torch.load(d / checkpoint.list_checkpoints(d)[0].name / "training_state.pt", weights_only=True)
             for d in (reference, dump)]
    assert torch.equal(final[0]["cos_projection"]["weight"], final[1]["cos_projection"]["weight"])


def test_export_drops_the_projection(reference, tmp_path):
    out = export.export(str(reference), None, str(tmp_path / "out"))
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert not any("projection" in k for k in exported)
    assert exported["transformer.wte.weight"].shape[1] == 16
