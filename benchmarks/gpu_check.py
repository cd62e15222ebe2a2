"""The one-GPU check: does our CUDA path run, how fast, and does it compute what the CPU computes?

    python benchmarks/gpu_check.py --out results/gpu            # on a GPU machine: ≤ 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # CI-size, on the CPU

Parts, run in this order until `--budget_s` is spent (a part that does not fit is skipped and says so; a part
that fails records its error and the rest still run; the training runs leave `--inference_reserve_s` for the
last part):

  parity    five training steps in fp32 (TF32 off, drop path off) on the device and the same five on the CPU,
            from the same weights and batch: the losses must agree within `--parity_rtol` (relative).
  attention which attention kernel scaled_dot_product_attention dispatches to in a bf16 ViT-S/14 forward
            (flash / memory-efficient / cuDNN / math), read from the dispatched ATen operators.
  train     training steps of the DINOv2 presets (ViT-S/14 batch 64, ViT-L/14 batch 32; `--quick`: a 2-block
            tiny ViT) in bf16 autocast, eager and with compiled blocks, DDP and FSDP2 on one process — each in
            its own process through `benchmarks/train_throughput.py`: images/s, s/step, MFU against the data
            sheet's dense bf16 peak (and against a matmul measured in the same run), peak device memory, and
            the attention kernels the step used.
  inference [CLS] feature extraction at batch 256 (`--quick`: 4): ours (eager, inference copy, bf16
            weights) against timm's and transformers' DINOv2 ViT with bf16 autocast, side by side
            (`benchmarks/inference.py`).

Random weights, generated images, nothing downloaded. Output: `gpu_check.json` and `gpu_check.md` (a block
for BENCHMARKS.md) in `--out`, and the markdown on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PARTS = ("parity", "attention", "train", "inference")
# (preset, parallel, compile): most informative first, so a short budget still answers the main question
TRAIN_RUNS = [
    ("vitl14", "fsdp", False),
    ("vitl14", "ddp", False),
    ("vitl14", "fsdp", True),
    ("vits14", "ddp", False),
    ("vitl14", "ddp", True),
    ("vits14", "ddp", True),
    ("vits14", "fsdp", False),
    ("vits14", "fsdp", True),
]
QUICK_TRAIN_RUNS = [("tiny", "ddp", False), ("tiny", "fsdp", False)]
JSON_PREFIX = "RESULT_JSON "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_group_env() -> dict[str, str]:
    """The environment torchrun gives a world of one: DDP and FSDP2 then run for real on one device."""
    return dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def run_child(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a benchmark in its own process (its own peak memory, process group and compile caches)."""
    try:
        child = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
        )
        return child.returncode, child.stdout
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, out + f"\n[timed out after {timeout:.0f} s]"


def train_part(args, deadline: float) -> list[dict]:
    runs = QUICK_TRAIN_RUNS if args.quick else TRAIN_RUNS
    results = []
    for preset, parallel, compiled in runs:
        name = f"{preset} {parallel} {'compiled' if compiled else 'eager'}"
        left = deadline - time.monotonic()
        needed = args.train_timeout_s if not args.quick else 30
        if left < needed:
            results.append({"run": name, "skipped": f"budget: {left:.0f} s left, a run may take {needed:.0f} s"})
            continue
        command = [
            sys.executable,
            str(HERE / "train_throughput.py"),
            "--preset",
            preset,
            "--parallel",
            parallel,
            "--device",
            args.device,
            "--steps",
            str(2 if args.quick else args.steps),
            "--warmup",
            str(1 if args.quick else 3),
            "--json",
        ]
        command += [] if args.quick and args.device == "cpu" else ["--hmp"]
        command += ["--compile"] if compiled else []
        code, output = run_child(command, min(left, args.train_timeout_s), env=single_process_group_env())
        lines = [line for line in output.splitlines() if line.startswith(JSON_PREFIX)]
        if code == 0 and lines:
            result = json.loads(lines[-1][len(JSON_PREFIX) :])
            result["run"] = name
            results.append(result)
        else:
            results.append({"run": name, "error": f"exit {code}: " + " | ".join(output.strip().splitlines()[-6:])})
        print(f"[train] {name}: " + ("ok" if "error" not in results[-1] else results[-1]["error"]), flush=True)
    return results


def fp32_parity(device: str, steps: int, quick: bool) -> dict:
    """The same `steps` training steps in fp32 on `device` and on the CPU; the losses side by side."""
    from train_throughput import PRESETS, one_batch

    from dino.config import compose
    from dino.distributed import DeviceContext, seed_everything
    from dino.train.loop import build_optimizer, train_step
    from dino.train.meta_arch import SelfDistillationObjective, build_networks, update_teacher
    from dino.train.param_groups import apply_schedules

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 would differ at ~1e-3 by design
    torch.backends.cudnn.allow_tf32 = False
    config_name, overrides = PRESETS["tiny"]
    batch_size = 8 if quick else 16
    cfg = compose(
        config_name,
        overrides + [f"train.batch_size_per_device={batch_size}", "train.num_workers=0", "model.drop_path_rate=0.0"],
    )  # drop path draws from device RNGs
    batch = one_batch(cfg, DeviceContext.create("cpu"), int(cfg.crops.global_crops_size))
    losses = {}
    for target in dict.fromkeys(["cpu", device]):
        ctx = DeviceContext.create(target)
        seed_everything(0)
        student, teacher, _ = build_networks(cfg)
        student.to(ctx.device)
        teacher.to(ctx.device)
        objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number)).to(ctx.device)
        optimizer = build_optimizer(cfg, student)
        apply_schedules(optimizer, lr=5e-4, wd=0.04, last_layer_lr=5e-4)
        losses[target] = []
        for _ in range(steps):
            loss, _, _ = train_step(batch, student, teacher, objective, optimizer, None, ctx, cfg, 0.04)
            update_teacher(student, teacher, 0.99)
            losses[target].append(float(loss))
    reference, measured = losses["cpu"], losses[device]
    max_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, measured))
    return {
        "device": device,
        "steps": steps,
        "losses_cpu": reference,
        f"losses_{device}": measured,
        "max_relative_difference": max_rel,
    }


def attention_part(device: str) -> dict:
    """Which attention kernel SDPA dispatches to in a bf16 ViT-S/14 forward at 224² on `device`."""
    from dino.distributed import DeviceContext
    from dino.models import build_backbone
    from dino.train.throughput import dispatched_ops

    ctx = DeviceContext.create(device, precision="bf16")
    model = build_backbone("vit_small", 14, img_size=224).to(ctx.device).eval()
    x = torch.randn(2, 3, 224, 224, device=ctx.device)
    with torch.no_grad(), ctx.autocast(), dispatched_ops() as seen:
        model(x)
    kernels = sorted(name for name in seen if "attention" in name)
    kinds = {"flash": "flash", "efficient": "memory-efficient", "cudnn": "cuDNN", "math": "math"}
    used = sorted({label for key, label in kinds.items() if any(key in k for k in kernels)}) or ["none seen"]
    return {"device": device, "model_backend": str(model.blocks[0].attn.backend), "aten_ops": kernels, "kinds": used}


def inference_part(args, deadline: float) -> dict:
    out = Path(args.out) / "inference.md"
    batch = "4" if args.quick else "256"
    command = [
        sys.executable,
        str(HERE / "inference.py"),
        "--device",
        args.device,
        "--batch",
        batch,
        "--arch",
        "vit_small",
        *([] if args.quick else ["vit_large"]),
        "--rounds",
        "2" if args.quick else "5",
        "--no_compile",
        "--out",
        str(out),
    ]
    code, output = run_child(command, max(deadline - time.monotonic(), 1))
    if code != 0:
        return {"error": f"exit {code}: " + " | ".join(output.strip().splitlines()[-6:])}
    return {"markdown": out.read_text()}


def markdown(report: dict) -> str:
    lines = [
        f"### One-device check (`benchmarks/gpu_check.py{' --quick' if report['quick'] else ''}`)",
        f"- date: {report['date']}; device: {report['device_name']}; torch {report['torch']} "
        f"(CUDA {report['cuda']}); wall time {report['wall_s']:.0f} s",
        "",
    ]
    train = report.get("train")
    if train:
        lines += [
            "| run | img/s | s/step | MFU (data sheet) | MFU (measured matmul) | peak MiB | attention | first step s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            if "images_per_s" not in r:
                lines.append(f"| {r['run']} | {r.get('skipped') or r.get('error')} |||||||")
                continue
            sheet = f"{r['mfu_datasheet']:.1%}" if "mfu_datasheet" in r else "–"
            lines.append(
                f"| {r['run']} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} | {sheet} | {r['mfu']:.1%} | "
                f"{r['peak_memory_mb']:.0f} | {', '.join(r.get('attention_backend', [])) or '–'} | "
                f"{r['warmup_times'][0]:.1f} |"
            )
        lines.append("")
    parity = report.get("parity")
    if parity:
        if "error" in parity:
            lines.append(f"- fp32 parity: ERROR {parity['error']}")
        else:
            dev = parity["device"]
            ok = parity["max_relative_difference"] <= report["parity_rtol"]
            lines.append(
                f"- fp32 parity ({parity['steps']} steps, TF32 off), {dev} vs cpu: max relative loss difference "
                f"{parity['max_relative_difference']:.2e} ({'within' if ok else 'OUTSIDE'} "
                f"{report['parity_rtol']:.0e}); losses {dev}: "
                f"{', '.join(f'{x:.6f}' for x in parity[f'losses_{dev}'])}; cpu: "
                f"{', '.join(f'{x:.6f}' for x in parity['losses_cpu'])}"
            )
    attention = report.get("attention")
    if attention:
        lines.append(
            f"- attention kernel (bf16 ViT-S/14 forward): {', '.join(attention.get('kinds', []))} "
            f"({', '.join(attention.get('aten_ops', [])) or attention.get('error', '')})"
        )
    inference = report.get("inference")
    if inference:
        lines += [
            "",
            "Feature extraction, side by side:",
            "",
            inference.get("markdown") or f"ERROR {inference.get('error')}",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu | hpu — the device to check")
    parser.add_argument("--quick", action="store_true", help="CI-size: a 2-block tiny ViT, few steps, small batches")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--budget_s", type=float, default=450.0, help="stop starting parts after this many seconds")
    parser.add_argument("--train_timeout_s", type=float, default=120.0, help="limit of one training-speed run")
    parser.add_argument(
        "--inference_reserve_s", type=float, default=75.0, help="seconds the training runs leave for the inference part"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    parser.add_argument("--parity_steps", type=int, default=5)
    parser.add_argument("--parity_rtol", type=float, default=1e-4, help="allowed relative loss difference")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args(argv)
    from dino.distributed import DeviceContext

    ctx = DeviceContext.create(args.device)  # a one-line error when the device is absent
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    report = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "device_name": ctx.description(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "parity_rtol": args.parity_rtol,
    }
    for part in args.parts:
        if time.monotonic() > deadline:
            report[part] = {"skipped": "budget spent"}
            continue
        print(f"[{part}] …", flush=True)
        try:
            if part == "train":
                reserve = args.inference_reserve_s if "inference" in args.parts and not args.quick else 0.0
                report["train"] = train_part(args, deadline - reserve)
            elif part == "parity":
                report["parity"] = fp32_parity(args.device, args.parity_steps, args.quick)
            elif part == "attention":
                report["attention"] = attention_part(args.device)
            elif part == "inference":
                report["inference"] = inference_part(args, deadline)
        except Exception as err:  # one part's failure must not hide the others' results
            report[part] = {"error": f"{type(err).__name__}: {err}"}
    report["wall_s"] = time.monotonic() - start
    text = markdown(report)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (Path(args.out) / "gpu_check.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
