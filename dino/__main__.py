"""`python -m dino ...` runs the `dino` command (see dino/cli.py)."""

from dino.cli import main

main()
