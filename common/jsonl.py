"""JSON Lines: one JSON value per line. One reader (errors name the file and line) and the writers.

Run:  python -c "from common.jsonl import read_jsonl; print(read_jsonl('data/dialogue/sgd_pairs_subset.jsonl')[:1])"
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from common.atomic import atomic_open

T = TypeVar("T")


class JsonlError(ValueError):
    """A line that is not JSON (`json_error` holds json's message), or that the row parser refused (`detail` holds
    its message); str() names `path:line`. Callers with their own error type re-raise from these fields."""

    def __init__(self, path: Path, lineno: int, detail: str, json_error: str | None = None):
        super().__init__(f"{path}:{lineno}: {detail}")
        self.path, self.lineno, self.detail, self.json_error = path, lineno, detail, json_error


def iter_jsonl(path: str | os.PathLike, parse: Callable[[Any], T] | None = None) -> Iterator[T]:
    """The rows of a JSONL file, lazily; blank lines are skipped.

    parse(row) turns a decoded value into what the caller wants; a ValueError, KeyError or TypeError it raises
    becomes a JsonlError naming the file and line (with the parser's message). A missing file raises
    FileNotFoundError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlError(path, lineno, f"is not UTF-8 text (byte {e.start} of the line); save the file as "
                                 "UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno}); each line must be "
                                 "one JSON value: fix or remove that line", json_error=e.msg) from None
            if parse is None:
                yield row
                continue
            try:
                yield parse(row)
            except (ValueError, KeyError, TypeError) as e:
                if isinstance(e, JsonlError):
                    raise
                detail = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)
                raise JsonlError(path, lineno, detail) from None


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], T] | None = None) -> list[T]:
    """iter_jsonl as a list."""
    return list(iter_jsonl(path, parse))


def dumps_line(row: Any, **dumps_kwargs: Any) -> str:
    return json.dumps(row, **dumps_kwargs) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *, durable: bool = True, **dumps_kwargs: Any) -> Path:
    """Write every row as one line, atomically (common.atomic): the file is complete or untouched."""
    with atomic_open(path, "w", durable=durable) as f:
        for row in rows:
            f.write(dumps_line(row, **dumps_kwargs))
    return Path(path)


def append_jsonl(path: str | os.PathLike, row: Any, **dumps_kwargs: Any) -> None:
    """Append one row as a single write of one line (parent directories created). Appends of whole lines under
    O_APPEND do not interleave between processes on a local filesystem; a crash can at worst cut the last line,
    which the reader reports as malformed, naming the line."""
    path = Path(path)
    data = dumps_line(row, **dumps_kwargs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # one write(2) for any line a regular file accepts whole
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
