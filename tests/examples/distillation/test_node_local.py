"""node_local.py: which process writes which dump path, found out on several (played) nodes.

Fast: one process plays a rank of a later node, the collectives stubbed (the markers the other ranks
would have left are written beforehand). Slow: two processes under torchrun play every layout.
Real runs of two nodes, with one folder or one each: tests/test_scaling.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import node_local
from distil_ja.cli import UsageError
from helpers import REPO, free_port
from utils import Runtime

WORKER = Path(__file__).with_name("node_local_worker.py")


RUN_ID = "host:1:2"


@pytest.fixture
def played(monkeypatch):
    """claim(dump, global_rank, local_rank, marked_by): claim_dump_path as that rank of 2 nodes x 2 processes
    would, in a folder that rank `marked_by` (or nobody: None) has marked for this run; no process group."""
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: objects.__setitem__(0, RUN_ID))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)

    def claim(dump, global_rank, local_rank, marked_by):
        if marked_by is not None:
            node_local._mark(dump, RUN_ID, marked_by)
        runtime = Runtime(world_size=4, global_rank=global_rank, local_rank=local_rank, local_world_size=2)
        return node_local.claim_dump_path(dump, runtime)

    return claim


@pytest.mark.parametrize("rank, local_rank, marked_by, writes", [
    (2, 0, None, True),   # node 1's first process, rank 0's folder not visible: it writes the node's copy
    (3, 1, 2, False),     # its second process finds the node leader's (rank 2's) folder and uses it
    (3, 1, 0, False),     # a shared folder: rank 0 writes for everyone
    (2, 0, 0, False),
])
def test_the_node_leader_is_the_nodes_first_global_rank(played, tmp_path, rank, local_rank, marked_by, writes):
    assert played(tmp_path / "dump", rank, local_rank, marked_by) is writes


def test_a_process_that_finds_no_folder_of_its_nodes_leader_is_refused(played, tmp_path):
    with pytest.raises(UsageError, match=r"rank 3 finds no folder prepared by rank 0 or by its node's first process "
                                         r"\(rank 2\)"):
        played(tmp_path / "dump", 3, 1, None)
    with pytest.raises(UsageError, match=r"rank 3 finds the folder of rank 1, prepared neither by rank 0 nor by its "
                                         r"node's first process \(rank 2\)"):
        played(tmp_path / "other", 3, 1, 1)


@pytest.fixture(scope="module")
def claimed(tmp_path_factory):
    """What each of two processes got in every layout the worker plays (one torchrun launch)."""
    folder = tmp_path_factory.mktemp("claims")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, REPO / "examples" / "distillation"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(WORKER), str(folder)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("layout, writes", [
    ("one_node_shared", [True, False]),   # rank 0 writes for both, as on one machine
    ("two_nodes_shared", [True, False]),  # a shared file system: the same
    ("two_nodes_own", [True, True]),      # node-local disks: each node's first process writes its copy
])
def test_the_writer_of_each_folder(claimed, layout, writes):
    folder, results = claimed
    assert [r[layout] for r in results] == writes
    for rank, writer in enumerate(writes):
        name = f"node{rank}" if layout.endswith("own") else "shared"
        if writer:
            assert (folder / layout / name).is_dir()


@pytest.mark.slow
def test_processes_of_one_node_that_do_not_share_a_folder_are_refused_on_every_rank(claimed):
    folder, results = claimed
    errors = [r["one_node_split"] for r in results]
    assert errors[0] == errors[1]  # the same one line everywhere
    assert errors[0] == (f"UsageError: --dump_path {folder / 'one_node_split' / 'node1'}: rank 1 finds no folder "
                         "prepared by rank 0 or by its node's first process (rank 0); the processes of a node must "
                         "share one folder: the same on every node, or one per node (docs/scaling.md)")


@pytest.mark.slow
def test_node_copies_of_other_data_are_refused(claimed):
    _, results = claimed
    assert [r["same_data"] for r in results] == ["ok", "ok"]
    refusal = ("DataError: the token cache of rank 1 (2 sequences) differs from rank 0's (2 sequences): every node "
               "must read the same --data_file")
    assert [r["other_data"] for r in results] == [refusal, refusal]
