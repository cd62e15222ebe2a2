"""Turn a sharded (FSDP / DCP) training checkpoint into single files, offline, in one process.

    python -m dino.train.consolidate output/checkpoint_sharded --output teacher_backbone.safetensors
    python -m dino.train.consolidate output/checkpoint_sharded --network student --output student_backbone.pth

Reads only the chosen network's tensors (never the optimiser state, so a ViT-g checkpoint does not need the
memory of the whole training state), whatever the number of ranks that wrote it, and writes the backbone
in the official key layout plus `<output>.json` with its architecture. Every eval script also reads the
sharded folder directly (`--pretrained_weights output/checkpoint_sharded`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from dino.errors import require_path, run_cli
from dino.hub import load_backbone, save_backbone
from dino.log import get_logger

logger = get_logger(__name__)


def consolidate(directory: str, output: str, network: str = "teacher") -> Path:
    require_path(directory, "sharded checkpoint", must_be_dir=True)
    from dino.hub import load_sharded_network

    stored_kwargs = load_sharded_network(directory, network).get("backbone_kwargs", {})
    backbone = load_backbone(directory, checkpoint_key=network)
    save_backbone(backbone, output, stored_kwargs or None)
    return Path(output)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", help="the checkpoint_sharded/ folder of a --parallel fsdp run")
    parser.add_argument(
        "--output",
        required=True,
        help="where to write the backbone: .safetensors (architecture in the file), or .pth (+ .json "
        "and a .safetensors copy)",
    )
    parser.add_argument("--network", default="teacher", choices=("teacher", "student"))
    args = parser.parse_args(argv)
    path = consolidate(args.directory, args.output, args.network)
    extras = (
        []
        if path.suffix == ".safetensors"
        else [p.name for p in (path.with_suffix(".json"), path.with_suffix(".safetensors")) if p.is_file()]
    )
    logger.info(f"wrote {path}" + (f" (+ {', '.join(extras)})" if extras else ""))
    return path


if __name__ == "__main__":
    run_cli(main)
