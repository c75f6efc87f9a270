"""run_distill.sh on several "nodes" and with a sharded teacher: real torchrun launches, CPU, gloo.

Two nodes are two run_distill.sh launches on this machine (NNODES=2, NODE_RANK=0/1, rendezvous on
127.0.0.1, one process each), the path a real cluster takes. Every run is compared with one node
running two processes (the reference, run once for the module): same global batch, so the same
weights bit for bit.
"""

import json
import os
import subprocess

import pytest
import torch

from helpers import REPO, free_port, weights

ARGS = ["--batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "6", "--learning_rate", "1e-3",
        "--warmup_prop", "0", "--log_interval", "2", "--checkpoint_interval", "2",
        "--alpha_ce", "0.5", "--alpha_clm", "0.5", "--alpha_cos", "0.1", "--no-group_by_size"]
TIMEOUT = 240


def launch(setup, dump, **env) -> subprocess.Popen:
    """run_distill.sh on the CPU with the tiny setup; env adds the topology (NNODES, NODE_RANK, ...)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "N_GPU": "0", "DATA": str(setup["data"]),
           "TEACHER": str(setup["teacher"]), "STUDENT_CONFIG": str(setup["student_config"]), "DUMP_PATH": str(dump),
           "MASTER_ADDR": "127.0.0.1", **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen(["bash", str(REPO / "run_distill.sh"), "--tokenizer_name", str(setup["tokenizer"]), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs: subprocess.Popen) -> list[str]:
    """Wait for every launch; their outputs. Kills them all when one hangs."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def two_nodes(setup, dumps, **env) -> list[str]:
    """One process on each of two nodes; dumps: each node's DUMP_PATH."""
    port = free_port()
    return finish(*(launch(setup, dump, NNODES=2, NODE_RANK=node, NPROC=1, MASTER_PORT=port, **env)
                    for node, dump in enumerate(dumps)))


@pytest.fixture(scope="module")
def one_node(tiny_setup, tmp_path_factory):
    """The reference: one node, two processes."""
    dump = tmp_path_factory.mktemp("one_node") / "run"
    finish(launch(tiny_setup, dump, NPROC=2, MASTER_PORT=free_port()))
    return dump


def metrics(dump):
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def student_state(checkpoint):
    return torch.load(checkpoint / "training_state.pt", weights_only=True)["student"]


def assert_equal_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_nodes_train_the_same_weights_as_one_node_with_two_processes(tiny_setup, one_node, tmp_path):
    dump = tmp_path / "shared"
    two_nodes(tiny_setup, [dump, dump])  # one dump path, seen by both nodes (a shared file system)
    assert_equal_tensors(weights(one_node), weights(dump))
    assert metrics(dump) == metrics(one_node)
    assert sorted(p.name for p in (dump / "checkpoint_step00000006").iterdir()) == \
        ["rank0.pt", "rank1.pt", "training_state.pt"]


@pytest.mark.slow
def test_a_node_killed_mid_run_is_restarted_and_both_node_local_folders_end_on_the_same_weights(
        tiny_setup, one_node, tmp_path):
    """Each node its own dump path (node-local disks); node 1's process is SIGKILLed after step 3, and
    torchrun --max-restarts restarts both nodes' processes from the checkpoint of step 2."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    out0, out1 = two_nodes(tiny_setup, [node0, node1], MAX_RESTARTS=1, DISTIL_FAULT="after_step:3:1")
    assert "DISTIL_FAULT: killing rank 1" in out1
    for out in (out0, out1):
        assert "torchrun restarted this worker: resuming" in out
    assert "Resumed from" in out0 and "step 2" in out0
    assert f"{node1} is this node's own folder" in out1
    assert_equal_tensors(weights(one_node), weights(node0))
    assert metrics(node0) == metrics(one_node)
    # node 1's folder: what its process reads back, and a copy of each checkpoint's training state
    assert sorted(p.name for p in node1.iterdir() if not p.name.startswith(".")) == \
        ["checkpoint_step00000002", "checkpoint_step00000004", "checkpoint_step00000006",
         "parameters.json", "token_cache"]
    assert sorted(p.name for p in (node1 / "checkpoint_step00000006").iterdir()) == ["rank1.pt", "training_state.pt"]
    assert sorted(p.name for p in (node0 / "checkpoint_step00000006").iterdir()) == ["rank0.pt", "training_state.pt"]
    for step in (4, 6):
        name = f"checkpoint_step{step:08d}"
        assert_equal_tensors(student_state(node0 / name), student_state(node1 / name))


@pytest.mark.slow
def test_a_teacher_sharded_between_two_processes_teaches_the_same_weights(tiny_setup, one_node, tmp_path):
    dump = tmp_path / "sharded"
    (out,) = finish(launch(tiny_setup, dump, NPROC=2, MASTER_PORT=free_port(), SHARD_TEACHER=1))
    assert "Teacher sharded (FSDP2): 2 decoder blocks split between 2 processes per node, 1 node replica(s)" in out
    assert json.loads((dump / "parameters.json").read_text())["shard_teacher"] is True
    assert_equal_tensors(weights(one_node), weights(dump))
    assert metrics(dump) == metrics(one_node)
