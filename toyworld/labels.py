"""Class labels from toy attributes: one rule for every stage that trains a class-conditional model.

A rule names attributes joined by ``+`` (``"color+shape"``, optionally prefixed ``toy:`` as in
``data.label``); the label is the mixed-radix number over the attributes' vocabularies, the
first attribute most significant, so ``color+shape`` has 24 classes ordered colour-major.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from common.shards import BadSample
from toyworld.world import ATTRIBUTES


def parse_rule(rule: str) -> tuple[str, ...]:
    """``"toy:color+shape"`` -> ``("color", "shape")``; ValueError for empty, unknown or repeated names."""
    names = tuple(part.strip() for part in rule.removeprefix("toy:").split("+"))
    unknown = [n for n in names if n not in ATTRIBUTES]
    if not rule.removeprefix("toy:").strip() or unknown or len(set(names)) != len(names):
        raise ValueError(f"toy label rule {rule!r}: use distinct attributes from {sorted(ATTRIBUTES)}, joined by '+'")
    return names


def toy_num_classes(rule: str) -> int:
    """Number of classes of a rule: the product of its attributes' vocabulary sizes."""
    return math.prod(len(ATTRIBUTES[name]) for name in parse_rule(rule))


def toy_label(attrs: Mapping[str, Any], rule: str) -> int:
    """Mixed-radix class index of one sample's attributes (names, or indices as the scorer gives).

    ``toy_label({"color": "orange", "shape": "square"}, "color+shape") == 1 * 4 + 1``. A missing
    or unknown value raises :class:`~common.shards.BadSample` (a ``ValueError``): a shard holding
    it is skipped and counted, a direct caller gets the value named.
    """
    label = 0
    for name in parse_rule(rule):
        vocab = ATTRIBUTES[name]
        value = attrs.get(name)
        if isinstance(value, str):
            index = vocab.index(value) if value in vocab else -1
        else:
            index = -1 if value is None else int(value)
        if not 0 <= index < len(vocab):
            raise BadSample(f"toy attribute {name}={value!r} is not one of {list(vocab)}")
        label = label * len(vocab) + index
    return label
