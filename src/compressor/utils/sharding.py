"""Weights sharded by torch's tensor parallelism (``torch.distributed.tensor`` DTensors).

``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` turns a Linear's weight
into a DTensor sharded over a one-dimensional device mesh: output rows (``Shard(0)``) or input
columns (``Shard(1)``), each rank holding a contiguous slice. What modifiers need of such a
weight is here: its layout (which dimension is split, and this rank's slice of it), a
reduction over the ranks that share it, a full copy for statistics over the whole tensor,
this rank's slice of a full tensor (a mask), and the in-place gathering of a whole model back
into ordinary tensors once training ends. Every function leaves an ordinary tensor alone.

FSDP2 (``fully_shard``) shards parameters as DTensors too (``Shard(0)``, a slice of rows per
rank): masks and scores use the same functions on them; ``utils.fsdp`` holds what is FSDP2's
own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from compressor.utils.fsdp import release_fully_sharded, remove_hooks_from

__all__ = [
    "ShardLayout",
    "full_tensor",
    "gather_sharded_model",
    "has_sharded_parameters",
    "is_sharded",
    "layout_of",
    "local_part",
    "local_view",
]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (sharded or replicated over a device mesh)."""
    return isinstance(tensor, DTensor)


@dataclass(frozen=True)
class ShardLayout:
    """How a DTensor weight is laid out over a one-dimensional device mesh.

    :param dim: the dimension split over the ranks (None: every rank holds the whole tensor)
    :param start: where this rank's slice begins along ``dim`` (0 when not split)
    :param stop: where it ends (exclusive)
    :param size: the whole tensor's size along ``dim``
    :param group: the process group of the mesh (the ranks that share the tensor)
    """

    dim: int | None
    start: int
    stop: int
    size: int
    group: Any

    def reduce_(self, tensor: torch.Tensor, op: Literal["max", "min", "sum"]) -> torch.Tensor:
        """Reduce a statistic of this rank's slice over the ranks sharing the tensor, in
        place (float32 on the wire: gloo has no bfloat16 reductions)."""
        buffer = tensor if tensor.dtype == torch.float32 else tensor.float()
        dist.all_reduce(buffer, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor


def layout_of(tensor: torch.Tensor, where: str = "") -> ShardLayout | None:
    """The layout of a DTensor (None for an ordinary tensor).

    :param where: the module's name, for the error
    :raises ValueError: a mesh of more than one dimension, or a placement other than
        ``Shard`` / ``Replicate`` (a pending reduction, ``Partial``)
    """
    if not isinstance(tensor, DTensor):
        return None
    mesh, placements = tensor.device_mesh, tensor.placements
    name = where or "a weight"
    if mesh.ndim != 1:
        raise ValueError(
            f"{name}: its weight is a DTensor on a {mesh.ndim}-dimensional device mesh; only "
            "one-dimensional tensor-parallel meshes (ColwiseParallel / RowwiseParallel) are "
            "supported"
        )
    (placement,) = placements
    group = mesh.get_group()
    if isinstance(placement, Replicate):
        return ShardLayout(None, 0, 0, 0, group)
    if not isinstance(placement, Shard):
        raise ValueError(
            f"{name}: its weight has placement {placement}; only Shard and Replicate weights "
            "are supported"
        )
    dim = placement.dim % tensor.dim()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    start = offset[dim]
    return ShardLayout(dim, start, start + shape[dim], tensor.shape[dim], group)


@torch.no_grad()
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (gathered from the ranks' slices), detached; an
    ordinary tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor.detach()


@torch.no_grad()
def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor, sharing its storage (an in-place change to it changes
    the DTensor); an ordinary tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out as ``like``: a DTensor holding this rank's
    slice when ``like`` is one (no communication), else ``full`` itself."""
    if not isinstance(like, DTensor):
        return full
    if full.shape != like.shape:
        full = full.expand(like.shape)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor."""
    return any(isinstance(t, DTensor) for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def gather_sharded_model(model: torch.nn.Module) -> int:
    """Turn a tensor-parallel or FSDP2-sharded model back into an ordinary one on every rank,
    in place: FSDP2's management is released first (``fsdp.release_fully_sharded``), then
    every DTensor parameter and buffer becomes an ordinary one holding the whole tensor
    (parameters stay trainable as they were; those under a parametrization too), and the
    input / output redistribution hooks ``parallelize_module`` added are removed, so the model
    computes as the same model never parallelised. The optimizer's references go stale: call
    it after the last training step.

    :return: how many tensors were gathered
    """
    release_fully_sharded(model)
    gathered = 0
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                full = param.full_tensor()
                module._parameters[name] = torch.nn.Parameter(full, param.requires_grad)
                gathered += 1
        for name, buffer in list(module._buffers.items()):
            if isinstance(buffer, DTensor):
                module._buffers[name] = buffer.full_tensor()
                gathered += 1
        # distribute_module (which parallelize_module calls) registers its input and output
        # redistribution as lambdas defined in torch.distributed.tensor
        remove_hooks_from(module, ("torch.distributed.tensor",))
        if getattr(module, "_distribute_module_applied", False):
            del module._distribute_module_applied
    if gathered:
        logger.info("gathered {} sharded tensor(s) into whole tensors", gathered)
    return gathered
