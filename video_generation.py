"""Attention overlay on every frame of a video or a folder of frames: same as `dino video` (flags: `python video_generation.py --help`).

The job lives in `dino.jobs.video`; this file stays for `python video_generation.py` and `torchrun ... video_generation.py`.
"""

from dino.errors import run_cli
from dino.jobs.video import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
