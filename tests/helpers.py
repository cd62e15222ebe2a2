"""Small builders shared by the training tests: tiny generated images and a CPU-sized training config."""

from pathlib import Path

from dino.data.demo_dataset import make_demo_image

PATTERNS = ("stripes_h", "checkerboard", "rings")


def write_image_folder(root: Path, per_class: int = 8, image_size: int = 32, split_seed: int = 0) -> Path:
    """A labelled ImageFolder `root/<pattern>/<i>.png` of 3 classes; returns `root`."""
    for label, pattern in enumerate(PATTERNS):
        folder = root / pattern
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_demo_image(label, seed=(label, i, split_seed), image_size=image_size).save(folder / f"{i}.png")
    return root


def tiny_overrides(data_path, output_dir, batch_size: int = 8, *extra: str) -> list[str]:
    """Overrides of the demo preset for a 2-block, width-48 ViT on 32-px crops; later `extra` entries win."""
    return [
        f"train.data_path={data_path}",
        f"train.output_dir={output_dir}",
        f"train.batch_size_per_device={batch_size}",
        "train.num_workers=0",
        "train.knn_eval=false",
        "train.log_freq=1",
        "train.device=cpu",
        "model.arch=vit_tiny",
        "model.patch_size=8",
        "model.depth=2",
        "model.embed_dim=48",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.local_crops_number=2",
        "dino.head_n_prototypes=64",
        "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=64",
        "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        *extra,
    ]
