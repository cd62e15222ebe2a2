"""Linear semantic segmentation probe (DINOv2 lin. / +ms) on a frozen backbone: same as `dino eval-segmentation` (flags: `python eval_semantic_segmentation.py --help`).

The job lives in `dino.jobs.eval_segmentation`; this file stays for `python eval_semantic_segmentation.py` and `torchrun ... eval_semantic_segmentation.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_segmentation import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
