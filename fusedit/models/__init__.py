"""The baseline text-to-image DiT, its reference formulation and the checkpoint converter."""

from .dit import DiT, count_parameters

__all__ = ["DiT", "count_parameters"]
