"""The one place that knows which accelerator we run on.

`DeviceContext` answers: which `torch.device`, which autocast dtype, which process-group backend, how to
synchronise, how much memory was used, and whether HPU lazy mode needs a `mark_step`.  Nothing else in the
package asks `torch.cuda.is_available()`; it asks a `DeviceContext`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import sys
from dataclasses import dataclass, field

import torch

from dino.errors import UserError

DEVICE_CHOICES = ("auto", "cuda", "hpu", "mps", "cpu")
_BACKENDS = {"cuda": "nccl", "hpu": "hccl", "cpu": "gloo", "mps": "gloo"}


def _habana_module():
    """Import `habana_frameworks.torch.core` when it is installed; None otherwise (imported only on demand)."""
    try:
        importlib.import_module("habana_frameworks.torch")
        return importlib.import_module("habana_frameworks.torch.core")
    except ImportError:
        return None


def _hpu_available() -> bool:
    if _habana_module() is None:
        return False
    hpu = getattr(torch, "hpu", None)
    return bool(hpu is None or getattr(hpu, "is_available", lambda: True)())


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device_type(requested: str = "auto") -> str:
    """Map `--device` to a device type. auto prefers CUDA, then HPU, then MPS, then CPU."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES:
        raise UserError(f"unknown --device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _hpu_available():
            return "hpu"
        if _mps_available():
            return "mps"
        return "cpu"
    available = {
        "cuda": torch.cuda.is_available,
        "hpu": _hpu_available,
        "mps": _mps_available,
        "cpu": lambda: True,
    }[requested]()
    if not available:
        raise UserError(
            f"--device {requested} was requested but no {requested.upper()} device is available; use --device auto or cpu"
        )
    return requested


# The one precision setting of training (`train.precision`), evaluation and feature extraction (`precision`):
# the dtype the forward pass autocasts to (None: plain fp32).
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS: tuple[str, ...] = tuple(_AUTOCAST_DTYPES)


@dataclass
class DeviceContext:
    """Device, precision and backend decisions for one process.

    Args:
        type: 'cuda', 'hpu', 'mps' or 'cpu' (already resolved; use `DeviceContext.create` to resolve 'auto').
        local_rank: index of the accelerator this process drives on its node.
        precision: one of `PRECISIONS`: 'fp32' (no autocast), 'bf16' (bf16 autocast on every device) or
            'fp16' (fp16 autocast with a GradScaler, CUDA only).
    """

    type: str = "cpu"
    local_rank: int = 0
    precision: str = "fp32"
    _habana: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def create(cls, requested: str = "auto", local_rank: int | None = None, precision: str = "fp32") -> "DeviceContext":
        dev_type = resolve_device_type(requested)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if precision == "fp16" and dev_type != "cuda":
            raise UserError("--fp16 needs a CUDA device (precision fp16); use --hmp (precision bf16) on other devices")
        ctx = cls(type=dev_type, local_rank=local_rank, precision=precision)
        if dev_type == "hpu":
            ctx._habana = _habana_module()
        if dev_type == "cuda":
            torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
        return ctx

    # --- identity -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.type == "cuda":
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device(self.type)

    @property
    def backend(self) -> str:
        """Process-group backend for torch.distributed."""
        return _BACKENDS[self.type]

    # --- precision ------------------------------------------------------------------------------
    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES[self.precision]

    def autocast(self):
        """Context manager for the forward pass: bf16 / fp16 autocast, or nothing (fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)

    def grad_scaler(self):
        """A GradScaler for fp16 on CUDA; None otherwise (bf16 needs no loss scaling)."""
        if self.precision == "fp16":
            return torch.amp.GradScaler("cuda")
        return None

    # --- runtime helpers ------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.type == "hpu":
            torch.hpu.synchronize()
        elif self.type == "mps":
            torch.mps.synchronize()

    def mark_step(self) -> None:
        """HPU lazy mode: flush the accumulated graph. A no-op elsewhere."""
        if self.type == "hpu" and self._habana is not None:
            self._habana.mark_step()

    def max_memory_allocated_mb(self) -> float:
        """Peak memory of this process in MiB (device memory on accelerators, resident set size on CPU)."""
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.type == "hpu":
            return torch.hpu.max_memory_allocated() / 2**20
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        except ImportError:  # pragma: no cover - Windows
            return float("nan")

    def reset_peak_memory(self) -> None:
        if self.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def pin_memory(self) -> bool:
        return self.type == "cuda"

    def set_cpu_threads(self, local_world_size: int) -> None:
        """On CPU give every local process an equal share of the cores, and keep freed memory for reuse.

        A training step on the CPU allocates and frees gigabytes of activations, logits and gradients. glibc
        hands every block above 32 MB straight back to the kernel, so the next step page-faults all of it in
        again (zero-filled): on virtual machines that costs 10–20 % of a ViT-S step. `retain_freed_memory`
        keeps those pages in the process instead; the heap then fragments a little (measured: ~2–4 % higher
        peak RSS on the CPU bench preset, BENCHMARKS.md) and the memory is not returned until the process ends.
        """
        if self.type == "cpu":
            cores = os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // max(1, local_world_size)))
            retain_freed_memory()

    def description(self) -> str:
        """What benchmarks print as the machine: the GPU's name, or the CPU model and thread count."""
        if self.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        cpu = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
        except OSError:
            pass
        return f"{cpu}, {torch.get_num_threads()} threads" if self.type == "cpu" else f"{self.type} ({cpu} host)"


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and never trim it (Linux/glibc; else no-op).

    mallopt(M_MMAP_MAX, 0): no block gets its own mmap (which free() would unmap); mallopt(M_TRIM_THRESHOLD,
    huge): freed heap memory stays mapped.  Returns whether both settings took.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    # the threshold is an int here and a size_t inside glibc: -1 becomes SIZE_MAX, i.e. never trim
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))
