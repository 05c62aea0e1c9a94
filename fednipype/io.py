"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], *, durable: bool = True
) -> Iterator[tuple[IO[bytes], Path]]:
    """Write a file so that it appears complete or not at all.

    Content goes to a hidden temporary file (``.<name>.<random>.tmp``) in the same folder
    (created if needed), which replaces ``path`` with :func:`os.replace` only when the block
    succeeds; on failure it is removed.  A process killed mid-write leaves at most the hidden
    temporary file.

    Parameters
    ----------
    path : path-like
        Final path.
    durable : bool
        Flush the data and the rename to disk (``fsync``), so the file also survives a power
        failure.  Releases and the ledger need this; re-creatable outputs (features, reports)
        may skip it: the rename alone keeps them whole when a process dies.

    Yields
    ------
    tuple
        ``(binary file object, temporary path)``: callers that must act on the complete
        content before it appears (e.g. record its hash) read the temporary path.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(out) as (handle, tmp):
    ...     _ = handle.write(b"hello")
    >>> out.read_bytes(), tmp.exists()
    (b'hello', False)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode="wb", dir=final.parent, prefix=f".{final.name}.", suffix=".tmp", delete=False
    )
    tmp_path = Path(handle.name)
    try:
        yield handle, tmp_path
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
        handle.close()
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    except BaseException:
        handle.close()
        tmp_path.unlink(missing_ok=True)
        raise
    if not durable:
        return
    # Make the rename itself durable.
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Parameters
    ----------
    path : path-like
        Destination; its parent folder is created if needed.
    data : bytes
        Content to write.
    durable : bool
        Flush to disk (see :func:`atomic_write`).

    Returns
    -------
    pathlib.Path
        The destination path.
    """
    with atomic_write(path, durable=durable) as (handle, _):
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically, with a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", durable=durable)
