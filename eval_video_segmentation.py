"""DAVIS-2017 video object segmentation by label propagation: same as `dino eval-davis` (flags: `python eval_video_segmentation.py --help`).

The job lives in `dino.jobs.eval_davis`; this file stays for `python eval_video_segmentation.py` and `torchrun ... eval_video_segmentation.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_davis import FLAGS, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
