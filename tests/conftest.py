import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# tests must never download anything; keep the demo data cache out of the user's home
os.environ.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch-test-home"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fake_habana(monkeypatch):
    """A fake `habana_frameworks` (HPU) whose `mark_step` calls are appended to the returned list."""
    calls = []
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: calls.append("mark_step")
    hf_torch = types.ModuleType("habana_frameworks.torch")
    hf_torch.core = core
    hf = types.ModuleType("habana_frameworks")
    hf.torch = hf_torch
    monkeypatch.setitem(sys.modules, "habana_frameworks", hf)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", hf_torch)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.core", core)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls
