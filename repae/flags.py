"""The reference ``train_repae.py`` / ``train_ldm_only.py`` command line, translated to config keys.

    python -m repae.train --exp-name x --max-train-steps 400000 --batch-size 256 --vae f8d4 \\
        --vae-ckpt pretrained/sdvae/sdvae-f8d4.pt --enc-type dinov2-vit-b --proj-coeff 0.5 \\
        --encoder-depth 8 --no-compile data.data_path='["shards/imagenet-{000000..001281}.tar"]'

Every reference flag (docs/reference-facts.md, REPAE-5.4 and REPAE-6.1) that means one of our dotted keys becomes that
``key=value`` override, applied after the YAML like any other override (``-c`` is optional: the
schema defaults are the reference defaults, with the fixes listed in :mod:`repae.config`). Each
translated flag prints one notice line. Flags without a counterpart are a :class:`ConfigError`
naming the flag and what to use instead; the few that had no effect in the reference are accepted
and ignored, again with a notice. Flags are ``--x value`` or ``--x=value``; booleans ``--x`` /
``--no-x``. Giving a flag and the override it stands for is an error (two spellings of one key).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

from common.config import ConfigError, config_notice, resolve_alias_key
from repae.config import ALIASES


def _text(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: safe for any path


def _int(flag: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        try:
            return str(int(value))
        except ValueError:
            raise ConfigError(f"{flag}: expected an integer, got {value!r}") from None

    return convert


def _float(flag: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        try:
            return repr(float(value))
        except ValueError:
            raise ConfigError(f"{flag}: expected a number, got {value!r}") from None

    return convert


def _encoders(value: str) -> str:
    """``dinov2-vit-b,mocov3-vit-b`` (the reference's comma-separated list) -> a YAML list."""
    return json.dumps([v.strip() for v in value.split(",") if v.strip()])


def _reporters(value: str) -> str:
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(value.lower(), [value])
    return json.dumps(names)


def _under_run_name(value: str) -> str:
    return _text(f"{value.rstrip('/')}/${{trainer.run}}")


@dataclass(frozen=True)
class Flag:
    """One reference flag: the key it sets and how its value is written, or why it is refused.

    ``key`` None: not translated; ``allowed`` (values accepted and ignored, None = any) and
    ``instead`` (what to use, or why it is ignored) say what happens.
    """

    key: str | None
    convert: Callable[[str], str] | None = None
    boolean: bool = False
    allowed: tuple[str, ...] | None = ()
    instead: str = ""


def _value(key: str, convert: Callable[[str], str] = _text) -> Flag:
    return Flag(key, convert)


def _bool(key: str) -> Flag:
    return Flag(key, boolean=True)


def _refused(instead: str, allowed: tuple[str, ...] = ()) -> Flag:
    return Flag(None, allowed=allowed, instead=instead)


def _ignored(why: str) -> Flag:
    return Flag(None, allowed=None, instead=why)


# REPAE-5.4 (train_repae.py) and REPAE-6.1 (train_ldm_only.py, the same minus the VAE/discriminator flags).
FLAGS: dict[str, Flag] = {
    # run
    "--exp-name": _value("trainer.run"),
    "--output-dir": Flag("trainer.checkpoint_dir", _under_run_name),
    "--max-train-steps": _value("trainer.max_steps", _int("--max-train-steps")),
    "--checkpointing-steps": _value("trainer.checkpointing_steps", _int("--checkpointing-steps")),
    "--sampling-steps": _value("trainer.sampling_steps", _int("--sampling-steps")),
    "--seed": _value("trainer.seed", _int("--seed")),
    "--mixed-precision": _value("trainer.mixed_precision"),
    "--allow-tf32": _bool("trainer.allow_tf32"),
    "--compile": _bool("trainer.compile"),
    "--report-to": _value("trainer.report_to", _reporters),
    "--max-grad-norm": _value("trainer.gradient_clipping", _float("--max-grad-norm")),
    # optimisers
    "--learning-rate": _value("optimizer.sit_lr", _float("--learning-rate")),
    "--vae-learning-rate": _value("optimizer.vae_lr", _float("--vae-learning-rate")),
    "--disc-learning-rate": _value("optimizer.disc_lr", _float("--disc-learning-rate")),
    "--adam-beta1": _value("optimizer.betas", _float("--adam-beta1")),
    "--adam-beta2": _value("optimizer.betas", _float("--adam-beta2")),
    "--adam-weight-decay": _value("optimizer.weight_decay", _float("--adam-weight-decay")),
    "--adam-epsilon": _value("optimizer.eps", _float("--adam-epsilon")),
    # model
    "--model": _value("model.arch"),
    "--num-classes": _value("model.num_classes", _int("--num-classes")),
    "--encoder-depth": _value("model.encoder_depth", _int("--encoder-depth")),
    "--qk-norm": _bool("model.qk_norm"),
    "--fused-attn": _bool("model.fused_attn"),
    "--bn-momentum": _value("model.bn_momentum", _float("--bn-momentum")),
    "--cfg-prob": _value("model.class_dropout_prob", _float("--cfg-prob")),
    # REPA, transport, encoders
    "--enc-type": _value("encoder.types", _encoders),
    "--proj-coeff": _value("loss.proj_coeff", _float("--proj-coeff")),
    "--vae-align-proj-coeff": _value("loss.vae_align_proj_coeff", _float("--vae-align-proj-coeff")),
    "--path-type": _value("loss.path_type"),
    "--weighting": _value("loss.weighting"),
    # VAE and discriminator
    "--vae": _value("vae.pretrained_model_name_or_path"),
    "--vae-ckpt": _value("vae.checkpoint"),
    "--disc-pretrained-ckpt": _value("loss.discriminator_checkpoint"),
    # data
    "--batch-size": _value("data.global_batch_size", _int("--batch-size")),
    "--resolution": _value("data.resolution", _int("--resolution")),
    "--num-workers": _value("data.dataloader_num_workers", _int("--num-workers")),
    # accepted with their only reference value / without effect
    "--prediction": _refused("the SiT predicts the velocity v, the reference's only choice", allowed=("v",)),
    "--gradient-accumulation-steps": _refused(
        "one optimizer step per batch; raise data.global_batch_size (--batch-size) instead", allowed=("1",)
    ),
    "--logging-dir": _ignored("metrics and tensorboard events are written inside trainer.checkpoint_dir"),
    "--wandb-history-path": _ignored("unused by the reference"),
    # no counterpart
    "--data-dir": _refused(
        'our data are labelled webdataset shards: data.data_path=["DIR/imagenet-{000000..001281}.tar"] '
        "(python -m repae.preprocess writes them from an ImageNet folder)"
    ),
    "--loss-cfg-path": _refused(
        "the VAE losses are the loss.* keys of the config (defaults: the reference's l1_lpips_kl_gan.yaml)"
    ),
    "--epochs": _refused("training stops at trainer.max_steps (--max-train-steps)"),
    "--resume-step": _refused(
        "runs resume from trainer.resume_from (latest by default; trainer.resume_from=STEP, or null to start fresh)"
    ),
    "--continue-train-exp-dir": _refused(
        "a run resumes inside its own trainer.checkpoint_dir (trainer.resume_from=latest|STEP)"
    ),
    "--vae-latents-name": _refused(
        "cached latents are a folder: data.latent_cache=DIR (python -m repae.cache_latents --out DIR)"
    ),
}
BETA_DEFAULTS = {"--adam-beta1": 0.9, "--adam-beta2": 0.999}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass
class Translation:
    rest: list[str]  # what argparse still has to read (-c, --help, key=value overrides)
    overrides: list[str]  # key=value, one per translated flag (the last of a repeated flag wins)
    spelled: dict[str, str]  # schema key -> the flag that set it
    notices: list[str]


def _lookup(token: str) -> tuple[str, Flag, bool | None] | None:
    """(flag name, its entry, boolean value from a ``--no-x`` spelling) for a reference flag token."""
    name = token.split("=", 1)[0]
    if name in FLAGS:
        return name, FLAGS[name], None
    if name.startswith("--no-") and FLAGS.get("--" + name[5:], Flag(None)).boolean:
        return "--" + name[5:], FLAGS["--" + name[5:]], False
    return None


def translate_reference_flags(argv: list[str]) -> Translation:
    """Pull the reference flags out of ``argv`` and turn them into ``key=value`` overrides.

    Raises :class:`ConfigError` naming the flag for a flag without a counterpart, a missing or
    malformed value.
    """
    rest: list[str] = []
    values: dict[str, tuple[str, str, str]] = {}  # key -> (flag, shown value, override value)
    betas: dict[str, float] = {}
    notices: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            rest.extend(argv[i - 1 :])
            break
        found = _lookup(token) if token.startswith("--") else None
        if found is None:
            rest.append(token)
            continue
        name, flag, negated = found
        inline = token.split("=", 1)[1] if "=" in token else None
        if flag.boolean:
            if negated is not None:
                if inline is not None:
                    raise ConfigError(f"{token}: --no-x takes no value")
                value = False
            elif inline is None:
                value = True
            elif inline.lower() in TRUE + FALSE:
                value = inline.lower() in TRUE
            else:
                raise ConfigError(f"{name}: expected true or false, got {inline!r} (or use {name} / --no-{name[2:]})")
            shown = name if value else f"--no-{name[2:]}"
            values[flag.key] = (name, shown, f"{flag.key}={'true' if value else 'false'}")
            continue
        if inline is None:
            if i >= len(argv):
                raise ConfigError(f"{name}: expected a value")
            inline = argv[i]
            i += 1
        if flag.key is None:
            if flag.allowed is not None and inline not in flag.allowed:
                if not flag.allowed:
                    raise ConfigError(f"{name}: not supported ({flag.instead})")
                only = " or ".join(repr(v) for v in flag.allowed)
                raise ConfigError(f"{name}: {inline!r} is not supported, only {only} ({flag.instead})")
            notices.append(f"config: '{name} {inline}' is accepted and ignored ({flag.instead})")
            continue
        assert flag.convert is not None
        converted = flag.convert(inline)
        if name in BETA_DEFAULTS:
            betas[name] = float(converted)
            pair = [betas.get(n, default) for n, default in BETA_DEFAULTS.items()]
            shown = " ".join(f"{n} {betas[n]}" for n in BETA_DEFAULTS if n in betas)
            values[flag.key] = (name, shown, f"{flag.key}={json.dumps(pair)}")
            continue
        values[flag.key] = (name, f"{name} {inline}", f"{flag.key}={converted}")
    overrides, spelled = [], {}
    for key, (name, shown, override) in values.items():
        overrides.append(override)
        spelled[key] = name
        extra = " (the other beta: the reference default)" if name in BETA_DEFAULTS and len(betas) == 1 else ""
        notices.append(f"config: {shown!r} is accepted as {override!r}{extra}")
    return Translation(rest, overrides, spelled, notices)


def epilog() -> str:
    """The accepted reference flags, for ``--help``."""
    mapped = [f"  {name:<30} {flag.key}" for name, flag in FLAGS.items() if flag.key is not None]
    booleans = ", ".join(f"{n}/--no-{n[2:]}" for n, f in FLAGS.items() if f.boolean)

    def status(flag: Flag) -> str:
        if flag.allowed is None:
            return "ignored: "
        return f"only {' or '.join(flag.allowed)}, ignored: " if flag.allowed else "error: "

    other = [f"  {name:<30} {status(flag)}{flag.instead}" for name, flag in FLAGS.items() if flag.key is None]
    return "\n".join(
        [
            "Reference train_repae.py / train_ldm_only.py flags (--x value, --x=value) are translated into",
            "key=value overrides applied after the YAML, with one notice line each:",
            *mapped,
            f"Booleans: {booleans}.",
            "--output-dir X sets trainer.checkpoint_dir to X/${trainer.run}; --enc-type takes the reference's",
            "comma-separated list; --adam-beta1/--adam-beta2 fill optimizer.betas (a beta not given: the",
            "reference default). Not translated:",
            *other,
        ]
    )


def parse_train_args(argv: list[str] | None, description: str, prog: str) -> argparse.Namespace:
    """``-c CONFIG`` (optional), ``key=value`` overrides and the reference flags -> (config, overrides).

    The reference flags come after the overrides in ``args.overrides``. Errors (refused flags,
    one key given as a flag and as an override) exit through ``parser.error`` like argparse's own.
    """
    import sys

    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-c", "--config", default=None, help="YAML config, e.g. configs/repae/toy.yaml (default: the schema defaults)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    try:
        tr = translate_reference_flags(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        parser.error(str(err))
    args = parser.parse_args(tr.rest)
    for item in args.overrides:
        key = resolve_alias_key(item.split("=", 1)[0], ALIASES)
        if key in tr.spelled:
            parser.error(f"{key}: given twice, as {tr.spelled[key]} and as {item!r}; keep only one")
    for message in tr.notices:
        config_notice(message)
    args.overrides = [*args.overrides, *tr.overrides]
    return args
