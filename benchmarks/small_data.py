"""Small real datasets: does the small_data recipe beat raw pixels and random init?  Measured in one run.

    python benchmarks/small_data.py                                   # mnist5k + digits, seed 0, the preset as is
    python benchmarks/small_data.py --datasets mnist5k --seeds 0 1 2  # medians over seeds
    python benchmarks/small_data.py --preset demo                     # the status quo, for comparison
    python benchmarks/small_data.py --datasets mnist5k recipe.images_seen=40000 dino.head_n_prototypes=256

For every dataset (shipped inside a PyPI package, `dino.data.package_datasets`; written once as
`<root>/<name>/{train,val}` ImageFolders) and every seed it

1. composes the preset with the overrides, lets the recipe derive patch/crop sizes and epochs from the images
   (printed), and trains it with `dino.train.loop.train` (1 process, `--device`);
2. runs the end-of-training report (`dino.train.knn_check`): weighted kNN (k=20, T=0.07) of the teacher,
   of the raw pixels and of a random-init backbone of the same architecture, on the same val split at the
   training resolution.

It prints one row per run and the medians per dataset (markdown), and appends them to `--out` when given.
Training time is wall-clock of `train()` alone (the machine's load is not controlled: see the notes printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per epoch would be noise here

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dino.config import compose  # noqa: E402
from dino.data.package_datasets import LOADERS, PACKAGE_OF, available, export_image_folder  # noqa: E402
from dino.train.recipe import apply_small_data_recipe  # noqa: E402


def run_one(preset: str, data_path: str, output_dir: str, seed: int, overrides: list[str], device: str) -> dict:
    from dino.train.knn_check import report_knn_if_requested
    from dino.train.loop import train

    cfg = compose(
        f"train/{preset}",
        [
            f"train.data_path={data_path}",
            f"train.output_dir={output_dir}",
            f"train.seed={seed}",
            f"train.device={device}",
            "train.resume=false",
            "train.knn_eval=true",
            *overrides,
        ],
    )
    explicit = {o.split("=", 1)[0] for o in overrides}
    apply_small_data_recipe(cfg, explicit=explicit)
    start = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - start
    if result.stopped_early:
        raise SystemExit(f"training stopped early ({result.output_dir}); no kNN report")
    report = report_knn_if_requested(cfg, result) or {}
    return {
        "train_s": train_s,
        "epochs": int(cfg.optim.epochs),
        "steps": result.global_step,
        "image_size": int(cfg.crops.global_crops_size),
        "patch": int(cfg.model.patch_size),
        **report,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(LOADERS))
    parser.add_argument("--preset", default="small_data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--root",
        default=os.path.expanduser("~/.cache/dino/small_data"),
        help="where the datasets are written as ImageFolders (once)",
    )
    parser.add_argument("--output_dir", default="output/bench_small_data")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of training (default: the loop's choice, all cores); 1 is faster on a "
        "machine shared with other jobs (OpenMP threads spin-wait when oversubscribed)",
    )
    parser.add_argument("--max_train", type=int, default=None, help="stratified subset of the training split")
    parser.add_argument("--out", default=None, help="append the markdown rows to this file")
    parser.add_argument("--json", default=None, help="write every run's numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    if args.threads is not None:
        import torch

        from dino.distributed.device import DeviceContext

        original = DeviceContext.set_cpu_threads

        def set_threads(self, local_world_size: int) -> None:
            original(self, local_world_size)
            torch.set_num_threads(args.threads)

        DeviceContext.set_cpu_threads = set_threads
    runs: list[dict] = []
    for name in args.datasets:
        if not available(name):
            print(f"skipping {name}: pip install {PACKAGE_OF[name]}")
            continue
        suffix = "" if args.max_train is None else f"_{args.max_train}"
        data_path = export_image_folder(name, Path(args.root) / f"{name}{suffix}", max_train=args.max_train)
        for seed in args.seeds:
            out = Path(args.output_dir) / f"{args.preset}_{name}_s{seed}"
            print(f"\n=== {name}, preset {args.preset}, seed {seed} → {out}", flush=True)
            row = run_one(args.preset, data_path, str(out), seed, list(args.overrides), args.device)
            row.update(dataset=name, seed=seed, preset=args.preset, overrides=list(args.overrides))
            runs.append(row)

    header = (
        "| dataset | preset | seed | train images | size/patch | epochs | train time | teacher kNN | raw pixels "
        "| random init | vs raw | vs random |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in runs:
        lines.append(
            f"| {r['dataset']} | {r['preset']} | {r['seed']} | {r.get('num_train', '?')} | "
            f"{r['image_size']}/{r['patch']} | {r['epochs']} | {r['train_s'] / 60:.1f} min | "
            f"{r.get('trained_top1', float('nan')):.1f} | {r.get('raw_pixels_top1', float('nan')):.1f} | "
            f"{r.get('random_init_top1', float('nan')):.1f} | {r.get('improvement_over_raw_pixels', float('nan')):+.1f} | "
            f"{r.get('improvement', float('nan')):+.1f} |"
        )
    for name in dict.fromkeys(r["dataset"] for r in runs):
        rs = [r for r in runs if r["dataset"] == name]
        lines.append(
            f"| **{name} median** ({len(rs)} seeds) | {args.preset} | | {rs[0].get('num_train', '?')} | "
            f"{rs[0]['image_size']}/{rs[0]['patch']} | {rs[0]['epochs']} | "
            f"{median([r['train_s'] for r in rs]) / 60:.1f} min | "
            f"**{median([r['trained_top1'] for r in rs]):.1f}** | {median([r['raw_pixels_top1'] for r in rs]):.1f} | "
            f"{median([r['random_init_top1'] for r in rs]):.1f} | "
            f"{median([r['improvement_over_raw_pixels'] for r in rs]):+.1f} | "
            f"{median([r['improvement'] for r in rs]):+.1f} |"
        )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    overrides = " ".join(args.overrides) or "(none)"
    text = "\n".join([f"\nsmall-data benchmark — {machine}; overrides: {overrides}", *lines])
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "runs": runs}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
