"""Random draws that belong to a sample, not to a process; one seeding primitive for every stage.

Training draws a timestep, posterior noise and flow noise for every sample. If those came from one
generator per rank, the same global batch would be noised differently on 1 GPU and on 2, and a
run could not be proven equivalent across world sizes (nor resumed on another world size with the
same trajectory). So the trainer gives every sample of the global batch its own CPU generator,
seeded by (seed, step, index in the global batch): a sample's draws then depend only on where it
sits in the global batch, never on how the batch is split over ranks or micro-batches. Draws are
made on the CPU so that a GPU run and a CPU run draw the same numbers.

Every seed in the project comes from :func:`derive_seed` and has **32 bits**. torch's CPU
generator (mt19937) keeps only the low 32 bits of ``manual_seed``: a wider seed is truncated
silently, and two seeds that differ only above bit 31 give the same stream. 32 bits are also
what numpy's legacy seeding accepts. Within one stream (a fixed ``seed`` and ``key``) the map
from ``index`` to seed is a bijection, so no two samples of one step, one prompt or one
generation run ever share noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None

MASK32 = 0xFFFFFFFF
# Streams: the first element of every key, so that two purposes never share a seed sequence.
STREAM_SAMPLE = 1  # per-sample draws of one optimizer step (fusedit trainer)
STREAM_STEP = 2  # one generator per (rank, step, micro-batch) (REPA-E trainers)
STREAM_NOISE = 3  # initial noise of one generated image (fusedit pipeline)
STREAM_RESTART = 4  # the data stream's seed after a restart at another world size
STREAM_RECONSTRUCTION = 5  # posterior noise of one image in the VAE diagnostics
STREAM_BENCH = 6  # synthetic batches of the step benchmark
STREAM_LATENT_STATS = 7  # posterior noise of one image when measuring latent statistics


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection on [0, 2^32) that mixes every input bit."""
    h &= MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def stream_hash(seed: int, key: Sequence[int]) -> int:
    """32-bit hash naming the stream (``seed``, ``key``); compute it once per stream, not per item."""
    name = ",".join(str(int(v)) for v in (seed, *key))
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def seed_in_stream(stream: int, index: int) -> int:
    """Seed of item ``index`` of the stream whose :func:`stream_hash` is ``stream``."""
    return fmix32((int(index) ^ stream) & MASK32)


def derive_seed(seed: int, key: Sequence[int], index: int) -> int:
    """The 32-bit seed of item ``index`` of the stream named by (``seed``, ``key``).

    ``index XOR hash32(seed, key)``, then :func:`fmix32`: injective in ``index`` (< 2^32) for one
    stream; two streams collide on a given small index only if their hashes agree (chance 2^-32).
    """
    return seed_in_stream(stream_hash(seed, key), index)


def sample_seed(seed: int, step: int, index: int) -> int:
    """Seed for sample ``index`` of the global batch of optimizer step ``step``."""
    return derive_seed(seed, (STREAM_SAMPLE, step), index)


def sample_generators(seed: int, step: int, first_index: int, count: int) -> list[torch.Generator]:
    """CPU generators for samples ``first_index .. first_index + count - 1`` of step ``step``."""
    stream = stream_hash(seed, (STREAM_SAMPLE, step))  # once per call: this runs every micro-step
    return [torch.Generator().manual_seed(seed_in_stream(stream, first_index + i)) for i in range(count)]


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """float32 N(0, I) of ``shape`` on ``device``.

    With one generator per sample (a list as long as ``shape[0]``), row i comes from generator i;
    with a single generator the draw is made on that generator's device.
    """
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} per-sample generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32).to(device)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed of the generator of one (rank, step, micro-batch): the REPA-E trainers' per-step draws."""
    return derive_seed(seed, (STREAM_STEP, rank, step), micro)


def data_seed_after_restart(seed: int, step: int) -> int:
    """The data stream's seed after a restart at ``step`` that cannot continue the old streams."""
    return derive_seed(seed, (STREAM_RESTART,), step)


def noise_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one generated image's initial noise: independent of how prompts are batched."""
    return derive_seed(seed, (STREAM_NOISE, prompt_index), sample_index)


def index_seed(seed: int, index: int) -> int:
    """Seed of item ``index`` of a run-wide sequence (REPA-E's 50k sample set, one per image)."""
    return derive_seed(seed, (), index)


def index_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per item (CPU so the draws are the same whatever device samples)."""
    stream = stream_hash(seed, ())
    return [torch.Generator().manual_seed(seed_in_stream(stream, i)) for i in indices]
