"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Run:  python -c "from common.atomic import write_text; write_text('/tmp/x.json', '{}')"

The data go to a temp file with a unique name in the target's directory (same filesystem, so the rename is one
step; two writers of the same path never share a temp file), which is fsynced, renamed over the target with
os.replace, and the directory is fsynced so the rename itself survives a power loss. An exception on the way
removes the temp file and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename (or create/delete) in `directory` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename already happened
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file beside `path` for writing; on a clean exit it replaces `path`, on an exception it is removed.

    mode: "w" (text, `encoding`) or "wb" (binary). durable=False skips the two fsyncs (a file that is cheap to
    rebuild and written often); the replace is atomic either way. The parent directory is created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike, *, durable: bool = True) -> Path:
    """A copy of `src` at `dest`, atomically (a reader sees the old file or the whole copy, never part of it)."""
    import shutil

    with atomic_open(dest, "wb", durable=durable) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)
    return Path(dest)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
    with atomic_open(path, "w", encoding=encoding, durable=durable) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, durable: bool = True,
               **dumps_kwargs: Any) -> Path:
    """`obj` as JSON (plus a trailing newline); `dumps_kwargs` go to json.dumps (default=str, allow_nan=False...).
    The object is serialized before the file is touched, so an unserializable one leaves the target as it was."""
    text = json.dumps(obj, indent=indent, **dumps_kwargs) + "\n"
    return write_text(path, text, durable=durable)

