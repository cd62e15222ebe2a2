"""Launchers that start training somewhere else (a SLURM cluster); torchrun needs none (see main_dino.py --help)."""
