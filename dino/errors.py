"""User-facing errors.

A `UserError` is raised for anything the user can fix (a wrong path, a bad flag, a checkpoint that does
not fit the chosen architecture).  Scripts wrap their entry point with `run_cli`, which prints such an
error as one clear line and exits with status 2 instead of dumping a traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable


class UserError(Exception):
    """An error caused by user input; printed without a traceback."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def require_path(path: str | os.PathLike, what: str = "path", must_be_dir: bool | None = None) -> str:
    """Check that `path` exists (and is a directory / file when asked); raise a UserError otherwise."""
    path = os.fspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"{what} does not exist: {path}")
    if must_be_dir is True and not os.path.isdir(path):
        raise UserError(f"{what} is not a directory: {path}")
    if must_be_dir is False and not os.path.isfile(path):
        raise UserError(f"{what} is not a file: {path}")
    return path


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main function; user errors become one line on stderr and exit code 2.

    Installs the console handler of the ``dino`` logger first, so the library's log lines print as before."""
    from dino.log import setup_cli_logging

    setup_cli_logging()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
