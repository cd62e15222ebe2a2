"""Copy detection on Copydays "strong": same as `dino eval-copy-detection` (flags: `python eval_copy_detection.py --help`).

The job lives in `dino.jobs.eval_copy_detection`; this file stays for `python eval_copy_detection.py` and `torchrun ... eval_copy_detection.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_copy_detection import FLAGS, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
