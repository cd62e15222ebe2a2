"""Training throughput: images/s, seconds per step, peak memory and model-FLOPs utilisation (MFU).

    python benchmarks/train_throughput.py                              # CPU bench preset, fp32
    python benchmarks/train_throughput.py --hmp                        # same, bf16 autocast
    python benchmarks/train_throughput.py --compile                    # transformer blocks compiled (train.compile)
    python benchmarks/train_throughput.py --compare_eager              # eager and compiled, one process each
    python benchmarks/train_throughput.py --preset vitl14 --hmp --parallel fsdp --steps 20   # GPU
    torchrun --nproc_per_node=8 benchmarks/train_throughput.py --preset vitl14 --hmp --parallel fsdp

One step is exactly the training loop's: `train_step` (teacher forward, targets, student forward, losses,
backward, clipping, AdamW) followed by the EMA teacher update, on one real multi-crop batch (crops and iBOT
masks from the data pipeline, reused every step so that data loading does not compete for the cores).

* s/step: median over `--steps` timed steps after `--warmup` steps (the device is synchronised per step).
* images/s: global batch (per-process batch × processes) / median s/step.
* FLOPs per step: counted by `torch.utils.flop_counter.FlopCounterMode` over one whole step (matmuls,
  attention, convolutions — forward and backward of student and teacher; elementwise work is not counted).
* MFU: FLOPs per step / s/step / measured matmul rate, where the rate is the median of `--matmul_repeats`
  square `--matmul_size`³ matrix products in the step's compute dtype, measured on the same device in the same
  run (interleaved with the steps, so load from other processes hits both alike).  With `--hmp` the MFU is
  also given against the fp32 rate.
* peak memory: device memory on CUDA/HPU; on CPU the process's peak resident set size (everything the
  process touched, including the batch and the Python runtime) over the timed steps — on Linux the peak is
  reset after the warm-up (freed heap returned by `malloc_trim`, then `/proc/self/clear_refs`), so the
  compiler's transient memory does not count (its resident code and caches do); the process's peak since
  start, compilation included, is given next to it.
* `--compile` (`train.compile=true`): the transformer blocks are compiled (inductor) before the warm-up; the
  first warm-up step, which compiles, is reported as the compile time. FLOPs are counted on an eager step
  (`torch.compiler.set_stance("force_eager")`), so both variants divide the same work by their step time.
* `--plain_eager`: the same step written the textbook way (`use_plain_eager_step`: iBOT cross-entropy by
  autograd of log_softmax, GELU output kept for the backward, glibc's default allocator) — the reference the
  issue compares peak memory with.
* `--compare_eager`: runs plain eager, ours eager and ours compiled, each in its own process (peak RSS is per
  process), and prints them side by side with speed and peak-memory ratios against plain eager.

Presets: `cpu_bench` (the issue's CPU preset: DINOv2 ViT-S/14, 2×224 + 8×98 crops, 65,536 prototypes, iBOT
and KoLeo, batch 8), `vitl14` (DINOv2 ViT-L/14 recipe, batch 32 per device), `tiny` (a smoke test).
Output: a markdown row block on stdout, appended to `--out FILE` when given (rank 0 only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dino.config import compose  # noqa: E402
from dino.data.demo_dataset import make_demo_image  # noqa: E402
from dino.distributed import (  # noqa: E402
    DeviceContext,
    get_local_world_size,
    get_world_size,
    init_distributed,
    is_main_process,
    same_seed_on_every_rank,
    seed_everything,
)
from dino.distributed.parallel import FSDPSettings, shard_student_and_teacher, unwrap, wrap_student  # noqa: E402
from dino.train.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from dino.train.data_pipeline import build_training_data  # noqa: E402
from dino.train.loop import build_optimizer, train_step  # noqa: E402
from dino.train.meta_arch import SelfDistillationObjective, build_networks, compile_blocks, update_teacher  # noqa: E402
from dino.train.param_groups import apply_schedules  # noqa: E402
from dino.train.throughput import (  # noqa: E402
    compute_precision,
    count_flops,
    saved_for_backward,
    table_peak_flops,
)

PRESETS = {
    "cpu_bench": (
        "train/dinov2_vits14",
        [
            "train.batch_size_per_device=8",
            "crops.local_crops_number=8",
            "crops.global_crops_size=224",
            "crops.local_crops_size=98",
            "dino.head_n_prototypes=65536",
            "ibot.loss_weight=1.0",
            "dino.koleo_loss_weight=0.1",
        ],
    ),
    "vits14": ("train/dinov2_vits14", ["train.batch_size_per_device=64"]),
    "vitl14": ("train/dinov2_vitl14", ["train.batch_size_per_device=32"]),
    "tiny": (
        "train/demo",
        [
            "train.batch_size_per_device=8",
            "model.depth=2",
            "crops.local_crops_number=2",
            "dino.head_n_prototypes=256",
            "ibot.loss_weight=1.0",
            "dino.koleo_loss_weight=0.1",
        ],
    ),
}


JSON_PREFIX = "RESULT_JSON "  # the line `--json` prints and `--compare_eager` parses


def reset_peak_memory(ctx: DeviceContext) -> bool:
    """Reset the peak-memory counter; on CPU the peak RSS (VmHWM) via /proc, Linux only. Returns success."""
    ctx.reset_peak_memory()
    if ctx.type != "cpu":
        return True
    try:  # hand freed heap back first (glibc), or the reset peak starts at what warm-up/compiling once held
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """VmHWM of this process in MiB (the peak RSS since the last `reset_peak_memory`)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def matmul_seconds(ctx: DeviceContext, size: int, dtype: torch.dtype) -> float:
    """Seconds of one size³ matrix product (one timed call after the operands exist)."""
    a = torch.randn(size, size, device=ctx.device, dtype=dtype)
    b = torch.randn(size, size, device=ctx.device, dtype=dtype)
    a @ b
    ctx.synchronize()
    start = time.perf_counter()
    a @ b
    ctx.synchronize()
    return time.perf_counter() - start


def profile_step(step, ctx: DeviceContext) -> str:
    """One step under torch.profiler: the top operators by device (or CPU) time, and the device-busy share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.type == "cuda" else [])
    ctx.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        ctx.synchronize()
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if ctx.type == "cuda" else "self_cpu_time_total"
    lines = [averages.table(sort_by=key, row_limit=25, max_name_column_width=70)]
    if ctx.type == "cuda":
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6
        lines.append(
            f"device busy {busy:.3f} s of a {wall:.3f} s profiled step ({busy / wall:.0%}; kernels may overlap)"
        )
    return "\n".join(lines)


def attention_kernels(ctx: DeviceContext, student, batch: dict) -> list[str]:
    """The attention operators one student forward dispatches to (flash / efficient / cudnn / math / CPU)."""
    from dino.train.throughput import dispatched_ops

    with torch.no_grad(), ctx.autocast(), dispatched_ops() as seen:
        unwrap(student).backbone(batch["collated_global_crops"][:2])
    return sorted(name for name in seen if "attention" in name or "softmax" in name)


def one_batch(cfg, ctx: DeviceContext, image_size: int) -> dict:
    """One multi-crop batch from the real data pipeline, on procedurally generated images."""
    folder = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    for i in range(int(cfg.train.batch_size_per_device)):
        make_demo_image(i % 4, seed=i, image_size=image_size).save(folder / f"{i}.png")
    cfg.train.data_path = str(folder)
    data = build_training_data(cfg, ctx)
    _, _, batch = next(data.stream(0, 0))
    return {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu_bench")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="fp32, bf16 autocast, or fp16 autocast + GradScaler (CUDA); default fp32",
    )
    parser.add_argument("--hmp", action="store_true", help="alias of --precision bf16")
    parser.add_argument("--fp16", action="store_true", help="alias of --precision fp16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--batch", type=int, default=None, help="per-process batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks (train.compile=true)")
    parser.add_argument(
        "--plain_eager",
        action="store_true",
        help="the textbook formulation of the step (reference for memory and speed, see use_plain_eager_step)",
    )
    parser.add_argument(
        "--compare_eager",
        action="store_true",
        help="run --plain_eager, ours eager and ours --compile, each in its own process, and compare "
        "time and peak memory",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed steps, profile one step: the top operators by device time and how "
        "much of the step's wall time the device was busy (host-bound when it is low)",
    )
    parser.add_argument("--json", action="store_true", help=f"also print the result as one '{JSON_PREFIX}{{...}}' line")
    parser.add_argument("--out", default=None, help="append the markdown block to this file")
    parser.add_argument("overrides", nargs="*", help="extra config key=value overrides")
    args = parser.parse_args(argv)
    if args.compare_eager:
        return compare_eager(argv if argv is not None else sys.argv[1:], args)
    if args.plain_eager:
        use_plain_eager_step()

    config_name, overrides = PRESETS[args.preset]
    overrides = overrides + [f"train.parallel={args.parallel}", "train.num_workers=0"] + list(args.overrides)
    if args.batch:
        overrides.append(f"train.batch_size_per_device={args.batch}")
    overrides.append(f"train.compile={'true' if args.compile else 'false'}")  # not the preset's auto
    cfg = compose(config_name, overrides)
    precision = args.precision or ("bf16" if args.hmp else "fp16" if args.fp16 else "fp32")
    ctx = DeviceContext.create(args.device, precision=precision)
    init_distributed(ctx.backend)
    ctx.set_cpu_threads(get_local_world_size())
    seed_everything(int(cfg.train.seed))

    batch = one_batch(cfg, ctx, int(cfg.crops.global_crops_size))
    with same_seed_on_every_rank(int(cfg.train.seed)):
        student, teacher, _ = build_networks(cfg)
    student.to(ctx.device)
    teacher.to(ctx.device)
    objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number)).to(ctx.device)
    apply_activation_checkpointing(student.backbone.blocks, str(cfg.train.activation_checkpointing))
    compiled = bool(cfg.train.compile)
    if compiled:  # where the training loop does it: before sharding
        compile_blocks(student, teacher)
    shard_student_and_teacher(student, teacher, ctx, args.parallel, FSDPSettings.from_config(cfg.train.fsdp, precision))
    optimizer = build_optimizer(cfg, student)
    apply_schedules(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    scaler = ctx.grad_scaler()
    student_wrapped = wrap_student(student, ctx, args.parallel)
    global_batch = int(cfg.train.batch_size_per_device) * get_world_size()

    def step():
        train_step(batch, student_wrapped, teacher, objective, optimizer, scaler, ctx, cfg, 0.07)
        update_teacher(unwrap(student_wrapped), teacher, 0.994)

    warmup_times = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        ctx.synchronize()
        warmup_times.append(time.perf_counter() - start)

    # counted on an eager step (count_flops forces eager): compiled kernels bypass the counter's dispatcher
    with count_flops() as counted, saved_for_backward() as saved_bytes:
        step()
    flops_per_step = counted()
    datasheet = table_peak_flops(ctx.description(), compute_precision(ctx.autocast_dtype, ctx.type))

    compute_dtype = ctx.autocast_dtype or torch.float32
    peak_reset = reset_peak_memory(ctx)
    # the reset handed the freed heap back to the kernel: one untimed step maps the step's working set again,
    # so the timed steps see the steady state a long run sees (and the peak below still covers a whole step)
    step()
    ctx.synchronize()
    step_times, matmul_times, fp32_matmul_times = [], [], []
    for _ in range(args.steps):
        ctx.synchronize()
        start = time.perf_counter()
        step()
        ctx.synchronize()
        step_times.append(time.perf_counter() - start)
        matmul_times.append(matmul_seconds(ctx, args.matmul_size, compute_dtype))
        if compute_dtype != torch.float32:
            fp32_matmul_times.append(matmul_seconds(ctx, args.matmul_size, torch.float32))
    if ctx.type == "cpu" and peak_reset:
        peak_mb, peak_scope = peak_rss_since_reset_mb(), "peak RSS over the timed steps"
    else:
        peak_mb, peak_scope = (
            ctx.max_memory_allocated_mb(),
            ("max allocated" if ctx.type != "cpu" else "process peak RSS"),
        )

    s_per_step = statistics.median(step_times)
    matmul_flops = 2 * args.matmul_size**3
    rate = matmul_flops / statistics.median(matmul_times)
    # every process runs the same work; the counted FLOPs and the rate are per process
    result = {
        "preset": args.preset,
        "precision": {"bf16": "bf16 autocast"}.get(precision, precision),
        "compile": compiled,
        "activation_checkpointing": str(cfg.train.activation_checkpointing),
        "plain_eager": bool(args.plain_eager),
        "parallel": args.parallel,
        "processes": get_world_size(),
        "batch_per_process": int(cfg.train.batch_size_per_device),
        "s_per_step": s_per_step,
        "images_per_s": global_batch / s_per_step,
        "gflop_per_step": flops_per_step / 1e9,
        "matmul_gflops": rate / 1e9,
        "mfu": flops_per_step / s_per_step / rate,
        "peak_memory_mb": peak_mb,
        "peak_memory_scope": peak_scope,
        "saved_for_backward_mb": saved_bytes() / 2**20,
        "process_peak_memory_mb": ctx.max_memory_allocated_mb(),
        "step_times": step_times,
        "warmup_times": warmup_times,
    }
    if datasheet is not None and ctx.type != "cpu":
        result["datasheet_tflops"] = datasheet / 1e12
        result["mfu_datasheet"] = flops_per_step / s_per_step / datasheet
    result["attention_backend"] = attention_kernels(ctx, student_wrapped, batch)
    if fp32_matmul_times:
        fp32_rate = matmul_flops / statistics.median(fp32_matmul_times)
        result["fp32_matmul_gflops"] = fp32_rate / 1e9
        result["mfu_vs_fp32"] = flops_per_step / s_per_step / fp32_rate
    if args.profile:
        result["profile"] = profile_step(step, ctx)
    if is_main_process():
        report(result, args, ctx, compute_dtype)
        if args.profile:
            print(result["profile"], flush=True)
        if args.json:
            print(JSON_PREFIX + json.dumps(result), flush=True)
    return result


VARIANTS = (("plain eager", ["--plain_eager"]), ("eager", []), ("compiled", ["--compile"]))


def use_plain_eager_step() -> None:
    """`--plain_eager`: the same step written the textbook way, as the reference for memory and speed.

    The iBOT cross-entropy through autograd of `log_softmax` (materialising (M, K) temporaries, M ≈ 600 masked
    patches × K = 65,536), the MLP keeping GELU's output for the backward pass, and glibc's default allocator
    (blocks above 32 MB go back to the kernel when freed). What it shares with ours is what the reference
    DINOv2 step does too: teacher outputs dropped once the targets exist, weight norm as v·(g/‖v‖), one split
    of the head output.
    """
    import torch.nn.functional as F

    import dino.distributed.device as device_module
    import dino.losses.ibot_patch_loss as ibot_module
    from dino.models.vision_transformer import Mlp

    Mlp.forward = lambda self, x: self.fc2(self.act(self.fc1(x)))

    ibot_module.soft_cross_entropy = lambda logits, targets, temperature: (
        -(targets * F.log_softmax(logits / temperature, dim=-1)).sum(-1)
    )
    device_module.retain_freed_memory = lambda: False


def compare_eager(argv: list[str], args) -> dict:
    """Run this script as plain eager, eager and `--compile`, one process each, one after the other; compare."""
    base = [
        a
        for a in argv
        if a not in ("--compare_eager", "--compile", "--plain_eager", "--json") and not a.startswith("--out=")
    ]
    if "--out" in base:  # the children only print; the comparison alone is appended to the file
        del base[base.index("--out") : base.index("--out") + 2]
    results, load_before = {}, os.getloadavg()
    for name, extra in VARIANTS:
        command = [sys.executable, str(Path(__file__).resolve()), *base, *extra, "--json"]
        print(f"$ {' '.join(command)}", flush=True)
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = child.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith(JSON_PREFIX)), flush=True)
        if child.returncode != 0:
            raise SystemExit(f"the {name} run failed (exit {child.returncode})")
        results[name] = json.loads([line for line in lines if line.startswith(JSON_PREFIX)][-1][len(JSON_PREFIX) :])
    plain = results["plain eager"]
    rows = [
        ("s/step (median)", "s_per_step", "{:.3f}"),
        ("images/s", "images_per_s", "{:.2f}"),
        ("MFU", "mfu", "{:.1%}"),
        ("matmul GFLOP/s (denominator)", "matmul_gflops", "{:.1f}"),
        (f"peak memory, MiB ({plain['peak_memory_scope']})", "peak_memory_mb", "{:.0f}"),
        ("process peak memory since start, MiB", "process_peak_memory_mb", "{:.0f}"),
        ("first warm-up step, s", "first_step", "{:.1f}"),
    ]
    for result in results.values():  # the compiled run's includes compiling
        result["first_step"] = result["warmup_times"][0] if result["warmup_times"] else float("nan")
    names = [name for name, _ in VARIANTS]
    lines = [
        f"### {plain['preset']}, {plain['precision']}: plain eager vs ours (eager, compiled blocks), one process each",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}; "
        f"load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[name][key]) for name in names) + " |")
    lines.append("")
    for name in names[1:]:
        ratio = results[name]["peak_memory_mb"] / plain["peak_memory_mb"]
        lines.append(
            f"- {name}: {plain['s_per_step'] / results[name]['s_per_step']:.3f}× the plain step's speed; "
            f"peak memory {ratio:.3f} × plain eager ({'not higher' if ratio <= 1.0 else 'HIGHER'})"
        )
    lines += [
        f"- compile time ≈ first compiled warm-up step − eager's: "
        f"{results['compiled']['first_step'] - results['eager']['first_step']:.1f} s",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text + "\n")
    return results


def report(result: dict, args, ctx: DeviceContext, compute_dtype: torch.dtype) -> None:
    dtype_name = str(compute_dtype).replace("torch.", "")
    lines = [
        f"### {result['preset']}, {result['precision']}, {result['parallel']} × {result['processes']} process(es), "
        f"batch {result['batch_per_process']}/process, "
        + ("compiled blocks" if result["compile"] else "plain eager" if result.get("plain_eager") else "eager")
        + f", activation checkpointing {result['activation_checkpointing']}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {ctx.description()}; "
        f"torch {torch.__version__}",
        f"- s/step (median of {args.steps} after {args.warmup} warm-up): **{result['s_per_step']:.3f}**; "
        f"all: {', '.join(f'{t:.3f}' for t in result['step_times'])}",
        f"- images/s: **{result['images_per_s']:.2f}**",
        f"- counted FLOPs per step (FlopCounterMode): {result['gflop_per_step']:.1f} GFLOP",
        f"- MFU denominator: {args.matmul_size}³ {dtype_name} matmul, median {result['matmul_gflops']:.1f} GFLOP/s "
        "(same run, interleaved with the steps)",
        f"- MFU: **{100 * result['mfu']:.1f}%**"
        + (
            f" (vs the fp32 matmul rate {result['fp32_matmul_gflops']:.1f} GFLOP/s: {100 * result['mfu_vs_fp32']:.1f}%)"
            if "mfu_vs_fp32" in result
            else ""
        ),
        *(
            [
                f"- MFU against the data-sheet peak ({result['datasheet_tflops']:.0f} TFLOP/s): "
                f"**{100 * result['mfu_datasheet']:.1f}%**"
            ]
            if "mfu_datasheet" in result
            else []
        ),
        f"- attention kernels: {', '.join(result['attention_backend']) or 'none seen'}",
        f"- kept for the backward pass (saved tensors, exact): {result['saved_for_backward_mb']:.0f} MiB",
        f"- peak memory: {result['peak_memory_mb']:.0f} MiB ({result['peak_memory_scope']}); process peak since "
        f"start: {result['process_peak_memory_mb']:.0f} MiB",
        f"- compile: {'on' if result['compile'] else 'off'}; warm-up steps: "
        f"{', '.join(f'{t:.1f}' for t in result['warmup_times'])} s"
        + (" (the first one compiles)" if result["compile"] else ""),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch-home"))
    main()
