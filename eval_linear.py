"""Linear evaluation of a frozen backbone (DINOv2 grid of linear probes, or logistic regression): same as `dino eval-linear` (flags: `python eval_linear.py --help`).

The job lives in `dino.jobs.eval_linear`; this file stays for `python eval_linear.py` and `torchrun ... eval_linear.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_linear import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
