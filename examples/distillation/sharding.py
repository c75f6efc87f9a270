"""--shard_teacher: the frozen teacher split between the processes of each node with FSDP2.

A teacher too large for one GPU is held in pieces: each decoder block is its own FSDP2 unit
(`torch.distributed.fsdp.fully_shard`), its parameters split between the node's processes,
gathered for that block's forward only and freed right after it. Everything else (embeddings,
final norm, LM head) stays an ordinary full tensor on every process: the fused loss multiplies
the teacher's last hidden state by `teacher.get_output_embeddings().weight` outside the forward,
which needs the whole matrix, and these tensors are small next to the blocks.

The teacher is frozen: no gradient, no optimizer state, nothing to reduce. So nodes hold whole
replicas of it (a 2-D mesh, nodes x processes per node; FSDP2 calls it HSDP): every gather
stays inside a node, on its fast links, and costs nothing between nodes. The student stays DDP.
The parameters keep the teacher's dtype (bf16 under --precision bf16, which halves every gather).
"""

import logging
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from distil_ja.cli import UsageError
from utils import Runtime

logger = logging.getLogger("distillation")


@dataclass(frozen=True)
class ShardReport:
    """What shard_teacher did, for the log line and the tests."""

    blocks: int  # decoder blocks, each its own FSDP2 unit
    shards: int  # processes one block is split between (those of a node)
    replicas: int  # nodes, each holding the whole teacher
    local_bytes: int  # this process's share of the teacher's parameters
    full_bytes: int  # the whole teacher's parameters


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks, found without knowing its family.

    It is the ModuleList under `model.base_model` that holds the most parameters: GPT-2's
    `transformer.h`, Llama's and Qwen2's `model.layers`, GPT-NeoX's `gpt_neox.layers`.
    """
    lists = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UsageError(f"--shard_teacher: found no stack of decoder blocks in {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def check_shardable(teacher: nn.Module, runtime: Runtime) -> None:
    """UsageError unless shard_teacher can split this teacher between this node's processes."""
    per_node = runtime.procs_per_node
    if per_node < 2:
        raise UsageError(f"--shard_teacher splits the teacher between the processes of a node, and this node "
                         f"runs {per_node}: start several (torchrun --nproc_per_node N)")
    if runtime.world_size % per_node:
        raise UsageError(f"--shard_teacher needs the same number of processes on every node; {runtime.world_size} "
                         f"processes in all is no multiple of this node's {per_node}")
    decoder_blocks(teacher)


def node_mesh(runtime: Runtime):
    """The device mesh of the teacher: replicated over nodes, sharded over each node's processes."""
    per_node = runtime.procs_per_node
    nodes = runtime.world_size // per_node
    if nodes == 1:
        return init_device_mesh(runtime.device.type, (per_node,), mesh_dim_names=("shard",))
    return init_device_mesh(runtime.device.type, (nodes, per_node), mesh_dim_names=("node", "shard"))


def shard_teacher(teacher: nn.Module, runtime: Runtime) -> ShardReport:
    """Shard the teacher's decoder blocks in place and put the whole teacher on runtime.device.

    Collective: every process calls it, after check_shardable. Each block is its own FSDP2 root,
    with no common root above them: FSDP2 changes the class of the module it wraps, and transformers
    (5.x) looks up which outputs a model records (the hidden states of --alpha_cos) by its class
    name, so a wrapped `teacher.base_model` would lose them. A root keeps its parameters gathered
    after the forward unless told otherwise, hence reshard_after_forward=True: a process holds its
    shards plus one gathered block at a time. The forward runs the same through `teacher(...)` and
    `teacher.base_model(...)`.
    """
    blocks = decoder_blocks(teacher)
    mesh = node_mesh(runtime)
    full_bytes = tensor_bytes(teacher.parameters())
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)  # moves the block's shards to the device
    teacher.to(runtime.device)  # the rest, whole
    report = ShardReport(blocks=len(blocks), shards=mesh.shape[-1], replicas=mesh.size() // mesh.shape[-1],
                         local_bytes=local_bytes(teacher), full_bytes=full_bytes)
    logger.info("Teacher sharded (FSDP2): %d decoder blocks split between %d processes per node, %d node "
                "replica(s); %.1f MiB of its %.1f MiB of parameters on this process",
                report.blocks, report.shards, report.replicas, report.local_bytes / 2**20, report.full_bytes / 2**20)
    return report


def is_sharded(model: nn.Module) -> bool:
    """Whether shard_teacher sharded (and placed) this model."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: its shard of a sharded tensor, a whole one else."""
    return tensor_bytes(p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
