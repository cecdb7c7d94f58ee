"""Atomic file writes: a reader (or a crash) never sees half a file.

Every writer of a file that another process or a resumed run reads (``latest``, manifests,
reports, sample images, tensors, JSON records) goes through :func:`write_with`: the content is
written to a hidden temporary file next to the target, which is then renamed over it with
``os.replace`` (atomic on POSIX). The temporary name starts with a dot and ends in ``.tmp``
(plus an optional suffix a library insists on, e.g. numpy's ``.npz``), so no glob for finished
outputs (``*.png``, ``*.json``) can pick it up, and a killed writer leaves no half target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_with(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "", fsync: bool = False) -> Path:
    """Run ``write(tmp_path)``, then rename the temporary file over ``path``.

    ``fsync=True`` forces the bytes to disk before the rename: for large results whose loss after
    a power cut would cost hours (a 50k-sample archive), not for every small record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_with(path, lambda tmp: tmp.write_bytes(payload))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text)


def write_json_atomic(
    path: str | os.PathLike,
    data: Any,
    indent: int | None = 2,
    sort_keys: bool = True,
    default: Callable[[Any], Any] | None = None,
    ensure_ascii: bool = True,
) -> Path:
    """JSON with a trailing newline; keys sorted by default so records diff cleanly."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=ensure_ascii)
    return write_atomic(path, text + "\n")
