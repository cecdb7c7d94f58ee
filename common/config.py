"""Config base shared by both stages: errors, structured merge, field checks, saving.

Each stage declares its schema as dataclasses and validates its own semantics; what every
stage does the same way lives here: a YAML file merged onto the schema (OmegaConf structured
configs), ``key=value`` overrides on top, every failure a :class:`ConfigError` that starts with
the field name, and the resolved config written atomically next to the run.

Both stages speak one vocabulary (``trainer``, ``optimizer``, ``data.data_path``, batch sizes
named by their scope). The spellings of the reference repositories and of this repository's
older configs keep working through one mechanism, :class:`Alias` tables handed to
:func:`merge_structured`: an old dotted key (or a whole old section, ``run.*``) is rewritten to
the schema's key in the YAML mapping and in every ``key=value`` override before the merge, with
one notice line per spelling used (:func:`config_notice`); keys that had no effect in the
reference are accepted and ignored (again with a notice), and giving two spellings of one
setting is a :class:`ConfigError` naming both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.files import write_text_atomic

log = logging.getLogger("common.config")


class ConfigError(ValueError):
    """A configuration problem, always phrased as ``field: what is wrong (what is allowed)``."""


def user_message(err: BaseException) -> str:
    """The one line to print for a user error, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole traceback
    in the message; its last line is ``module.ErrorClass: the original message``.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def format_omegaconf_error(err: OmegaConfBaseException) -> str:
    """Turn OmegaConf's multi-line messages into one line that starts with the field name."""
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Missing mandatory value" in msg:
        return f"{key}: required field is missing (set it in the YAML or as {key}=...)"
    if "not in" in msg and "Key" in msg:
        return f"{key}: unknown key ({msg})"
    return f"{key}: {msg}" if key else msg


def parse_override(item: str) -> DictConfig:
    """One ``key=value`` (the value is YAML: numbers, lists, quoted strings) -> a config layer."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.max_steps=100")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        hint = ' (quote list items holding braces: data.data_path=["a/{000..009}.tar"])'
        raise ConfigError(f"override {item!r}: value is not valid YAML: {str(err).splitlines()[0]}{hint}") from None


# ----------------------------------------------------------------------------------- aliases
@dataclass(frozen=True)
class Alias:
    """One accepted spelling that is not the schema's own (an entry of an alias table).

    Tables map an old dotted key to its :class:`Alias` (or simply to the new dotted key). A key
    ending in ``.*`` renames a whole section (``"run.*": "trainer.*"``); an exact entry for one of
    its fields (``"run.max_train_steps": "trainer.max_steps"``) wins over the section entry.

    ``new``: the schema's dotted key; None = accepted and ignored (no effect).
    ``note``: why / what it means, shown in parentheses in the notice (e.g. a batch's scope).
    ``value``: rewrites the value on the way (``run.output_dir: X`` -> ``X/${trainer.run}``).
    ``allowed``: for an ignored key, the only values accepted; any other value is a
    :class:`ConfigError` saying it is not supported, followed by ``unsupported`` (the reason).
    ``allowed=()`` rejects every value.
    """

    new: str | None
    note: str = ""
    value: Callable[[Any], Any] | None = None
    allowed: tuple[Any, ...] | None = None
    unsupported: str = ""


AliasTable = Mapping[str, Union[str, Alias]]


def config_notice(message: str) -> None:
    """One line about an accepted old spelling (a logging warning; printed by rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        log.warning("%s", message)


def _as_alias(entry: str | Alias) -> Alias:
    return entry if isinstance(entry, Alias) else Alias(entry)


def _match(aliases: AliasTable, path: tuple) -> tuple[str, Alias, int] | None:
    """The alias of the longest old key that ``path`` starts with: (old key, alias, its length)."""
    parts = [str(p) for p in path]
    for k in range(len(parts), 0, -1):
        dotted = ".".join(parts[:k])
        if dotted in aliases:
            return dotted, _as_alias(aliases[dotted]), k
        if k < len(parts) and f"{dotted}.*" in aliases:
            return f"{dotted}.*", _as_alias(aliases[f"{dotted}.*"]), k
    return None


def _flatten(tree: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """Leaves of a nested mapping as (key path, value); an empty mapping is a leaf."""
    if isinstance(tree, dict) and tree:
        out: list[tuple[tuple, Any]] = []
        for key, value in tree.items():
            out.extend(_flatten(value, (*prefix, key)))
        return out
    return [(prefix, tree)]


def _render(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def resolve_alias_key(dotted: str, aliases: AliasTable | None) -> str | None:
    """The schema key an (old or new) dotted key stands for; None when it is accepted and ignored."""
    found = _match(aliases or {}, tuple(dotted.split(".")))
    if found is None:
        return dotted
    old, alias, k = found
    if alias.new is None:
        return None
    rest = dotted.split(".")[k:]
    base = alias.new[:-2] if alias.new.endswith(".*") else alias.new
    return ".".join([base, *rest])


class _AliasedSource:
    """Rewrites the mappings of one source (the YAML file, or all overrides together) to schema keys.

    Remembers which spelling set each schema key, so two spellings of one setting in the same
    source are an error, while a later override of the same spelling simply wins.
    """

    def __init__(self, aliases: AliasTable, where: str, notices: list[str]) -> None:
        self.aliases, self.where, self.notices = aliases, where, notices
        self.origin: dict[tuple, str] = {}

    def _notice(self, message: str) -> None:
        if message not in self.notices:
            self.notices.append(message)

    def rewrite(self, tree: dict) -> dict:
        out: dict = {}
        for path, value in _flatten(tree):
            dotted = ".".join(str(p) for p in path)
            found = _match(self.aliases, path)
            if found is None:
                self._put(out, path, value, dotted, dotted)
                continue
            old, alias, k = found
            spelled = dotted if old.endswith(".*") else old  # what the user wrote (the notice's subject)
            if alias.new is None:
                self._ignore(spelled, alias, value)
                continue
            base = alias.new[:-2] if alias.new.endswith(".*") else alias.new
            new_path = (*base.split("."), *path[k:])
            new_dotted = ".".join(str(p) for p in new_path)
            if alias.value is not None:
                value = alias.value(value)
            extra = f"; = {_render(value)}" if alias.value is not None else ""
            note = f" ({alias.note}{extra})" if alias.note else (f" (= {_render(value)})" if extra else "")
            self._notice(f"config: {spelled!r} is accepted as {new_dotted!r}{note}")
            self._put(out, new_path, value, spelled, new_dotted)
        return out

    def _ignore(self, spelled: str, alias: Alias, value: Any) -> None:
        if alias.allowed is not None and value not in alias.allowed:
            allowed = " or ".join(_render(v) for v in alias.allowed)
            fix = f"remove it or set it to {allowed}" if alias.allowed else "remove it"
            reason = f" ({alias.unsupported})" if alias.unsupported else ""
            raise ConfigError(f"{spelled}: {_render(value)} is not supported{reason}; {fix} ({self.where})")
        note = f" ({alias.note})" if alias.note else ""
        self._notice(f"config: {spelled!r} is accepted and ignored{note}")

    def _put(self, out: dict, path: tuple, value: Any, spelled: str, new_dotted: str) -> None:
        other = self.origin.get(path)
        if other is not None and other != spelled:
            raise ConfigError(
                f"{new_dotted}: given twice, as {other!r} and as {spelled!r} ({self.where}); keep only one"
            )
        self.origin[path] = spelled
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(map(str, path[: i + 1]))}: is a value, not a section ({self.where})")
            node = child
        if path:
            node[path[-1]] = value


def apply_aliases(tree: Mapping, aliases: AliasTable, where: str = "config", notices: list[str] | None = None) -> dict:
    """A plain nested mapping with every aliased key rewritten to the schema's key.

    Ignored keys are dropped; notices (one per spelling) are appended to ``notices`` when given
    (and not printed: the caller decides). Raises :class:`ConfigError` for two spellings of one
    key or an unsupported value of an ignored key.
    """
    return _AliasedSource(aliases, where, notices if notices is not None else []).rewrite(dict(tree))


def _aliased(layer: DictConfig, source: _AliasedSource) -> DictConfig:
    tree = OmegaConf.to_container(layer, resolve=False)
    assert isinstance(tree, dict)
    return OmegaConf.create(source.rewrite(tree))


def merge_structured(
    schema_cls: type,
    path: str | Path | None,
    overrides: list[str] | None,
    *,
    aliases: AliasTable | None = None,
    notify: Callable[[str], None] | None = config_notice,
) -> Any:
    """Schema dataclass <- YAML file <- ``key=value`` overrides -> a dataclass instance.

    Shared by both stages' configs (``fusedit.config`` and ``repae.config``): every failure is a
    :class:`ConfigError` naming the field (unknown key, wrong type, missing required value).
    ``aliases`` (a stage's :class:`Alias` table) rewrites accepted old spellings in the YAML and in
    the overrides before the merge; each spelling used is reported once through ``notify``
    (default :func:`config_notice`; None = silent).
    """
    layers: list[DictConfig] = [OmegaConf.structured(schema_cls)]
    notices: list[str] = []
    try:
        if path is not None:
            layers.extend(file_layers(Path(path), aliases, notices))
        parsed = [parse_override(item) for item in overrides or []]
        if aliases:
            source = _AliasedSource(aliases, "overrides", notices)
            parsed = [_aliased(layer, source) for layer in parsed]
        layers.extend(parsed)
        for message in notices if notify is not None else ():
            notify(message)
        merged = OmegaConf.merge(*layers)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                "; ".join(f"{k}: required field is missing (set it in the YAML or as {k}=...)" for k in missing)
            )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(format_omegaconf_error(err)) from None
    assert isinstance(cfg, schema_cls)
    bad = non_finite_fields(cfg)
    if bad:
        raise ConfigError("; ".join(f"{name}: must be a finite number, got {value}" for name, value in bad))
    return cfg


EXTENDS = "extends"


def file_layers(
    path: Path, aliases: AliasTable | None = None, notices: list[str] | None = None, chain: tuple[Path, ...] = ()
) -> list[DictConfig]:
    """A config file and the files it ``extends``, as layers to merge in order (bases first).

    ``extends: base.yaml`` (or a list of files, merged left to right) at the top level of a file
    starts it from those files, paths relative to the file itself; the file's own keys win. So a
    family of configs is one base plus short overlays (the 3B study's per-VAE files), and what a
    run records is still the one resolved config. Aliases are applied per file, so a base written
    in an old spelling and an overlay in the new one cannot both set a key unnoticed.
    """
    where = f"{chain[-1]}: {EXTENDS} " if chain else "config file "
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{EXTENDS}: the files extend each other in a circle ({cycle})")
    if not path.is_file():
        raise ConfigError(f"{where}not found: {path}")
    loaded = load_yaml_file(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parents = loaded.pop(EXTENDS, None)
    if isinstance(parents, str):
        parents = [parents]
    elif parents is not None and not (
        isinstance(parents, ListConfig) and all(isinstance(item, str) for item in parents)
    ):
        raise ConfigError(f"{path}: {EXTENDS}: expected a file name or a list of file names, got {parents!r}")
    layers: list[DictConfig] = []
    for parent in parents or ():
        layers.extend(file_layers(path.parent / parent, aliases, notices, (*chain, path.resolve())))
    if aliases:
        loaded = _aliased(loaded, _AliasedSource(aliases, str(path), notices if notices is not None else []))
    return [*layers, loaded]


def load_yaml_file(path: Path) -> Any:
    """A YAML file as an OmegaConf node; a file that is not YAML is a :class:`ConfigError` naming the spot."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None


def non_finite_fields(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every NaN or infinite float in a config dataclass, lists included.

    YAML spells them ``.nan`` / ``.inf``, and the range checks (``value <= 0``) let a NaN through;
    found here, once for every field of both stages, a NaN never reaches an optimizer or a scheduler.
    """
    found: list[tuple[str, float]] = []

    def visit(value: Any, name: str) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name), f"{name}.{f.name}" if name else f.name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{name}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append((name, value))

    visit(cfg, prefix)
    return found


def raise_config_errors(errors: list[str]) -> None:
    """Every problem a validation found, as one :class:`ConfigError` line (``field: problem; field: ...``).

    One line, so an entry point prints a single ``error:`` line that starts with the first culprit.
    """
    if errors:
        raise ConfigError("; ".join(errors))


def check_choice(errors: list[str], name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        errors.append(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")


def check_positive(errors: list[str], name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_rate(errors: list[str], name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        errors.append(f"{name}: must be a probability in [0, 1], got {value!r}")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


# --------------------------------------------------------------------------------------------
# The `trainer` section: the fields both stages share, checked the same way
# --------------------------------------------------------------------------------------------
MIXED_PRECISION = ("no", "bf16", "fp16")
REPORTERS = ("tensorboard", "wandb")


@dataclass
class SharedTrainer:
    """The ``trainer`` fields both stages have, declared once (checked by :func:`check_trainer`).

    Each stage's section extends this class with its own fields. A stage that needs another
    default redeclares the field in its section with a comment saying why; these are the defaults
    of neither stage in particular.
    """

    # The run's name: its folder name, the progress bar's and the tracker's run name.
    run: str = "run"
    # The tracker's project (wandb).
    project: str = "e2e-vae"
    # The run directory: config.yaml, metrics.jsonl, checkpoints (<step>/, latest), samples/.
    checkpoint_dir: str = "output/${trainer.run}"
    max_steps: int = 500_000
    # Global L2-norm clipping of the gradients; 0 disables it.
    gradient_clipping: float = 1.0
    # "bf16" on GPUs; "no" (fp32) is what CPUs train in; "fp16" with a loss scaler.
    mixed_precision: str = "bf16"
    seed: int = 42
    logging_steps: int = 100
    checkpointing_steps: int = 50_000
    # Keep only the newest N checkpoints (null keeps every one).
    checkpoints_total_limit: Optional[int] = None
    # Preview sample grids every N steps (samples/<step:08d>.png); 0 disables them.
    sampling_steps: int = 50_000
    # "latest", a step number as a string, or null to always start fresh.
    resume_from: Optional[str] = "latest"
    # torch.compile the trained network (inductor).
    compile: bool = False
    # Trackers next to metrics.jsonl (always written): "tensorboard", "wandb".
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # A step whose loss or gradient norm is not finite is skipped on every rank (weights, optimizer
    # state and EMA untouched); this many skips in a row stop the run (exit code 3).
    max_nonfinite_steps: int = 20


@dataclass
class SharedSample:
    """The ``sample`` fields both stages have (preview grids during training, sampler defaults).

    Each stage's ``sample`` section extends this class; the defaults are each stage's reference
    recipe, so both redeclare them.
    """

    # ODE steps of the sampler.
    num_steps: int = 50
    # Classifier-free guidance scale; 1 disables guidance.
    cfg_scale: float = 4.0


def normalise_trainer(trainer: Any) -> None:
    """YAML reads a bare ``mixed_precision: no`` as the boolean false: give it back its name."""
    if str(trainer.mixed_precision) in ("False", "false"):
        trainer.mixed_precision = "no"


def check_trainer(errors: list[str], t: Any) -> None:
    """The shared ``trainer.*`` fields: precision, step counts, checkpoint retention, resume, reporters."""
    check_choice(errors, "trainer.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    for name in ("max_steps", "logging_steps", "checkpointing_steps"):
        check_positive(errors, f"trainer.{name}", getattr(t, name))
    check_positive(errors, "trainer.sampling_steps", t.sampling_steps, allow_zero=True)
    check_positive(errors, "trainer.gradient_clipping", t.gradient_clipping, allow_zero=True)
    check_positive(errors, "trainer.max_nonfinite_steps", t.max_nonfinite_steps)
    if t.checkpoints_total_limit is not None:
        check_positive(errors, "trainer.checkpoints_total_limit", t.checkpoints_total_limit)
    if t.resume_from not in (None, "latest") and not str(t.resume_from).isdigit():
        errors.append(f"trainer.resume_from: {t.resume_from!r} is not 'latest', a step number or null")
    for reporter in t.report_to:
        check_choice(errors, "trainer.report_to", reporter, REPORTERS)
