"""Linear monocular depth probe (DINOv2 lin. 1 / lin. 4) on a frozen backbone: same as `dino eval-depth` (flags: `python eval_depth.py --help`).

The job lives in `dino.jobs.eval_depth`; this file stays for `python eval_depth.py` and `torchrun ... eval_depth.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_depth import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
