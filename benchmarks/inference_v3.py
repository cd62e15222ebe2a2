"""DINOv3 ViT-S/16 on the CPU: our eager model, our inference copy (fp32, int8) against timm and transformers.

Random weights at the official init (`dinov3_vits16`, pretrained=False); transformers' `DINOv3ViTModel` is loaded from
our `to_transformers` export; timm's `vit_small_patch16_dinov3` has its own random weights (speed only). Contenders
are interleaved round by round; the median ms/image is printed as a Markdown table row per contender.

    python benchmarks/inference_v3.py [--batch 16] [--image 224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

from dino.inference.fast import optimize_for_inference
from dino.models.dinov3 import build_dinov3, to_transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import timm
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_dinov3("dinov3_vits16").eval().requires_grad_(False)
    fast = optimize_for_inference(model)
    int8 = optimize_for_inference(model, int8=True)
    config, state = to_transformers(model)
    folder = tempfile.mkdtemp()
    with open(f"{folder}/config.json", "w") as handle:
        json.dump(config, handle)
    save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    peer = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0).eval()
    x = torch.randn(args.batch, 3, args.image, args.image)
    runs = {
        "ours eager": lambda: model(x),
        "ours inference copy": lambda: fast(x),
        "ours int8 dynamic": lambda: int8(x),
        "timm vit_small_patch16_dinov3": lambda: peer(x),
        "transformers DINOv3ViTModel": lambda: hf(pixel_values=x).pooler_output,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        reference = model(x)
        cosine = {
            name: float(torch.nn.functional.cosine_similarity(run(), reference).min())
            for name, run in runs.items()
            if not name.startswith("timm")
        }  # also the warm-up call
        peer(x)
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.batch * 1000)
    best_peer = min(statistics.median(times[name]) for name in runs if not name.startswith("ours"))
    print("| contender | ms/image (median) | min–max | vs fastest peer | cosine vs our eager fp32 |")
    print("|---|---|---|---|---|")
    for name in runs:
        median = statistics.median(times[name])
        print(
            f"| {name} | {median:.1f} | {min(times[name]):.0f}–{max(times[name]):.0f} | {best_peer / median:.2f}× | "
            f"{cosine.get(name, float('nan')):.4f} |"
        )


if __name__ == "__main__":
    main()
