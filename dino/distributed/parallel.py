"""Data parallelism for the student and the teacher: DDP, or FSDP2 (`fully_shard`). The model code never
sees either; the training loop asks here.

* `ddp`: the student is wrapped in `DistributedDataParallel` (gradients all-reduced); the teacher stays a
  full replica on every rank (it gets no gradients, and the EMA keeps the replicas equal because every rank
  applies the same update to the same student weights).
* `fsdp`: FSDP2 shards student *and* teacher the same way — one `fully_shard` unit per transformer block,
  one per head, and the root (patch embedding, tokens, final norm).  Parameters become `DTensor`s whose
  local shards line up between student and teacher, so the EMA update runs on the local shards with no
  gather (`local_tensors`).  `reshard_after_forward` (True: FULL_SHARD, False: SHARD_GRAD_OP) and the
  mixed-precision policy (param / reduce dtype) come from the config (`train.fsdp`).

In a single process both modes leave the modules as they are (there is nothing to shard over); `fsdp`
still selects the sharded checkpoint format, so a single-process run can resume a sharded multi-process
checkpoint and vice versa.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dino.distributed.device import DeviceContext
from dino.distributed.dist import get_world_size
from dino.errors import UserError

PARALLEL_CHOICES = ("ddp", "fsdp")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class FSDPSettings:
    """How FSDP2 shards and casts.

    Args:
        reshard_after_forward: free the gathered parameters of a block after its forward (FULL_SHARD, least
            memory) or keep them until the backward (SHARD_GRAD_OP, one all-gather fewer per block).
        param_dtype: dtype of the gathered parameters used in forward/backward (None: the stored fp32).
        reduce_dtype: dtype of the gradient reduce-scatter (None: same as param_dtype).
    """

    reshard_after_forward: bool
    param_dtype: torch.dtype | None
    reduce_dtype: torch.dtype | None

    @classmethod
    def from_config(cls, fsdp_cfg, precision: str) -> "FSDPSettings":
        """`train.fsdp` keys (defaults in the YAML); `param_dtype: auto` follows `train.precision` bf16 (bf16
        parameters, fp32 reductions)."""

        def dtype(name, auto):
            name = "auto" if name is None else str(name).lower()
            if name == "auto":
                return auto
            if name not in _DTYPES:
                raise UserError(f"unknown FSDP dtype {name!r}; choose auto, {', '.join(sorted(_DTYPES))}")
            return _DTYPES[name]

        param_dtype = dtype(fsdp_cfg.param_dtype, torch.bfloat16 if precision == "bf16" else None)
        reduce_dtype = dtype(fsdp_cfg.reduce_dtype, torch.float32 if param_dtype is not None else None)
        return cls(bool(fsdp_cfg.reshard_after_forward), param_dtype, reduce_dtype)


def check_parallel_mode(mode: str) -> str:
    if mode not in PARALLEL_CHOICES:
        raise UserError(f"unknown train.parallel {mode!r}; available: {', '.join(PARALLEL_CHOICES)}")
    return mode


def _shard_units(network: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every transformer block and every head."""
    units = list(network.backbone.blocks)
    units += [head for head in (network.dino_head, getattr(network, "ibot_head", None)) if head is not None]
    return units


def shard_network(network: nn.Module, ctx: DeviceContext, settings: FSDPSettings, *, is_teacher: bool) -> nn.Module:
    """Apply FSDP2 in place: one unit per block and per head, then the root. Returns the same module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # MultiCropNetwork returns slices of one head output (views). FSDP2 warns because an in-place op on such
    # a view would bypass its pre-backward hook; the objective only reads them (out-of-place maths).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(ctx.type, (get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype)
    # The teacher has no backward: always free its gathered weights after the forward. This matters for the
    # root too, whose default keeps them gathered for the backward — stale copies would then miss the EMA.
    reshard = True if is_teacher else settings.reshard_after_forward
    for unit in _shard_units(network):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(network, mesh=mesh, reshard_after_forward=True if is_teacher else None, mp_policy=policy)
    return network


def shard_student_and_teacher(
    student: nn.Module, teacher: nn.Module, ctx: DeviceContext, mode: str, settings: FSDPSettings
) -> bool:
    """Shard both networks for `fsdp` with more than one process. Returns whether they are sharded.

    Must run before the optimiser is built (FSDP2 replaces the parameters by DTensors).
    """
    if check_parallel_mode(mode) != "fsdp" or get_world_size() == 1:
        return False
    shard_network(student, ctx, settings, is_teacher=False)
    shard_network(teacher, ctx, settings, is_teacher=True)
    return True


def wrap_student(student: nn.Module, ctx: DeviceContext, mode: str = "ddp") -> nn.Module:
    """DDP over all ranks for `ddp`; identity for `fsdp` (sharded in place already) and in a single process."""
    if check_parallel_mode(mode) == "fsdp" or get_world_size() == 1:
        return student
    device_ids = [ctx.device.index] if ctx.type == "cuda" else None
    # unused parameters exist when a head or the mask token is idle in a step (e.g. no masked crop)
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP / compile wrapper (an FSDP2 module is its own plain module)."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place updates change the parameter); a tensor as is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2 parameter or gradient)."""
    return hasattr(tensor, "to_local")


def is_sharded(module: nn.Module) -> bool:
    return any(is_sharded_tensor(param) for param in module.parameters())


@contextlib.contextmanager
def gradient_sync(student: nn.Module, enabled: bool):
    """Whether the backward passes inside reduce gradients across ranks (off for all but the last micro-batch
    of an accumulated step: the gradients add up locally and are reduced once)."""
    if enabled or get_world_size() == 1:
        yield
        return
    if isinstance(student, torch.nn.parallel.DistributedDataParallel):
        with student.no_sync():
            yield
        return
    set_sync = getattr(student, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)
