"""Small shared output helpers of the retrieval, copy-detection and video-segmentation evaluations:
a plain-text results table on stdout and a JSON file of the results in the output folder."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from dino.log import get_logger

logger = get_logger(__name__)


def format_value(value: Any, decimals: int = 2) -> str:
    """Numbers with a fixed number of decimals (nan shown as 'nan'), everything else with str()."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None, decimals: int = 2
) -> str:
    """A left-aligned text table: a title line, the header, a rule, one line per row."""
    cells = [[str(h) for h in headers]] + [[format_value(v, decimals) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = [title] if title else []
    lines.append("  ".join(text.ljust(width) for text, width in zip(cells[0], widths)).rstrip())
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells[1:])
    return "\n".join(lines)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None, decimals: int = 2
) -> None:
    logger.info(format_table(headers, rows, title, decimals))


def _json_safe(value: Any) -> Any:
    """numpy scalars / arrays and nan → plain JSON (nan becomes null, which every JSON reader accepts)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, results: dict) -> str:
    """Write `results` as indented JSON (atomically: a temporary file renamed into place); returns the path."""
    from dino.io import atomic_write_json

    path = os.fspath(path)
    atomic_write_json(path, _json_safe(results), indent=2)
    return path
