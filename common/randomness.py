"""Random draws that belong to a sample, not to a process.

Training draws a timestep, posterior noise and flow noise for every sample. If those came from one
generator per rank, the same global batch would be noised differently on 1 GPU and on 2, and a
run could not be proven equivalent across world sizes (nor resumed on another world size with the
same trajectory). So the trainer gives every sample of the global batch its own CPU generator,
seeded by (seed, step, index in the global batch): a sample's draws then depend only on where it
sits in the global batch, never on how the batch is split over ranks or micro-batches. Draws are
made on the CPU so that a GPU run and a CPU run draw the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of the global batch of optimizer step ``step``."""
    x = (seed * 1_000_003 + step) * 1_000_033 + index
    return (x * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (2**63 - 1)


def sample_generators(seed: int, step: int, first_index: int, count: int) -> list[torch.Generator]:
    """CPU generators for samples ``first_index .. first_index + count - 1`` of step ``step``."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, first_index + i)) for i in range(count)]


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
    """A 63-bit seed that differs for every (seed, rank, step, micro-batch)."""
    x = (seed * 1_000_003 + rank) * 1_000_033 + step
    x = x * 1_009 + micro
    return (x * 0x9E3779B97F4A7C15) % (2**63 - 1)


def data_seed_after_restart(seed: int, step: int) -> int:
    """The data stream's seed after a restart at ``step`` that cannot continue the old streams."""
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**31 - 1)


def noise_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one image's initial noise: independent of how prompts are batched."""
    return (seed * 1_000_003 + prompt_index * 1_009 + sample_index) % (2**63 - 1)
