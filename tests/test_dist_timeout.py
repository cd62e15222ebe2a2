"""A hung peer under torchrun: `--dist_timeout` bounds the collective and the error names the rank (issue 17)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides, write_image_folder

# two torchrun ranks, one of which hangs until the collective times out
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

HANGING_RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from dino.errors import run_cli
    from dino.train import loop
    from dino.train.cli import main

    original = loop.train_step
    calls = {{"n": 0}}

    def hang_on_rank_1(*args, **kwargs):
        calls["n"] += 1
        if os.environ["RANK"] == "1" and calls["n"] == 3:
            time.sleep(300)  # a stuck data server, a dead GPU: this rank never reaches step 3's reduction
        return original(*args, **kwargs)

    loop.train_step = hang_on_rank_1
    run_cli(lambda: main(sys.argv[1:]))
""")


def test_a_hung_rank_is_named_after_the_timeout(tmp_path):
    data = write_image_folder(tmp_path / "data")
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK_SCRIPT.format(root=str(ROOT)))
    overrides = tiny_overrides(
        data,
        tmp_path / "out",
        4,
        "optim.epochs=3",
        "train.dist_timeout=8",
        "ibot.loss_weight=0.0",
        "dino.koleo_loss_weight=0.0",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        *overrides,
    ]
    started = time.time()
    out = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=280
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert time.time() - started < 200  # not the 300 s of the hang, nor torch's default 30 min
    line = next((ln for ln in text.splitlines() if "did not complete within" in ln), None)
    assert line is not None, text[-4000:]
    assert "rank 0: a collective at step 3 did not complete within 8 s (--dist_timeout)" in line
    assert "did not answer: rank 1 (step 3, had its batch but never entered the step" in line
