"""Exponential moving average of the trainable weights, kept in fp32.

The reference updated ~460 tensors in a Python loop every step. Here the update is one fused
multi-tensor ``lerp`` (``torch._foreach_lerp_``): ``ema <- ema + (1 - decay) * (theta - ema)``.
The EMA is stored by parameter name so it can be written as a ``save_pretrained`` folder.
"""

from __future__ import annotations

import torch
from torch import nn

# Largest temporary of an EMA operation, in fp32 elements (256 MiB): the ZeRO-0 upcast group, and
# the whole gather buffer (all ranks' chunks together) of the sharded EMA. The planner counts it.
EMA_CHUNK_NUMEL = 1 << 26


class EMA:
    def __init__(self, model: nn.Module, decay: float, chunk_numel: int = EMA_CHUNK_NUMEL) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]
        self.groups = _chunk(self.shadow, chunk_numel)

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA parameters missing from the model: {missing[:5]}")
        return [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp per group of tensors; bf16 weights are upcast a group at a time.

        Upcasting all of a 2.7B-parameter bf16 model at once would allocate a transient fp32 copy
        (~10 GiB); groups of ``chunk_numel`` elements bound that spike to ~256 MiB.
        """
        live = self._live(model)
        for lo, hi in self.groups:
            params = [p.float() if p.dtype != torch.float32 else p for p in live[lo:hi]]
            torch._foreach_lerp_(self.shadow[lo:hi], params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])

    def to(self, device: torch.device) -> EMA:
        self.shadow = [t.to(device) for t in self.shadow]
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a sampling copy)."""
        for p, s in zip(self._live(model), self.shadow):
            p.copy_(s.to(p.dtype))


def _chunk(tensors: list[torch.Tensor], chunk_numel: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose tensors hold at most ``chunk_numel`` elements (or one tensor)."""
    groups, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > chunk_numel:
            groups.append((start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        groups.append((start, len(tensors)))
    return groups


class ShardedEMA:
    """The EMA of the fp32 master weights, sharded as ZeRO-1/2 shards them: no copy of the whole model.

    DeepSpeed's ZeRO-1/2 optimizer flattens each parameter group into one buffer, splits it into
    equal partitions, and keeps on rank ``r`` only partition ``r`` of the fp32 *master* weights
    (``single_partition_of_fp32_groups``). The EMA here is a tensor of the same shape next to it,
    updated with one fused ``lerp`` per step and no communication. It therefore costs
    ``4 * params / N`` bytes per GPU instead of ``4 * params`` and follows the fp32 masters, not the
    bf16 weights the forward pass uses (which round every update away below ~1/256 relative).

    The full EMA exists only when it is asked for (checkpoints, sample grids):
    :meth:`full_state_dict` gathers the partitions to rank 0's host memory a chunk at a time, so
    the accelerator holds at most ``gather_numel`` extra elements (all ranks' chunks together). The layout of a
    checkpoint's ``ema/`` folder (one tensor per parameter name) does not depend on the world size,
    so :meth:`load_full_state_dict` re-cuts it for any number of processes.
    """

    def __init__(self, model: nn.Module, optimizer, decay: float, gather_numel: int = EMA_CHUNK_NUMEL) -> None:
        for attr in ("single_partition_of_fp32_groups", "round_robin_bit16_groups", "round_robin_bit16_offsets"):
            if not hasattr(optimizer, attr):
                raise TypeError(
                    f"ShardedEMA needs DeepSpeed's ZeRO-1/2 optimizer; {type(optimizer).__name__} has no {attr}"
                )
        self.decay = decay
        self.gather_numel = gather_numel
        self.optimizer = optimizer  # its partitions are read at every update: a checkpoint load may replace them
        count = len(optimizer.single_partition_of_fp32_groups)
        self.groups = list(getattr(optimizer, "real_dp_process_group", [None] * count))
        names = {id(p): n for n, p in model.named_parameters()}
        # (name, shape, offset in the flat group buffer) per parameter, per group
        self.layout: list[list[tuple[str, torch.Size, int]]] = [
            [(names[id(p)], p.shape, int(off)) for p, off in zip(params, offsets)]
            for params, offsets in zip(optimizer.round_robin_bit16_groups, optimizer.round_robin_bit16_offsets)
        ]
        self.names = [n for group in self.layout for n, _, _ in group]
        self.shadow = [m.detach().clone() for m in optimizer.single_partition_of_fp32_groups]

    @property
    def numel_per_rank(self) -> int:
        """Elements this rank stores (its partitions, alignment padding included)."""
        return sum(t.numel() for t in self.shadow)

    def _rank(self, g: int) -> tuple[int, int]:
        """(this rank's partition index, number of partitions) in group ``g``'s data-parallel group."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.groups[g]), dist.get_world_size(self.groups[g])

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """``ema <- ema + (1 - decay) (master - ema)`` on this rank's partitions; ``model`` is unused."""
        masters = [m.detach() for m in self.optimizer.single_partition_of_fp32_groups]
        torch._foreach_lerp_(self.shadow, masters, 1.0 - self.decay)

    # ------------------------------------------------------------- gathering
    def _gather_group(self, g: int) -> torch.Tensor | None:
        """Collective: group ``g``'s whole flat EMA in rank 0's host memory (None on other ranks)."""
        import torch.distributed as dist

        part, (rank, world) = self.shadow[g], self._rank(g)
        if world == 1:
            return part.detach().to("cpu", copy=True)
        size = part.numel()
        flat = torch.empty(size * world, dtype=part.dtype) if rank == 0 else None
        dst = dist.get_global_rank(self.groups[g], 0) if self.groups[g] is not None else 0
        step = max(1, self.gather_numel // world)
        for lo in range(0, size, step):
            chunk = part[lo : lo + step].contiguous()
            bufs = [torch.empty_like(chunk) for _ in range(world)] if rank == 0 else None
            dist.gather(chunk, bufs, dst=dst, group=self.groups[g])
            if rank == 0:
                for r, buf in enumerate(bufs):
                    flat[r * size + lo : r * size + lo + chunk.numel()] = buf.cpu()
        return flat

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective (every rank calls it): the EMA by parameter name, fp32 on the CPU, on rank 0 only."""
        out: dict[str, torch.Tensor] | None = {}
        for g, layout in enumerate(self.layout):
            flat = self._gather_group(g)  # every rank joins every group's gather
            if flat is None or out is None:
                out = None
                continue
            for name, shape, offset in layout:
                out[name] = flat[offset : offset + shape.numel()].view(shape).clone()
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's partitions out of a full EMA (any world size wrote it)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for g, layout in enumerate(self.layout):
            rank, _ = self._rank(g)
            part = self.shadow[g]
            lo, hi = rank * part.numel(), (rank + 1) * part.numel()
            part.zero_()  # alignment padding: the masters hold zeros there too
            for name, shape, offset in layout:
                a, b = max(lo, offset), min(hi, offset + shape.numel())
                if a < b:
                    src = state[name].reshape(-1)[a - offset : b - offset]
                    part[a - lo : b - lo].copy_(src.to(part.device, part.dtype))


@torch.no_grad()
def copy_weights(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Load a full EMA (by parameter name) into ``model``'s parameters, e.g. a sampling copy."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in state]
    if missing:
        raise KeyError(f"the EMA lacks {len(missing)} of the model's parameters, e.g. {missing[:3]}")
    for name, param in params.items():
        param.copy_(state[name].to(param.device, param.dtype))


class ModuleEMA(EMA):
    """The unsharded :class:`EMA` behind :class:`ShardedEMA`'s interface (ZeRO stage 0, benchmarks).

    Stage 0 has no partitioned fp32 masters to follow, so this averages the module's own weights.
    """

    @property
    def numel_per_rank(self) -> int:
        return sum(t.numel() for t in self.shadow)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.state_dict()

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)
