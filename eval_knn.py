"""Weighted k-NN evaluation of a frozen backbone (DINO v1 / DINOv2 protocol): same as `dino eval-knn` (flags: `python eval_knn.py --help`).

The job lives in `dino.jobs.eval_knn`; this file stays for `python eval_knn.py` and `torchrun ... eval_knn.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_knn import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
