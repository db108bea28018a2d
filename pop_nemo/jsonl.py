"""The one JSON Lines reader: every input file (corpus, records, pairs, HealthBench, caches)
fails the same way, with the file and line number of the first bad line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def parse_lines(text: str, where: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of ``text``; a line that is not JSON raises
    ``error("<where>:<n>: not valid JSON (...)")``. Splits on ``\\n`` only: U+2028 may sit inside
    a JSON string."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{n}: not valid JSON ({e.msg})") from None


def read_lines(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """:func:`parse_lines` over a UTF-8 file."""
    return parse_lines(Path(path).read_text(encoding="utf-8"), path, error)


def read_rows(path: str | Path, error: type[Exception] = ValueError) -> list[Any]:
    """Every value of a JSON Lines file, in order."""
    return [value for _, value in read_lines(path, error)]
