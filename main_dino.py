"""Train a ViT with DINO / DINOv2 self-distillation. `python main_dino.py --help` lists the flags; `dino train`
is the same command once the package is installed.

With no arguments it runs the CPU demo: a tiny ViT on the built-in procedural dataset, then kNN of the
trained teacher next to a randomly initialised backbone.
"""

from dino.train.cli import cli

if __name__ == "__main__":
    cli()
