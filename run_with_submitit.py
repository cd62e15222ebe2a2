"""Submit DINO training to SLURM with submitit (requeue on pre-emption, resume from the last checkpoint).

    python run_with_submitit.py --nodes 2 --gpus_per_node 8 -- --config dinov2_vitl14 --data_path DIR --hmp

Same as `dino slurm` and `python -m dino.run.slurm`; `python run_with_submitit.py --help` lists the options.
"""

from dino.run.slurm import cli

if __name__ == "__main__":
    cli()
