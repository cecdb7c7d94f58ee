"""Atomic file writes: a reader (or a crash) never sees half a file.

Every writer of a file that another process or a resumed run reads (``latest``, manifests,
reports, JSON records) goes through :func:`write_atomic`: the bytes go to a hidden temporary
file next to the target, which is then renamed over it with ``os.replace`` (atomic on POSIX).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2, sort_keys: bool = True) -> Path:
    """JSON with a trailing newline; keys sorted by default so records diff cleanly."""
    return write_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")
