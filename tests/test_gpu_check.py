"""benchmarks/gpu_check.py in its CI-size form on the CPU: every part runs and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def run_check(tmp_path, *parts):
    out = tmp_path / "check"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", *parts, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_help_explains_every_part():
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], check=True, capture_output=True, text=True).stdout
    for part in ("parity", "attention", "train", "inference", "--quick", "--budget_s"):
        assert part in text


@pytest.mark.slow
def test_parity_and_attention_parts(tmp_path):
    report, text = run_check(tmp_path, "parity", "attention")
    parity = report["parity"]
    assert len(parity["losses_cpu"]) == 5
    assert parity["max_relative_difference"] == 0.0  # cpu against cpu: the same computation
    assert report["attention"]["aten_ops"] == ["_scaled_dot_product_flash_attention_for_cpu"]
    assert "fp32 parity" in text and "attention kernel" in text


@pytest.mark.slow
def test_training_runs_report_speed_mfu_and_memory(tmp_path):
    report, text = run_check(tmp_path, "train")
    runs = {r["run"]: r for r in report["train"]}
    assert set(runs) == {"tiny ddp eager", "tiny fsdp eager"}
    for result in runs.values():
        assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5 and result["peak_memory_mb"] > 0
        assert result["gflop_per_step"] > 0
    assert "| tiny fsdp eager |" in text
