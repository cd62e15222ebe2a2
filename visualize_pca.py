"""PCA pictures of patch features: same as `dino visualize-pca` (flags: `python visualize_pca.py --help`).

The job lives in `dino.jobs.visualize_pca`; this file stays for `python visualize_pca.py` and `torchrun ... visualize_pca.py`.
"""

from dino.errors import run_cli
from dino.jobs.visualize_pca import CLI, main  # noqa: F401  (re-exported for code that imports the script)

if __name__ == "__main__":
    run_cli(main)
