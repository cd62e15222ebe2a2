"""Inference speed of our backbone vs the libraries users would otherwise pick, measured side by side.

    python benchmarks/inference.py                          # ViT-S/14, 224², batch 16, CPU
    python benchmarks/inference.py --arch vit_small vit_base --batch 1 32 --rounds 7

Every contender runs on the same random input in the same process; the contenders are interleaved round by
round (A B C … A B C …) so that load from other processes on a shared machine hits all of them alike, and
the median over rounds is reported.  Weights are random (nothing is downloaded); timm and transformers
models are built from their configs.  The compute floor is the model's matmul FLOPs divided by this
machine's measured fp32 matmul rate.  Output: a markdown table on stdout (and --out FILE).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from dino.distributed import DeviceContext
from dino.inference.fast import optimize_for_inference
from dino.models import ARCH_SIZES, build_backbone

warnings.filterwarnings("ignore")


def vit_flops(arch: str, image: int, patch: int = 14) -> float:
    """Multiply-add FLOPs (×2) of the matmuls of one image: patch embedding, qkv, attention, proj, MLP."""
    dim, depth, _, _ = ARCH_SIZES[arch]
    n = (image // patch) ** 2 + 1
    block = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim + 2 * 2 * n * dim * 4 * dim
    return depth * block + 2 * (n - 1) * 3 * patch * patch * dim


def matmul_rate(
    device: torch.device, dtype=torch.float32, rows: int = 4096, dim: int = 384, repeats: int = 20
) -> float:
    """Measured GFLOP/s of a (rows×dim)·(dim×4dim) product, the shape of a ViT-S MLP layer.

    The best of 5 measurements: load from other processes only ever lowers the rate, and the floor built
    from it should be a lower bound on the time.
    """
    a = torch.randn(rows, dim, device=device, dtype=dtype)
    b = torch.randn(dim, 4 * dim, device=device, dtype=dtype)
    rates = []
    for _ in range(5):
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * rows * dim * 4 * dim * repeats / (time.perf_counter() - start) / 1e9)
    return max(rates)


def build_contenders(arch: str, image: int, device: torch.device, compile_model: bool, peers: bool):
    """name → (callable(images) → [CLS] features, input dtype)."""
    ours = build_backbone(arch, 14, img_size=518, init_values=1.0).eval().to(device)
    for block in ours.blocks:  # LayerScale values away from 1, so folding it is really exercised
        block.ls1.gamma.data.uniform_(0.5, 1.5)
        block.ls2.gamma.data.uniform_(0.5, 1.5)
    contenders = {"ours fp32 (eager model)": (lambda x: ours(x), torch.float32)}
    fast = optimize_for_inference(ours, device=device)
    contenders["ours fp32 (inference copy)"] = (lambda x: fast(x), torch.float32)
    fast_bf16 = optimize_for_inference(ours, dtype=torch.bfloat16, device=device)
    contenders["ours bf16 weights"] = (lambda x: fast_bf16(x), torch.bfloat16)
    if device.type == "cpu":
        fast_int8 = optimize_for_inference(ours, int8=True)
        contenders["ours int8 dynamic"] = (lambda x: fast_int8(x), torch.float32)
        # static ranges calibrated on other images than the timed (and cosine-checked) ones
        calibration = torch.randn(16, 3, image, image, generator=torch.Generator().manual_seed(1))
        fast_int8_static = optimize_for_inference(ours, int8=True, calibration_images=calibration)
        contenders["ours int8 static (calibrated)"] = (lambda x: fast_int8_static(x), torch.float32)
    if device.type == "cpu":
        contenders.update(onnxruntime_contenders(ours, image))
    if compile_model:
        fast_compiled = optimize_for_inference(ours, compile=True, device=device)
        contenders["ours fp32 compiled"] = (lambda x: fast_compiled(x), torch.float32)
    if peers:
        import timm

        timm_model = timm.create_model(f"{arch}_patch14_dinov2", pretrained=False, img_size=image).eval().to(device)
        contenders["timm fp32"] = (lambda x: timm_model.forward_features(x)[:, 0], torch.float32)
        contenders["timm bf16 autocast"] = (
            _autocast(lambda x: timm_model.forward_features(x)[:, 0], device),
            torch.float32,
        )
        try:
            from transformers import Dinov2Config, Dinov2Model

            dim, depth, heads, _ = ARCH_SIZES[arch]
            config = Dinov2Config(
                hidden_size=dim,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                image_size=518,
                patch_size=14,
                attn_implementation="sdpa",
            )
            hf = Dinov2Model(config).eval().to(device)
            contenders["transformers fp32 (sdpa)"] = (lambda x: hf(pixel_values=x).pooler_output, torch.float32)
            contenders["transformers bf16 autocast"] = (
                _autocast(lambda x: hf(pixel_values=x).pooler_output, device),
                torch.float32,
            )
        except ImportError:
            print("transformers not installed: skipping the Dinov2Model rows")
    return ours, fast_int8 if device.type == "cpu" else None, fast_bf16, contenders


def onnxruntime_contenders(model, image: int) -> dict:
    """Our ONNX export run by onnxruntime, fp32 and int8 (onnxruntime's dynamic quantiser); {} without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: skipping the ONNX rows")
        return {}
    import tempfile

    from dino.inference.export.onnx import export_onnx, quantize_onnx_int8

    folder = tempfile.mkdtemp(prefix="dino_bench_")
    fp32_path = export_onnx(model, f"{folder}/model.onnx", image_size=image)
    int8_path = quantize_onnx_int8(fp32_path, f"{folder}/model_int8.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # onnxruntime's idle threads otherwise busy-wait after each run and steal the CPU from the next contender
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rows = {}
    for name, path in (("ours → onnxruntime fp32", fp32_path), ("ours → onnxruntime int8", int8_path)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rows[name] = (
            (lambda s: lambda x: torch.from_numpy(s.run(["cls"], {"images": x.numpy()})[0]))(session),
            torch.float32,
        )
    return rows


def _autocast(fn, device):
    def run(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(x)

    return run


@torch.inference_mode()
def run(
    arch: str, image: int, batch: int, rounds: int, device_ctx: DeviceContext, compile_model: bool, peers: bool
) -> list[dict]:
    device = device_ctx.device
    ours, fast_int8, fast_bf16, contenders = build_contenders(arch, image, device, compile_model, peers)
    x = torch.randn(batch, 3, image, image, device=device)
    reference = ours(x).float()
    cosines, peak_mb = {}, {}
    for name, (fn, dtype) in contenders.items():
        out = fn(x.to(dtype)).float()  # warm-up (and compilation) outside the timed rounds
        device_ctx.reset_peak_memory()
        fn(x.to(dtype))
        if device.type == "cuda":  # on the CPU all contenders share one process's RSS, which cannot be split
            peak_mb[name] = device_ctx.max_memory_allocated_mb()
        if name.startswith("ours"):
            cosines[name] = float(F.cosine_similarity(out, reference, dim=-1).min())
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (fn, dtype) in contenders.items():
            xi = x.to(dtype)
            device_ctx.synchronize()
            start = time.perf_counter()
            fn(xi)
            device_ctx.synchronize()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            dict(
                name=name,
                ms_per_image=1000 * median / batch,
                images_per_s=batch / median,
                spread=(1000 * min(samples) / batch, 1000 * max(samples) / batch),
                cosine=cosines.get(name),
                peak_mb=peak_mb.get(name),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["vit_small"], choices=["vit_small", "vit_base", "vit_large"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--no_compile", action="store_true", help="skip the torch.compile row (compiling takes minutes on 2 cores)"
    )
    parser.add_argument("--no_peers", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_ctx = DeviceContext.create(args.device)
    lines = [
        f"date: {datetime.date.today().isoformat()} · machine: {DeviceContext.create('cpu').description()} · "
        f"device: {device_ctx.type} · torch {torch.__version__}"
    ]
    floor_rate = matmul_rate(device_ctx.device)
    lines.append(f"measured fp32 matmul rate: {floor_rate:.0f} GFLOP/s")
    for arch in args.arch:
        for batch in args.batch:
            flops = vit_flops(arch, args.image)
            floor_ms = flops / (floor_rate * 1e9) * 1000
            rows = run(arch, args.image, batch, args.rounds, device_ctx, not args.no_compile, not args.no_peers)
            peers_fp32 = [r["ms_per_image"] for r in rows if r["name"] in ("timm fp32", "transformers fp32 (sdpa)")]
            fastest_peer = min(peers_fp32) if peers_fp32 else None
            lines.append("")
            lines.append(
                f"### {arch}/14, {args.image}², batch {batch} — {flops / 1e9:.1f} GFLOP/image, "
                f"compute floor {floor_ms:.1f} ms/image"
            )
            lines.append("")
            lines.append(
                "| contender | ms/image (median) | min–max | images/s | vs fastest fp32 peer | cosine vs fp32 | peak MiB |"
            )
            lines.append("|---|---|---|---|---|---|---|")
            for r in rows:
                ratio = f"{fastest_peer / r['ms_per_image']:.2f}×" if fastest_peer else "–"
                cosine = f"{r['cosine']:.4f}" if r["cosine"] is not None else "–"
                peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "–"
                lines.append(
                    f"| {r['name']} | {r['ms_per_image']:.1f} | {r['spread'][0]:.0f}–{r['spread'][1]:.0f} | "
                    f"{r['images_per_s']:.1f} | {ratio} | {cosine} | {peak} |"
                )
            print("\n".join(lines[-len(rows) - 4 :]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
