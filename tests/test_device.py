"""The device abstraction picks devices, backends and precision; HPU is exercised with a fake module."""

from pathlib import Path

import pytest
import torch

from dino.distributed import DeviceContext, resolve_device_type
from dino.distributed import device as device_module
from dino.errors import UserError


def test_auto_prefers_hpu_when_habana_imports(fake_habana):
    assert resolve_device_type("auto") == "hpu"
    ctx = DeviceContext.create("auto", precision="bf16")
    assert ctx.type == "hpu" and ctx.backend == "hccl"
    assert ctx.autocast_dtype is torch.bfloat16
    ctx.mark_step()
    ctx.mark_step()
    assert fake_habana == ["mark_step", "mark_step"]


def test_auto_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_hpu_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    ctx = DeviceContext.create("auto")
    assert ctx.type == "cpu" and ctx.backend == "gloo" and ctx.device == torch.device("cpu")
    assert ctx.autocast_dtype is None and ctx.grad_scaler() is None
    ctx.mark_step()  # a no-op off HPU


def test_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_type("auto") == "cuda"
    assert DeviceContext(type="cuda").backend == "nccl"
    assert DeviceContext(type="cuda", precision="fp16").autocast_dtype is torch.float16


def test_bad_device_requests(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="choose one of"):
        resolve_device_type("tpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device_type("cuda")
    with pytest.raises(UserError, match="--fp16 needs a CUDA"):
        DeviceContext.create("cpu", precision="fp16")


def test_hmp_autocast_runs_in_bf16_on_cpu():
    ctx = DeviceContext.create("cpu", precision="bf16")
    with ctx.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is torch.bfloat16


def test_only_the_distributed_package_asks_for_cuda():
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in list((root / "dino").rglob("*.py")) + list(root.glob("*.py")):
        if "distributed" in path.parts:
            continue
        if "torch.cuda.is_available" in path.read_text():
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_description_names_the_cpu_and_threads():
    text = DeviceContext.create("cpu").description()
    assert text.endswith(f"{torch.get_num_threads()} threads") and len(text) > len(" threads") + 3
