"""How fast a training run goes: FLOPs per step, the device's peak rate, images/s, MFU, data wait, peak memory.

Model-FLOPs utilisation (MFU, PaLM's definition, Chowdhery et al. 2022, appendix B):

    MFU = (FLOPs of one step's forward + backward passes) / (step time × peak FLOP/s of the device)

The FLOPs are *counted* (`torch.utils.flop_counter.FlopCounterMode` over one real step: every matmul, attention
and convolution of teacher forward, student forward and backward; elementwise work is not counted), once per
crop layout, since the count depends only on tensor shapes. The peak is the vendor's dense (no sparsity) rate
for the compute precision when the device is in `PEAK_TFLOPS`, else a matmul rate measured on the device.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

# Dense tensor-core peaks in TFLOP/s by device-name fragment and precision, from the vendors' data sheets
# (NVIDIA A100/H100/H200/L40S/Ada whitepapers, Intel Gaudi 2/3 white papers). "fp32" is the non-tensor-core
# rate; "tf32" what fp32 matmuls reach when TF32 is allowed. Longest matching fragment wins ("H100 PCIe"
# before "H100"). Missing precisions fall back to a measured rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "GAUDI2": {"bf16": 432.0},
    "GAUDI3": {"bf16": 1835.0},
}


def compute_precision(autocast_dtype: torch.dtype | None, device_type: str) -> str:
    """'bf16' | 'fp16' | 'tf32' | 'fp32': the precision the step's matmuls run in."""
    if autocast_dtype == torch.bfloat16:
        return "bf16"
    if autocast_dtype == torch.float16:
        return "fp16"
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak (FLOP/s) of the device named `device_name` at `precision`, or None if unknown."""
    normalised = device_name.upper().replace(" ", "")
    matches = [frag for frag in PEAK_TFLOPS if frag.upper().replace(" ", "") in normalised]
    for fragment in sorted(matches, key=len, reverse=True):
        if precision in PEAK_TFLOPS[fragment]:
            return PEAK_TFLOPS[fragment][precision] * 1e12
    return None


def measured_matmul_flops(
    device: torch.device,
    dtype: torch.dtype,
    size: int = 1024,
    repeats: int = 5,
    synchronize: Callable[[], None] = lambda: None,
) -> float:
    """Median FLOP/s of `repeats` size³ matrix products (2·size³ FLOPs each) on `device` in `dtype`."""
    # a private generator: measuring must not move the global random streams (exact resume depends on them)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # first call: allocation, kernel selection
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


@dataclass(frozen=True)
class PeakRate:
    """The denominator of MFU: FLOP/s and where the number comes from."""

    flops: float
    precision: str
    source: str  # 'data sheet: <device>' | 'measured: <size>³ matmul'

    def describe(self) -> str:
        return f"{self.flops / 1e12:.1f} TFLOP/s {self.precision} ({self.source})"


def device_peak(ctx, matmul_size: int = 1024) -> PeakRate:
    """The peak rate of `ctx`'s device (a `DeviceContext`) at the precision a training step runs in."""
    precision = compute_precision(ctx.autocast_dtype, ctx.type)
    name = ctx.description() if ctx.type in ("cuda", "hpu") else ""
    if ctx.type == "hpu":
        name = str(getattr(torch.hpu, "get_device_name", lambda: "GAUDI")())
    peak = table_peak_flops(name, precision) if name else None
    if peak is not None:
        return PeakRate(peak, precision, f"data sheet: {name}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    rate = measured_matmul_flops(ctx.device, dtype, matmul_size, synchronize=ctx.synchronize)
    return PeakRate(rate, precision, f"measured: {matmul_size}³ {precision} matmul")


@contextlib.contextmanager
def count_flops():
    """Count the FLOPs of what runs inside; yields a callable returning the total (eager kernels only).

    Compiled regions bypass the dispatcher the counter listens to, so they run eagerly while counting.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    # PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel: without these two
    # entries attention would count as zero FLOPs on the CPU
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: (
            sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: (
            sdpa_backward_flop_count(grad_out, q, k, v)
        ),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    stance = (
        torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    )
    with stance, counter:
        yield counter.get_total_flops


class StepFlops:
    """FLOPs per training step, counted once per crop layout (the count depends on tensor shapes only)."""

    def __init__(self):
        self._by_layout: dict[Hashable, int] = {}

    @staticmethod
    def layout(batch: dict) -> Hashable:
        return tuple(
            (key, tuple(value.shape)) for key, value in sorted(batch.items()) if isinstance(value, torch.Tensor)
        )

    def known(self, batch: dict) -> int | None:
        return self._by_layout.get(self.layout(batch))

    def record(self, batch: dict, flops: int) -> None:
        self._by_layout[self.layout(batch)] = int(flops)


class ThroughputMeter:
    """Images/s, MFU, the data-wait share of a step and peak memory, over a sliding window of steps.

    `data_s` is the time the loop waited for the next batch; `compute_s` the rest of the step (forward,
    backward, update; synchronised by the loop's read of the loss). A data-loading bottleneck is reported
    once the window's data-wait share exceeds `bottleneck_fraction`.
    """

    def __init__(
        self,
        global_batch: int,
        peak: PeakRate,
        memory_mb: Callable[[], float],
        window: int = 20,
        bottleneck_fraction: float = 0.05,
    ):
        self.global_batch = global_batch
        self.peak = peak
        self.memory_mb = memory_mb
        self.bottleneck_fraction = bottleneck_fraction
        self._steps: deque[tuple[float, float, float]] = deque(maxlen=window)

    def update(self, data_s: float, compute_s: float, flops_per_process: float) -> dict[str, float]:
        """Add one step; return its metrics (window means) for the log and the progress bar."""
        self._steps.append((data_s, compute_s, flops_per_process))
        data = sum(s[0] for s in self._steps)
        compute = sum(s[1] for s in self._steps)
        flops = sum(s[2] for s in self._steps)
        total = max(data + compute, 1e-12)
        return {
            "images_per_s": self.global_batch * len(self._steps) / total,
            "mfu": flops / total / self.peak.flops,
            "step_s": total / len(self._steps),
            "data_wait_s": data / len(self._steps),
            "data_wait_fraction": data / total,
            "peak_memory_mb": self.memory_mb(),
        }

    def bottleneck(self) -> str | None:
        """A one-line warning when data loading costs more than `bottleneck_fraction` of the step time."""
        if len(self._steps) < self._steps.maxlen:
            return None
        data = sum(s[0] for s in self._steps)
        total = data + sum(s[1] for s in self._steps)
        if data <= self.bottleneck_fraction * total:
            return None
        return (
            f"data loading is the bottleneck: the loop waits for batches {data / total:.0%} of the time; "
            "raise train.num_workers, keep images on a local disk, or store them smaller"
        )


@contextlib.contextmanager
def dispatched_ops():
    """Collect the names of the ATen operators that run inside (e.g. which attention kernel SDPA picked)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with _Recorder():
        yield seen


@contextlib.contextmanager
def saved_for_backward():
    """Count the bytes autograd keeps for the backward pass of what runs inside (activation memory, measured
    exactly and independently of the allocator); yields a callable returning the total."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield lambda: total[0]
