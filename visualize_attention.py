"""Last-block [CLS] attention of a backbone as pictures: same as `dino visualize-attention` (flags: `python visualize_attention.py --help`).

The job lives in `dino.jobs.visualize_attention`; this file stays for `python visualize_attention.py` and `torchrun ... visualize_attention.py`.
"""

from dino.errors import run_cli
from dino.jobs.visualize_attention import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
