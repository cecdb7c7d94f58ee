"""Shard paths and samples: brace patterns, local/remote checks, image decoding, bad-sample warnings.

Both stages read webdataset tar shards named by brace patterns (``train-{000000..000099}.tar``);
the checks that a pattern is well formed and its local files exist, and the decoding of one
image member, live here so a bad path fails the same way in every entry point.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any
from urllib.parse import urlparse

import braceexpand
from PIL import Image
from webdataset.gopen import gopen_schemes

from common.config import ConfigError

log = logging.getLogger(__name__)

# Warnings about corrupt data: the first few, then one per this many, with the running count.
WARN_FIRST, WARN_EVERY = 20, 1000


def is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and scheme in gopen_schemes


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url.removeprefix("file:")


def validate_data_paths(data_path: list[str] | str) -> list[str]:
    """Brace-expand every pattern (zero padding kept) and check local shards exist.

    Returns the concatenated shard URLs. Raises ``FileNotFoundError`` naming the pattern when a
    local shard is missing, so a typo fails at config validation rather than mid-run;
    ``pipe:`` and remote URLs are accepted unchecked.
    """
    patterns = [data_path] if isinstance(data_path, str) else list(data_path)
    if not patterns:
        raise ValueError("data_path: no shard pattern given")
    urls: list[str] = []
    for pattern in patterns:
        expanded = list(braceexpand.braceexpand(str(pattern)))
        if not is_remote(str(pattern)):
            missing = [u for u in expanded if not os.path.isfile(local_path(u))]
            if missing:
                raise FileNotFoundError(
                    f"data_path {pattern!r}: {len(missing)} of {len(expanded)} shard(s) not found, "
                    f"first missing: {missing[0]!r}"
                )
        urls.extend(expanded)
    return urls


class RateLimitedWarnings:
    """Corrupt-data warnings: every one at first, then sparsely, so a bad shard cannot flood logs."""

    def __init__(self) -> None:
        self.count = 0

    def warn(self, msg: str, *args: Any) -> None:
        self.count += 1
        if self.count <= WARN_FIRST or self.count % WARN_EVERY == 0:
            log.warning("skipped corrupt data (#%d in this worker): " + msg, self.count, *args)


class DataError(ConfigError):
    """The training data as a whole is unusable (every sample or shard broken): the user's to fix.

    A ConfigError, so the entry points report it as one ``error:`` line with exit code 2 rather
    than a traceback per rank (a DataLoader worker's copy is unwrapped by ``user_message``).
    """


class BadSample(ValueError):
    """A sample that cannot be used (missing member, undecodable image or caption)."""


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB; truncated or garbled files raise (tests count calls)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# Data paths
# --------------------------------------------------------------------------------------------
# Member mtime of every tar shard we write (toy world, preprocessed ImageNet, latent cache): the
# same input gives byte-identical shards, and an integer keeps members in plain ustar headers. A
# float mtime (webdataset's default, time.time()) adds a PAX extended header to every member, which
# tripled the cost of reading a latent cache shard (Python's tarfile parses PAX in Python).
TAR_MTIME = 1_700_000_000
_RANGE = re.compile(r"^(-?\d+\.\.-?\d+|[A-Za-z]\.\.[A-Za-z])(\.\.-?\d+)?$")


def check_brace_syntax(pattern: str) -> None:
    """Raise ValueError for a brace pattern that braceexpand would silently take literally.

    braceexpand leaves ``{000..0999x}`` or an unclosed ``{`` in the file name, so the run would
    look for one odd file instead of a thousand shards. Every group must be a comma list or a
    numeric/letter range (``{1..99}``, ``{a..f}``, optional ``..step``).
    """
    open_groups: list[list[int]] = []  # [start column, has a nested group]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            if open_groups:
                open_groups[-1][1] = 1
            open_groups.append([i, 0])
        elif ch == "}":
            if not open_groups:
                raise ValueError(f"unmatched '}}' at column {i + 1}")
            start, nested = open_groups.pop()
            _check_group(pattern[start + 1 : i], bool(nested))
        i += 1
    if open_groups:
        raise ValueError(f"unclosed '{{' at column {open_groups[-1][0] + 1}")


def _check_group(body: str, nested: bool) -> None:
    if _top_level_comma(body) or (not nested and _RANGE.match(body)):
        return
    raise ValueError(f"'{{{body}}}' is neither a comma list nor a range like {{000..999}}")


def _top_level_comma(body: str) -> bool:
    depth = 0
    for ch in body:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            return True
    return False
