"""The jobs behind the `dino` subcommands and the top-level scripts: each module holds its `CLI` (flags over
config keys) and `main(argv)`.  Imported on use, so `dino --help` stays light."""
