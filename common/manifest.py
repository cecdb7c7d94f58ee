"""Manifests of checkpoint folders: every file's relative path, size and SHA-256, and their check.

``<tag>/manifest.json`` (written by :class:`common.checkpoint.CheckpointWriter` on rank 0 after
every rank finished writing, before the tag is published)::

    {"format": 1, "algorithm": "sha256", "total_bytes": 123,
     "files": {"ema/diffusion_pytorch_model.safetensors": {"size": 100, "sha256": "ab12..."}, ...}}

Paths are relative to the tag, ``/``-separated, sorted; the manifest does not list itself. The
digests are plain SHA-256 of the whole file, so ``sha256sum`` agrees with them::

    jq -r '.files | to_entries[] | "\\(.value.sha256)  \\(.key)"' manifest.json | sha256sum -c

Hashing runs in a thread pool (``hashlib`` releases the GIL on large buffers, so threads over files
run in parallel), and :meth:`ManifestBuilder.add` lets a writer hand over files it has finished
while it writes the rest. A safetensors file handed over with its tensors
(:meth:`ManifestBuilder.add_safetensors`) is hashed from memory: only its header is read back, the
data bytes are the tensors' own (the format has no holes, so the file is header + tensors in
offset order), which saves reading the largest files of a checkpoint back from disk. Checking
compares sizes first (free) and hashes only the files whose size matches. Files present in the
folder but not listed (e.g. a leftover hidden temp folder) are not an error: a manifest vouches
for what it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.files import write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_BLOCK = 8 << 20  # 8 MiB reads: large enough that hashlib drops the GIL, small enough to stay in cache


def default_workers() -> int:
    """Hashing threads: one per usable core, at most 16 (reading, not hashing, limits beyond that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 8 MiB blocks into one reused buffer (the GIL is released)."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _tensor_bytes(t: Any) -> memoryview:
    """The raw bytes of a CPU tensor as safetensors stores them (little-endian, C order)."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_sha256(path: str | os.PathLike, tensors: dict[str, Any]) -> str:
    """SHA-256 of the safetensors file ``path`` just written from ``tensors``, from memory.

    Reads only the header back; checks that the header's offsets cover the data without gaps and
    that the sizes add up to the file's, and falls back to hashing the file when anything differs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            header = f.read(n)
        entries = sorted((v["data_offsets"], k) for k, v in json.loads(header).items() if k != "__metadata__")
        h = hashlib.sha256(head)
        h.update(header)
        pos = 0
        for (begin, end), name in entries:
            data = _tensor_bytes(tensors[name])
            if begin != pos or end - begin != data.nbytes:
                raise ValueError(f"{name}: offsets {begin}-{end} do not follow {pos} / {data.nbytes} bytes")
            h.update(data)
            pos = end
        if 8 + n + pos != path.stat().st_size:
            raise ValueError("header + data size differs from the file size")
        return h.hexdigest()
    except (KeyError, ValueError, TypeError, RuntimeError, OSError):
        return sha256_file(path)


def _files_under(folder: Path) -> list[str]:
    """Every regular file below ``folder`` as a sorted relative posix path, the manifest excluded."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                rel = p.relative_to(folder).as_posix()
                if rel != MANIFEST:
                    out.append(rel)
    return sorted(out)


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _hash_job(path: Path, tensors: dict[str, Any] | None = None) -> tuple[tuple[int, int], str]:
    """(size, mtime) seen before hashing, and the digest: a file that changes afterwards is re-hashed."""
    before = _stat_key(path)
    return before, sha256_file(path) if tensors is None else safetensors_sha256(path, tensors)


class ManifestBuilder:
    """Hash the files of ``folder`` on a thread pool, then write ``folder/manifest.json``.

    ``add(path)`` hands over a finished file (or every file below a finished folder),
    ``add_safetensors(path, tensors)`` a weights file together with the tensors it was written
    from (hashed from memory). :meth:`finish` hashes whatever was not handed over, re-hashes
    anything that changed after it was, and writes the manifest atomically. Use as a context
    manager (or call :meth:`close`) so the pool is shut down when a save fails.

    ``overlap``: start hashing handed-over files at once, while the caller writes on (default:
    when there are at least 4 hashing threads, i.e. spare cores). On 2 cores hashing next to the
    writes slowed them more than it saved, so there handed-over files wait for :meth:`finish`
    (still from memory). :meth:`finish` submits the largest files first: a single big file's
    hash is the critical path.
    """

    def __init__(self, folder: Path, workers: int | None = None, overlap: bool | None = None) -> None:
        self.folder = Path(folder)
        self.workers = workers or default_workers()
        self.overlap = self.workers >= 4 if overlap is None else overlap
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}
        self._pending: dict[str, dict[str, Any] | None] = {}  # handed over, not yet submitted: rel -> tensors

    def _submit(self, rel: str, tensors: dict[str, Any] | None = None) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="manifest-hash")
        self._jobs[rel] = self._pool.submit(_hash_job, self.folder / rel, tensors)

    def _hand_over(self, rel: str, tensors: dict[str, Any] | None = None) -> None:
        if rel == MANIFEST or rel in self._jobs or (rel in self._pending and tensors is None):
            return
        if self.overlap:
            self._submit(rel, tensors)
        else:
            self._pending[rel] = tensors

    def add_safetensors(self, path: str | os.PathLike, tensors: dict[str, Any]) -> None:
        """``path`` was just written from ``tensors`` (CPU): hash it from memory (see ``overlap``).

        The tensors must stay unchanged until :meth:`finish` (the builder holds a reference).
        """
        path = Path(path)
        if not path.is_absolute():
            path = self.folder / path
        self._hand_over(path.relative_to(self.folder).as_posix(), tensors)

    def add(self, path: str | os.PathLike) -> None:
        """``path`` (inside the folder; a file or a folder) is complete and will not change again."""
        path = Path(path)
        if not path.is_absolute():
            path = self.folder / path
        if path.is_dir():
            rels = [f"{path.relative_to(self.folder).as_posix()}/{r}" for r in _files_under(path)]
        elif path.is_file():
            rels = [path.relative_to(self.folder).as_posix()]
        else:
            rels = []
        for rel in rels:
            self._hand_over(rel)

    def finish(self) -> dict[str, Any]:
        present = _files_under(self.folder)
        todo = [rel for rel in present if rel not in self._jobs]
        todo.sort(key=lambda rel: (self.folder / rel).stat().st_size, reverse=True)
        for rel in todo:
            self._submit(rel, self._pending.get(rel))
        self._pending.clear()
        files: dict[str, dict[str, Any]] = {}
        for rel in present:
            seen, digest = self._jobs[rel].result()
            now = _stat_key(self.folder / rel)
            if now != seen:  # written to after it was handed over: hash what is there now
                seen, digest = _hash_job(self.folder / rel)
            files[rel] = {"size": seen[0], "sha256": digest}
        manifest = {
            "format": MANIFEST_FORMAT,
            "algorithm": "sha256",
            "total_bytes": sum(e["size"] for e in files.values()),
            "files": files,
        }
        write_json_atomic(self.folder / MANIFEST, manifest, indent=1)
        return manifest

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ManifestBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(folder: Path, workers: int | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write its ``manifest.json`` (returns the manifest)."""
    with ManifestBuilder(folder, workers) as builder:
        return builder.finish()


def add_to_manifest(folder: Path, subpath: str, workers: int | None = None) -> dict[str, Any] | None:
    """List the files below ``folder/subpath`` (added after the manifest was written) in it too.

    A folder without a manifest is left without one (None): it was written before manifests.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    sub = Path(folder) / subpath
    rels = [f"{Path(subpath).as_posix()}/{r}" for r in _files_under(sub)] if sub.is_dir() else [subpath]
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        digests = dict(zip(rels, pool.map(lambda r: _hash_job(Path(folder) / r), rels)))
    for rel, ((size, _), digest) in digests.items():
        manifest["files"][rel] = {"size": size, "sha256": digest}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["total_bytes"] = sum(e["size"] for e in manifest["files"].values())
    write_json_atomic(Path(folder) / MANIFEST, manifest, indent=1)
    return manifest


class ManifestError(ValueError):
    """``manifest.json`` exists but cannot be read as a manifest."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, None when it has none; :class:`ManifestError` when it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("'files' is not a mapping of path -> {size, sha256}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{MANIFEST}: unreadable ({err})") from None
    return manifest


@dataclass
class FolderCheck:
    """The result of checking a folder against its manifest."""

    folder: Path
    has_manifest: bool
    problems: list[str] = field(default_factory=list)  # "ema/x.safetensors: missing", ...
    files: int = 0  # files checked
    bytes: int = 0  # bytes hashed or measured

    @property
    def ok(self) -> bool:
        return not self.problems


def _selected(files: dict[str, Any], only: list[str] | None) -> tuple[list[str], list[str]]:
    """The manifest entries ``only`` asks for (a file, or a folder meaning everything below it),
    and the names it asks for that the manifest does not list."""
    if only is None:
        return sorted(files), []
    chosen, unlisted = [], []
    for name in only:
        name = name.strip("/")
        hits = [rel for rel in files if rel == name or rel.startswith(name + "/")]
        if hits:
            chosen.extend(hits)
        else:
            unlisted.append(name)
    return sorted(set(chosen)), unlisted


def check_folder(folder: Path, only: list[str] | None = None, workers: int | None = None) -> FolderCheck:
    """Check the files the manifest lists (or the ``only`` ones) for presence, size and SHA-256.

    Without a manifest the result has ``has_manifest=False`` and no problems: whether that is
    acceptable is the caller's decision (see :func:`common.checkpoint.verify_tag`).
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ManifestError as err:
        return FolderCheck(folder, True, [str(err)])
    if manifest is None:
        return FolderCheck(folder, False)
    files = manifest["files"]
    chosen, unlisted = _selected(files, only)
    result = FolderCheck(folder, True, [f"{name}: not listed in {MANIFEST}" for name in unlisted])
    to_hash = []
    for rel in chosen:
        path, want = folder / rel, files[rel]
        if not path.is_file():
            result.problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            result.problems.append(f"{rel}: {size} bytes, the manifest says {want['size']} (truncated or rewritten)")
            continue
        to_hash.append(rel)
    if to_hash:
        with ThreadPoolExecutor(min(workers or default_workers(), len(to_hash))) as pool:
            digests = dict(zip(to_hash, pool.map(lambda r: sha256_file(folder / r), to_hash)))
        for rel in to_hash:
            if digests[rel] != files[rel]["sha256"]:
                result.problems.append(f"{rel}: SHA-256 differs from the manifest (the file is damaged)")
    result.files = len(chosen)
    result.bytes = sum(files[rel]["size"] for rel in chosen)
    result.problems.sort()
    return result


__all__ = [
    "MANIFEST",
    "FolderCheck",
    "ManifestBuilder",
    "ManifestError",
    "add_to_manifest",
    "check_folder",
    "default_workers",
    "read_manifest",
    "sha256_file",
    "write_manifest",
]
