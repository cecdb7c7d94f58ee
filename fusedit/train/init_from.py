"""``trainer.init_from``: start a new run from another run's weights (the 512 px stage).

A continuation stage (500k steps at 256 px, then 200k at 512 px) is a *new* run: fresh optimizer,
LR schedule, step 0 and data stream, but its DiT and its EMA start from the parent's weights.
This is not ``trainer.resume_from`` (which continues one run with its optimizer and stream), and
when the new run already has a checkpoint of its own, resuming it wins (the trainer asks
:func:`resolve_parent` only when there is nothing to resume).

Only the parent's safetensors folder is read: ``<run>/<tag>/ema/`` (``weights: ema``) or
``<run>/<tag>/model/`` (``raw``), diffusers ``save_pretrained`` layout. Everything is checked
before any process group or engine: the run folder, the tag, the weights folder, and the parent's
architecture (its ``config.json``) against the new config's ``model``. Fields that do not change a
weight or a computation may differ (``initializer_range``; ``sample_size`` / ``pos_embed_max_size``
under RoPE, where no table depends on them). Under the APE they set the fixed sin-cos table
(coordinates ``k * (sample_size / patch) / pos_embed_max_size``), so they must match: a larger
resolution then adds the centred crop of the *same* table that the reference formulation uses
(16 x 16 of 64 x 64 at 256 px, 32 x 32 at 512 px). The table itself is never loaded: it is a
function of the config and the model computes its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import checkpoint as ckpt
from common.config import ConfigError
from common.vae_config import VaeSpec

log = logging.getLogger("fusedit.train")

RECORD_NAME = "init_from.json"

# DiT keyword -> the config field that sets it (the rest are model.<same name>).
_FIELD = {"num_layers": "model.num_hidden_layers", "attention_bias": "the DiT's attention_bias"}
# May differ from the parent: they change no weight and no computation of the loaded model.
_ALWAYS_FREE = {"initializer_range"}
_FREE_WITHOUT_APE = {"sample_size", "pos_embed_max_size"}


@dataclass(frozen=True)
class Parent:
    """A resolved ``trainer.init_from``: which weights the new run starts from."""

    run_dir: Path
    step: int
    weights: str  # "ema" | "raw"
    requested_tag: str

    @property
    def folder(self) -> Path:
        return ckpt.step_dir(self.run_dir, self.step) / ("ema" if self.weights == "ema" else "model")

    def record(self) -> dict[str, Any]:
        """What the new run stores to stay traceable (``init_from.json``, every ``trainer_state.json``)."""
        out: dict[str, Any] = {
            "checkpoint": str(self.run_dir.resolve()),
            "tag": self.step,
            "requested_tag": self.requested_tag,
            "weights": self.weights,
            "folder": str(self.folder.resolve()),
        }
        state = ckpt.step_dir(self.run_dir, self.step) / ckpt.TRAINER_STATE
        if state.is_file():
            out["parent_samples_seen"] = json.loads(state.read_text()).get("samples_seen")
        config = self.run_dir / "config.yaml"
        if config.is_file():
            import yaml

            out["parent_run"] = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("run")
        return out


def _field(name: str) -> str:
    return _FIELD.get(name, f"model.{name}")


def _free(name: str, pos_embed: str) -> bool:
    return name in _ALWAYS_FREE or (pos_embed != "ape" and name in _FREE_WITHOUT_APE)


def check_architecture(new: dict[str, Any], parent: dict[str, Any], where: Path, source: str = "") -> None:
    """Every DiT keyword in ``new`` must equal the parent's ``config.json`` (except the free ones).

    Raises one :class:`ConfigError` listing each differing field by its config name.
    """
    pos_embed = new.get("pos_embed", parent.get("pos_embed"))
    errors = []
    for name in sorted(k for k in new if not k.startswith("_")):
        if name not in parent or _free(name, pos_embed):
            continue
        ours, theirs = new[name], parent[name]
        if ours == theirs or (isinstance(ours, float) and isinstance(theirs, float) and abs(ours - theirs) < 1e-12):
            continue
        hint = ""
        if pos_embed == "ape" and name in ("sample_size", "pos_embed_max_size"):
            hint = (
                " (under pos_embed=ape it fixes the sin-cos table's coordinates, which the parent learned; keep "
                "the parent's value: a larger data.resolution / sample.height uses a larger centred crop of the "
                "same table)"
            )
        errors.append(f"{_field(name)}{source}: {ours!r}, but the parent {where} has {theirs!r}{hint}")
    if errors:
        raise ConfigError("trainer.init_from: architecture differs from the parent's:\n  " + "\n  ".join(errors))


def _parent_step(run_dir: Path, tag: str) -> int:
    try:
        return int(ckpt.checkpoint_folder(run_dir, tag).name)
    except ckpt.CheckpointNotFound as err:
        found = ckpt.list_steps(run_dir) if run_dir.is_dir() else []
        message = f"trainer.init_from.tag: {tag}: {err.reason} (checkpoints found: {found or 'none'})"
        raise ConfigError(message) from None


def will_resume(run_dir: Path, resume_from: str | None) -> bool:
    """Whether ``trainer.resume_from`` will pick a checkpoint of this run (then init_from is ignored).

    Decided from names only, without verifying the tag (``common.checkpoint.resolve_resume`` does
    that once, later): ``latest`` resumes as soon as the run has a ``latest`` file or a step folder
    (resolve_resume then returns a step or refuses to start); a step number always names one.
    """
    if resume_from is None or not Path(run_dir).is_dir():
        return False
    if resume_from == "latest":
        return (Path(run_dir) / "latest").is_file() or bool(ckpt.list_steps(run_dir))
    return True


def resolve_parent(cfg) -> Parent | None:
    """Check ``trainer.init_from`` against the file system; None when unset or when this run resumes.

    Cheap (reads two small JSON files), so the trainer calls it before any process group. The
    architecture is compared on what the config states; ``model.in_channels`` / ``text_hidden_size``
    left null are compared once the VAE and text encoder are loaded (:func:`load_parent_weights`).
    """
    spec = cfg.trainer.init_from
    if spec is None:
        return None
    run_dir = Path(cfg.trainer.checkpoint_dir)
    if will_resume(run_dir, cfg.trainer.resume_from):
        log.info("trainer.init_from: ignored, %s has a checkpoint to resume (trainer.resume_from wins)", run_dir)
        return None
    parent_dir = Path(spec.checkpoint).expanduser()
    if not parent_dir.is_dir():
        raise ConfigError(f"trainer.init_from.checkpoint: no run directory {parent_dir}")
    if run_dir.exists() and parent_dir.resolve() == run_dir.resolve():
        raise ConfigError(
            "trainer.init_from.checkpoint: is this run's own trainer.checkpoint_dir; "
            "use trainer.resume_from to continue a run"
        )
    parent = Parent(parent_dir, _parent_step(parent_dir, str(spec.tag)), spec.weights, str(spec.tag))
    weights_file, config_file = parent.folder / ckpt.WEIGHTS_NAME, parent.folder / "config.json"
    for f in (weights_file, config_file):
        if not f.is_file():
            raise ConfigError(f"trainer.init_from.weights: {spec.weights!r}: {f} is missing")
    try:  # a truncated or bit-rotted parent is found here, not as a wrong start
        ckpt.verify_files(parent.folder.parent, [parent.folder.name])
    except ckpt.CheckpointDamaged as err:
        raise ConfigError(f"trainer.init_from.checkpoint: {err}") from err
    arch = json.loads(config_file.read_text())
    stated = cfg.dit_kwargs(arch.get("in_channels", 0), arch.get("text_hidden_size", 0))
    check_architecture(stated, arch, parent.folder)
    _compare_vae(cfg, parent)
    return parent


def _compare_vae(cfg, parent: Parent) -> None:
    """A continuation normally keeps its VAE; a different spec is only warned about (paths move)."""
    saved = ckpt.step_dir(parent.run_dir, parent.step) / "vae.json"
    if not saved.is_file():
        return
    theirs, ours = json.loads(saved.read_text()), VaeSpec.from_config(cfg.vae).__dict__
    if theirs != ours:
        log.warning("trainer.init_from: the parent was trained with VAE %s, this run uses %s", theirs, ours)


@torch.no_grad()
def load_parent_weights(parent: Parent, dit: torch.nn.Module, model_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Copy the parent's weights into ``dit``'s parameters; return them (fp32, by name) for the EMA.

    ``model_config`` is the built DiT's config (VAE channels and text width now known); it must match
    the parent's too. Persistent buffers (the APE table) are not loaded: the model computes its own
    from its config; a parent table that differs from it is reported.
    """
    arch = json.loads((parent.folder / "config.json").read_text())
    check_architecture(model_config, arch, parent.folder, source=" (as built from the VAE / text encoder)")
    state = ckpt.load_weights(parent.folder)
    params = dict(dit.named_parameters())
    buffers = {n: b for n, b in dit.named_buffers() if n in dit.state_dict()}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params) - set(buffers))
    wrong = sorted(n for n in params if n in state and tuple(state[n].shape) != tuple(params[n].shape))
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"{parent.folder}: weights do not fit the DiT: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(n, tuple(state[n].shape), tuple(params[n].shape)) for n in wrong[:5]]}"
        )
    for name, param in params.items():
        param.copy_(state[name].to(param.device, param.dtype))
    for name, buf in buffers.items():
        if name in state and (state[name].shape != buf.shape or not torch.allclose(state[name], buf.float().cpu())):
            log.warning("trainer.init_from: %s of the parent differs from this model's; the model's own is used", name)
    log.info("trainer.init_from: DiT and EMA start from %s (step %d, %s)", parent.folder, parent.step, parent.weights)
    return {name: state[name].float() for name in params}


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The parent a run was started from (its ``init_from.json``), or None."""
    f = Path(run_dir) / RECORD_NAME
    return json.loads(f.read_text()) if f.is_file() else None
