"""Checkpoint layout and atomic publishing.

A run directory looks like::

    <checkpoint_dir>/
      config.yaml                  resolved training config (written once, by rank 0)
      latest                       text: the newest complete step tag, e.g. "1000"
      1000/
        manifest.json              every other file of the tag: relative path, size, SHA-256
                                   (common.manifest; written last, before the tag is published)
        latest                     text "deepspeed": DeepSpeed's own pointer, so zero_to_fp32.py
                                   reads <step>/ with its defaults (text-to-image stage)
        deepspeed/                 DeepSpeed engine state (module, ZeRO optimizer shards, LR scheduler)
        deepspeed_universal/       only after a resume at another world size: the same state in
                                   DeepSpeed's world-size-free "universal" form (ensure_universal;
                                   added to the manifest when it is made)
        ema/                       EMA weights, save_pretrained layout (config.json + safetensors)
        model/                     raw weights, same layout (for --no-ema_weights)
        vae.json                   the VAE spec used in training (travels with the weights)
        trainer_state.json         step, samples seen, world size, seed
        data_state_rank{r}.json    per-rank stream position (resume without replaying data)

Every rank writes into ``.<step>.partial/``; after a barrier rank 0 renames it to ``<step>/``
and only then rewrites ``latest`` (temp file + ``os.replace``). A kill at any moment therefore
leaves either the previous complete checkpoint or the new one as ``latest``, never a tag whose
files are missing (reference defect T2I-D11, docs/reference-facts.md). Evaluation reads only the safetensors
folders, so no pickle from a checkpoint is ever loaded outside the trainer's own resume.

Verified checkpoints. Before publishing, rank 0 hashes every file of the partial folder into
``manifest.json`` (a thread pool; weights handed over with their tensors,
``save_weights_folder(..., manifest=writer.manifest_builder)``, are hashed from memory; with spare
cores, files handed over early, :meth:`CheckpointWriter.hash_soon`, are hashed while the rest is
written). Resume (:func:`resolve_resume`) checks every file of the tag it would load: a damaged tag
(missing file, wrong size, wrong SHA-256, unreadable or missing manifest) is skipped with a warning
naming the file, and resume falls back to the newest older tag that verifies; so does a ``latest``
naming a missing tag. An explicit ``resume_from=<step>`` that fails is a
:class:`~common.config.ConfigError`. Loaders of weights check just the files they read
(:func:`verify_files`); ``python -m common.verify RUN_DIR`` checks a whole run.

Tags written before manifests existed have none. They are accepted, with a warning that they were
not verified, unless an *older* tag of the same run has a manifest: a run writes manifests from
the version that introduced them on, so a later tag without one has lost it and counts as damaged.

A save that fails on any rank (e.g. ``ENOSPC``, disk full) raises :class:`CheckpointSaveError`
on every rank, naming the step and the reason; the partial folder is removed, never published,
and ``latest`` still names the previous tag.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.config import ConfigError
from common.files import write_json_atomic, write_text_atomic
from common.manifest import MANIFEST, FolderCheck, ManifestBuilder, check_folder
from common.ownership import FolderOwnership, watch_launcher

log = logging.getLogger("common.checkpoint")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def partial_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".{step}.partial"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / str(step)


def save_weights_folder(
    model_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    folder: Path,
    manifest: ManifestBuilder | None = None,
) -> None:
    """Write ``state`` in diffusers ``save_pretrained`` layout without building a second model.

    ``manifest`` (a save's :attr:`CheckpointWriter.manifest_builder`): hash the weights file from
    memory in the background while the caller writes on.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if manifest is not None:
        manifest.add_safetensors(folder / WEIGHTS_NAME, tensors)
    (folder / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / WEIGHTS_NAME))


def publish(run_dir: Path, step: int) -> Path:
    """Rename the finished partial folder to its tag and point ``latest`` at it (rank 0 only)."""
    src, dst = partial_dir(run_dir, step), step_dir(run_dir, step)
    if dst.exists():  # re-saving a step (e.g. after resuming at it): keep the old one until the swap
        old = run_dir / f".{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(run_dir)
    write_text_atomic(run_dir / "latest", f"{step}\n")
    return dst


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in Path(run_dir).iterdir() if p.is_dir() and p.name.isdigit())


def prune(run_dir: Path, keep: int | None) -> list[int]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never the one ``latest`` names)."""
    if not keep:
        return []
    latest = read_latest(run_dir)
    steps = [s for s in list_steps(run_dir) if s != latest]
    doomed = steps[: max(0, len(steps) - (keep - 1))]
    for s in doomed:
        # Rename first (atomic), delete second: a kill mid-delete leaves a dot-folder that no step
        # listing counts and the next save cleans up, never a half-deleted "<step>/" that looks
        # like a checkpoint to list_steps, the studies' scorers or resume_from=<step>.
        trash = run_dir / f".{s}.pruned"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(step_dir(run_dir, s), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def clean_partials(run_dir: Path) -> None:
    """Remove leftovers of a save, re-save or prune that was killed half-way (never checkpoints)."""
    for pattern in (".*.partial", ".*.old", ".*.pruned"):
        for p in Path(run_dir).glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def read_latest(run_dir: Path) -> int | None:
    f = Path(run_dir) / "latest"
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit() or not step_dir(run_dir, int(text)).is_dir():
        raise RuntimeError(f"{f}: names tag {text!r}, which is not a complete checkpoint folder")
    return int(text)


class CheckpointNotFound(ConfigError, FileNotFoundError):
    """A run folder, its ``latest`` or a tag that does not exist: a user error (one line, exit 2).

    ``reason`` is the message without the location, for callers that name the place their own way.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def checkpoint_folder(run_dir: Path, tag: str | int = "latest", needs: str | None = None, flag: str = "") -> Path:
    """The folder of one complete checkpoint of a run: the one reader every loader goes through.

    ``tag`` is ``latest`` or a step number; ``needs`` is a file or folder the caller's kind of
    checkpoint must contain (``sit_config.json`` for REPA-E, ``ema`` for the T2I stage), so a run of
    the other stage, or half a folder, is named as such rather than failing later on a missing
    file. ``flag`` (e.g. ``--checkpoint``) prefixes the message with what the user typed. Raises
    :class:`CheckpointNotFound`. Contents are checked against the manifest by the loaders
    (:func:`verify_files`), which know which files they read.
    """
    run_dir = Path(run_dir)
    where = f"{flag} {run_dir}" if flag else str(run_dir)
    if not run_dir.is_dir():
        raise CheckpointNotFound(where, "no such run folder")
    if str(tag) == "latest":
        try:
            step = read_latest(run_dir)
        except RuntimeError as err:
            raise CheckpointNotFound(str(run_dir / "latest"), str(err).split(": ", 1)[-1]) from None
        if step is None:
            raise CheckpointNotFound(where, "no 'latest' file, so no complete checkpoint")
    elif str(tag).isdigit():
        step = int(tag)
    else:
        raise CheckpointNotFound(where, f"tag {tag!r}: expected 'latest' or a step number")
    folder = step_dir(run_dir, step)
    if not folder.is_dir():
        raise CheckpointNotFound(where, f"no checkpoint folder {folder}")
    if needs is not None and not (folder / needs).exists():
        raise CheckpointNotFound(str(folder), f"not a checkpoint of this kind (no {needs}): a run of the other stage?")
    return folder


class CheckpointDamaged(RuntimeError):
    """A checkpoint's files differ from its manifest; the message names the file(s)."""


def manifest_expected(step_folder: Path) -> bool:
    """Should this tag have a manifest? Yes when an older tag of the same run has one (see above)."""
    step_folder = Path(step_folder)
    if not step_folder.name.isdigit() or not step_folder.parent.is_dir():
        return False
    step = int(step_folder.name)
    return any(
        (step_dir(step_folder.parent, s) / MANIFEST).is_file() for s in list_steps(step_folder.parent) if s < step
    )


def verify_tag(step_folder: Path, only: list[str] | None = None, workers: int | None = None) -> FolderCheck:
    """Check a tag against its manifest: every file, or the ``only`` ones (files or folders).

    ``has_manifest=False`` with no problems: a tag written before manifests (accept it, warn). A
    missing manifest where an older tag has one is a problem (``manifest.json: missing``).
    """
    result = check_folder(step_folder, only, workers)
    if not result.has_manifest and manifest_expected(step_folder):
        result.problems.append(f"{MANIFEST}: missing (older tags of this run have one)")
    return result


def describe_problems(result: FolderCheck, limit: int = 3) -> str:
    shown = "; ".join(result.problems[:limit])
    more = len(result.problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


_warned_unverified: set[str] = set()


def warn_unverified(step_folder: Path) -> None:
    """One warning per tag and process: no manifest, written before manifests, not verified."""
    key = str(Path(step_folder).resolve())
    if key not in _warned_unverified:
        _warned_unverified.add(key)
        log.warning("%s has no %s (written before manifests): its files are not verified", step_folder, MANIFEST)


def verify_files(step_folder: Path, names: list[str], workers: int | None = None) -> FolderCheck:
    """Check the files a loader is about to read (``names``: files or folders of the tag).

    Raises :class:`CheckpointDamaged` naming the bad file(s); a tag written before manifests
    passes with a warning.
    """
    result = verify_tag(step_folder, only=list(names), workers=workers)
    if not result.ok:
        raise CheckpointDamaged(
            f"checkpoint {step_folder} is damaged: {describe_problems(result)} "
            f"(python -m common.verify {Path(step_folder).parent} lists every bad file)"
        )
    if not result.has_manifest:
        warn_unverified(step_folder)
    return result


def _fall_back(run_dir: Path, candidates: list[int], why: str, verify: bool = True) -> int:
    """The first of ``candidates`` (newest first) that verifies; warn about every one skipped."""
    for i, step in enumerate(candidates):
        folder = step_dir(run_dir, step)
        if not verify:
            return step
        result = verify_tag(folder)
        if result.ok:
            if not result.has_manifest:
                warn_unverified(folder)
            if i > 0 or why:
                log.warning("resuming from %s, the newest checkpoint that verifies", folder)
            return step
        log.warning("checkpoint %s is damaged, skipped: %s", folder, describe_problems(result))
    raise ConfigError(
        f"trainer.resume_from=latest: no checkpoint in {run_dir} verifies"
        + (f" ({why})" if why else "")
        + f"; python -m common.verify {run_dir} lists the damage, trainer.resume_from=null starts over"
    )


def resolve_resume(run_dir: Path, resume_from: str | None, verify: bool = True) -> int | None:
    """Which step to resume from: ``latest`` (None when the run is new), a number, or None.

    Every file of the chosen tag is checked against its manifest. ``latest``: a damaged tag, or a
    ``latest`` naming a missing tag, falls back (with a warning) to the newest older tag that
    verifies; a :class:`ConfigError` when none does. ``<step>``: a missing or damaged tag is a
    :class:`ConfigError` naming the file. ``verify=False``: the same choice by folder existence
    only, no hashing and no warnings (a quick "is there anything to resume?").
    """
    run_dir = Path(run_dir)
    if resume_from is None or not run_dir.is_dir():
        return None
    if resume_from == "latest":
        latest = run_dir / "latest"
        steps = list_steps(run_dir)[::-1]
        if not latest.is_file():
            if not steps:
                return None  # a new run
            if verify:
                log.warning(
                    "%s is missing but the run has checkpoints: falling back to the newest that verifies", latest
                )
            return _fall_back(run_dir, steps, f"{latest} is missing", verify)
        text = latest.read_text().strip()
        named = int(text) if text.isdigit() else None
        if named is not None and step_dir(run_dir, named).is_dir():
            return _fall_back(run_dir, [named] + [s for s in steps if s < named], "", verify)
        if verify:
            log.warning("%s names tag %r, which is not a checkpoint folder: falling back to an older tag", latest, text)
        older = [s for s in steps if named is None or s < named]
        return _fall_back(run_dir, older, f"latest names a missing tag {text!r}", verify)
    step = int(resume_from)
    folder = step_dir(run_dir, step)
    if not folder.is_dir():
        raise ConfigError(f"trainer.resume_from={step}: no checkpoint folder {folder}")
    if not verify:
        return step
    result = verify_tag(folder)
    if not result.ok:
        raise ConfigError(f"trainer.resume_from={step}: checkpoint {folder} is damaged: {describe_problems(result)}")
    if not result.has_manifest:
        warn_unverified(folder)
    return step


# --------------------------------------------------------------------------------------------
# The save / publish / prune / resume sequence, for every trainer
# --------------------------------------------------------------------------------------------
def data_state_name(rank: int) -> str:
    return f"data_state_rank{rank}.json"


TRAINER_STATE = "trainer_state.json"


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (on some rank); nothing was published, ``latest`` is unchanged."""


def _reason(err: BaseException) -> str:
    """One line: what failed and why, with the errno and 'disk full' when that is the cause.

    safetensors reports I/O errors as ``SafetensorError('... (os error 28) ...')``, not OSError:
    the errno is read from the message then.
    """
    full = (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        text = f"{name}: {err.strerror or err}"
        if err.filename:
            text += f": {err.filename}"
        return text + (" (disk full or over quota)" if err.errno in full else "")
    first = str(err).splitlines()[0] if str(err) else ""
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    found = re.search(r"os error (\d+)", first)
    if found and int(found.group(1)) in full:
        text = f"{errno.errorcode[int(found.group(1))]}: {text} (disk full or over quota)"
    return text


class CheckpointWriter:
    """Owns a run directory's checkpoints: the one save sequence both stages' trainers use.

    :meth:`save` is collective (every rank calls it at the same step):

    1. rank 0 removes leftovers of killed saves and creates ``.<step>.partial/``; barrier;
    2. every rank runs ``write_all(partial)`` (DeepSpeed's ``engine.save_checkpoint`` writes
       per-rank ZeRO shards) and writes its own data position, ``data_state_rank{r}.json``;
    3. rank 0 runs ``write_main(partial)`` (weights, configs) and writes ``trainer_state.json``;
       every rank reports success or its error (one all-gather, which is also the barrier);
    4. rank 0 hashes every file into ``manifest.json`` (thread pool; files handed over with
       :meth:`hash_soon` or ``manifest_builder`` during 2-3 are hashed first, or already); ranks agree;
    5. rank 0 publishes (rename to ``<step>/``, then ``latest``) and prunes to ``keep``; ranks agree.

    A kill at any point leaves ``latest`` naming a complete folder. An exception on any rank in
    1-5 (a full disk: ``OSError(ENOSPC)``) makes every rank raise :class:`CheckpointSaveError`
    with the step and the failing rank's reason; rank 0 removes the partial folder. Resuming
    reads the same names back (:meth:`resume_step` verifies the tag first, on rank 0, and
    shares the answer; :meth:`trainer_state`, :meth:`data_state`).

    ``manifest=False`` skips the manifest (measurements); ``hash_workers`` sizes the hashing
    pool (default: one thread per core, at most 16). ``barrier`` / ``gather`` replace the
    collectives (``gather(obj) -> list`` of every rank's obj) in tests.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        is_main: bool,
        keep: int | None,
        barrier: Any = None,
        gather: Any = None,
        manifest: bool = True,
        hash_workers: int | None = None,
    ) -> None:
        from common.distributed import barrier as default_barrier
        from common.distributed import gather_objects

        self.run_dir, self.rank, self.is_main, self.keep = Path(run_dir), rank, is_main, keep
        self.barrier = barrier or default_barrier
        self.gather = gather or gather_objects
        self.manifest, self.hash_workers = manifest, hash_workers
        self._builder: ManifestBuilder | None = None
        self.ownership: FolderOwnership | None = None

    def claim(self) -> None:
        """Collective: make this launch the run folder's one writer (common.ownership), before it reads or writes.

        Raises :class:`common.ownership.RunFolderBusy` on every rank when a live trainer holds the
        folder. The claim is let go at interpreter exit (after a crash too; after ``kill -9`` the
        next trainer finds the owner gone). Every rank also starts watching its launcher.
        """
        self.ownership = FolderOwnership(self.run_dir, self.is_main)
        self.ownership.acquire()
        atexit.register(self.ownership.release)
        watch_launcher()

    def folder(self, step: int) -> Path:
        return step_dir(self.run_dir, step)

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        data_state: dict[str, Any],
        write_main: Any,
        write_all: Any = None,
    ) -> Path:
        if self.ownership is not None:
            self.ownership.check()  # taken over while this trainer was thought dead: write nothing
        partial = partial_dir(self.run_dir, step)

        def prepare() -> None:
            if self.run_dir.is_dir():
                clean_partials(self.run_dir)
            partial.mkdir(parents=True)

        def write() -> None:
            if write_all is not None:
                write_all(partial)
            write_json_atomic(partial / data_state_name(self.rank), data_state)
            if self.is_main:
                write_main(partial)
                write_json_atomic(partial / TRAINER_STATE, trainer_state)

        self._agree(step, partial, self._attempt(prepare) if self.is_main else None, "creating the folder")
        if self.is_main and self.manifest:
            self._builder = ManifestBuilder(partial, self.hash_workers)
        try:
            self._agree(step, partial, self._attempt(write), "writing")
            if self.is_main and self._builder is not None:
                self._agree(step, partial, self._attempt(self._builder.finish), f"writing {MANIFEST}")
            else:
                self._agree(step, partial, None, f"writing {MANIFEST}")
        finally:
            if self._builder is not None:
                self._builder.close()
                self._builder = None
        self._agree(
            step, partial, self._attempt(lambda: publish(self.run_dir, step)) if self.is_main else None, "publishing"
        )
        if self.is_main:
            try:
                prune(self.run_dir, self.keep)
            except OSError as err:  # the new tag is published; an old one outlives its turn
                log.warning("step %d: pruning old checkpoints failed (%s); they stay", step, _reason(err))
        self.barrier()
        return self.folder(step)

    @property
    def manifest_builder(self) -> ManifestBuilder | None:
        """During a save on rank 0 (with manifests): the builder that ``save_weights_folder`` and
        friends hand finished files to; None otherwise."""
        return self._builder

    def hash_soon(self, path: Path) -> None:
        """Rank 0, during a save: ``path`` (a file or folder of the partial folder) is final. With
        spare cores it is hashed at once, while the rest is written (``ManifestBuilder.overlap``).
        A no-op on other ranks and without manifests."""
        if self._builder is not None:
            self._builder.add(path)

    @staticmethod
    def _attempt(fn: Any) -> BaseException | None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported to every rank, then raised there
            return err
        return None

    def _agree(self, step: int, partial: Path, error: BaseException | None, what: str) -> None:
        """Collective: raise :class:`CheckpointSaveError` on every rank if any rank failed."""
        reports = self.gather(None if error is None else _reason(error))
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if not failed:
            return
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # every rank is past its writes: never published
        rank, reason = failed[0]
        who = "" if len(reports) == 1 else f" on rank {rank}"
        if len(failed) > 1:
            who += f" (and {len(failed) - 1} more ranks)"
        try:
            last = read_latest(self.run_dir) if self.run_dir.is_dir() else None
        except RuntimeError:
            last = None
        kept = f"latest names step {last} ({step_dir(self.run_dir, last)})" if last is not None else "no checkpoint yet"
        done = "" if what == "publishing" else "nothing was published; "
        raise CheckpointSaveError(
            f"checkpoint save failed at step {step} while {what}{who}: {reason}; {done}{kept}"
        ) from error

    def resume_step(self, resume_from: str | None) -> int | None:
        """:func:`resolve_resume` on rank 0 (it hashes the tag), its answer (or error) on every rank."""
        from common.distributed import broadcast_object

        answer: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                answer = ("ok", resolve_resume(self.run_dir, resume_from))
            except ConfigError as err:
                answer = ("config", str(err))
            except Exception as err:  # noqa: BLE001 - the other ranks must not wait for rank 0 forever
                answer = ("error", _reason(err))
                broadcast_object(answer)
                raise
        answer = broadcast_object(answer)
        kind, value = answer
        if kind == "config":
            raise ConfigError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 could not choose the checkpoint to resume from: {value}")
        return value

    def trainer_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.folder(step) / TRAINER_STATE).read_text())

    def data_states(self, step: int) -> list[dict[str, Any]]:
        """Every rank's saved data position of ``step`` (the world size that wrote it), in rank order.

        A stream whose order does not depend on the world size (fusedit.data.webdata) merges them
        to continue at another world size; missing files give a shorter list.
        """
        saved = int(self.trainer_state(step).get("world_size") or 0)
        paths = [self.folder(step) / data_state_name(r) for r in range(saved)]
        return [json.loads(p.read_text()) for p in paths if p.is_file()]

    def data_state(self, step: int, rank: int = 0) -> dict[str, Any] | None:
        """Rank ``rank``'s saved data position (None when that file is missing).

        A stream whose position is global, the same on every rank (repae.data), reads rank 0's
        at any world size; per-rank positions are merged from :meth:`data_states` instead.
        """
        path = self.folder(step) / data_state_name(rank)
        return json.loads(path.read_text()) if path.is_file() else None
