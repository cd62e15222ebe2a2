"""The package's logger, and the console handler the command-line entry points install.

Library code logs to ``logging.getLogger("dino")`` (or a child, ``get_logger(__name__)``), so a program that
imports the package can silence, filter or redirect it with the standard `logging` API.  The package itself
attaches only a `NullHandler`; the command-line entry points (`dino ...`, the top-level scripts) call
`setup_cli_logging`, which prints INFO messages to stdout and warnings/errors to stderr as bare lines, so the
console output is what the scripts always printed.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "dino"

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The logger for module `name` (a child of ``dino`` when `name` is a ``dino.*`` module name)."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


class ConsoleHandler(logging.Handler):
    """Bare message lines: below WARNING to the *current* sys.stdout, WARNING and above to sys.stderr.

    The streams are looked up at every record (not bound when the handler is made), so output redirected or
    captured after start-up (pytest's capsys, contextlib.redirect_stdout) still receives the lines.
    """

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not crash the run, as with logging.StreamHandler
            self.handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> logging.Logger:
    """Install the console handler on the ``dino`` logger once (idempotent) and set its level."""
    if not any(isinstance(handler, ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(level)
    return logger
