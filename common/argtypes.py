"""What the command-line tools share: types for numbers a user can get wrong, and one flag style.

``type=float`` accepts ``nan`` and ``inf``, and ``type=int`` accepts ``-3`` for a count: the
value then travels into a sampler or a loop and fails far away, in a traceback. These types
refuse it at the flag, naming it (argparse prefixes ``argument --flag:``), so the mistake ends in
argparse's own ``error:`` line, exit 2.

:class:`DashedArgumentParser` is the parser of the tools that once spelled flags with
underscores: flags are spelled with dashes (``--batch-size``), the old spellings still work.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (samples, steps, batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


class DashedArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose flags are spelled with dashes and that still reads their old spellings.

    Register every flag dashed (``add_argument("--batch-size", ...)``; argparse derives the same
    ``dest``, ``batch_size``, as from ``--batch_size``). On the command line ``--batch_size 8`` and
    ``--batch_size=8`` then work too, and so does an old name given in ``renamed`` (old -> new,
    e.g. ``{"--num-samples": "--max-prompts"}``, in either spelling), while ``--help`` and the error
    messages name only the current spelling.

    Why the old spelling is rewritten in argv instead of registered as a second option string of
    the argument: a second option string shows in ``--help`` and in every error
    (``argument --batch-size/--batch_size``), and hiding it takes a HelpFormatter subclass for each
    tool's own formatter; a second argument with ``help=argparse.SUPPRESS`` and the same ``dest``
    hides it but breaks ``required=True`` (argparse reports the flag missing when only the alias
    was given), mutually exclusive groups, and ``BooleanOptionalAction`` (``--no-x`` is derived per
    spelling, and the action only accepts its own option strings). A token rewritten before
    parsing behaves exactly like the current spelling in all of these.

    Only a token before ``--`` that starts with ``--``, is not itself a registered flag, and whose
    rewritten name is one, changes; anything else reaches argparse as given (an unknown flag is
    still argparse's ``unrecognized arguments`` error). Subparsers made with ``add_subparsers()``
    are of this class too and take their own ``renamed=`` in ``add_parser``.
    """

    def __init__(self, *args: Any, renamed: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = {self._dashed(old): new for old, new in (renamed or {}).items()}

    @staticmethod
    def _dashed(flag: str) -> str:
        return "--" + flag[2:].replace("_", "-")

    def current_spelling(self, flag: str) -> str | None:
        """The registered flag an old spelling stands for (``--batch_size`` -> ``--batch-size``), else None."""
        if not flag.startswith("--") or flag in self._option_string_actions:
            return None
        new = self._dashed(flag)
        new = self.renamed.get(new, new)
        return new if new in self._option_string_actions else None

    def respell(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with every old spelling of a flag replaced by the current one (``--x_y=v`` -> ``--x-y=v``)."""
        out = list(argv)
        for i, token in enumerate(out):
            if token == "--":
                break
            name, sep, value = token.partition("=")
            new = self.current_spelling(name)
            if new is not None:
                out[i] = new + sep + value
        return out

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = sys.argv[1:] if args is None else args
        return super().parse_known_args(self.respell(argv), namespace)


__all__ = ["DashedArgumentParser", "finite_float", "non_negative_float", "positive_int"]
