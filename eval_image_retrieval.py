"""Image retrieval on revisited Oxford / Paris: same as `dino eval-retrieval` (flags: `python eval_image_retrieval.py --help`).

The job lives in `dino.jobs.eval_retrieval`; this file stays for `python eval_image_retrieval.py` and `torchrun ... eval_image_retrieval.py`.
"""

from dino.errors import run_cli
from dino.jobs.eval_retrieval import FLAGS, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
