"""train.py with one change: every step trains on the same fixed *global* batch stream.

Used by tests/test_zero2_equivalence.py under plain python (1 process) or torchrun (N). The
global batch of step s is generated from (seed, s) alone, identically on every rank, and rank r
takes its slice ``(r * accumulation + micro) * micro_batch`` onwards: the same samples the trainer's
per-sample randomness indexes (fusedit/randomness.py). Everything else -- DeepSpeed engine and
ZeRO-2 optimizer, noise, loss, EMA, checkpoints, resume -- is the real trainer.

    python tests/zero2_worker.py -c configs/e2e-vae/toy.yaml --deepspeed-config-path ZERO2 key=value ...
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusedit.data.webdata import StreamState  # noqa: E402
from fusedit.train.trainer import Trainer  # noqa: E402


class FixedGlobalBatches:
    """An endless loader: step s's global batch is a pure function of (seed, s)."""

    def __init__(self, trainer: Trainer, min_tokens: int = 3) -> None:
        cfg = trainer.cfg
        self.trainer = trainer
        self.micro = cfg.data.batch_size_per_gpu
        self.accum = cfg.trainer.gradient_accumulation_steps
        self.global_batch = self.micro * self.accum * trainer.env.world_size
        self.size = cfg.data.resolution
        self.max_len = cfg.data.max_prompt_length
        self.vocab, self.min_tokens = len(trainer.parts.text_encoder.tokenizer), min_tokens

    def global_batch_of(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(10_007 * self.trainer.cfg.trainer.seed + step)
        n, length = self.global_batch, self.max_len
        pixels = torch.rand((n, 3, self.size, self.size), generator=g) * 2 - 1
        lengths = torch.randint(self.min_tokens, length + 1, (n,), generator=g)
        ids = torch.randint(4, self.vocab, (n, length), generator=g)
        ids[:, 0] = 2  # BOS, as the toy tokenizer prepends
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"pixel_values": pixels, "input_ids": ids * mask, "attention_mask": mask}

    def __iter__(self):
        rank = self.trainer.env.rank
        while True:
            full = self.global_batch_of(self.trainer.step)
            for micro in range(self.accum):
                start = (rank * self.accum + micro) * self.micro
                part = {k: v[start : start + self.micro] for k, v in full.items()}
                longest = int(part["attention_mask"].sum(1).max())  # pad to this slice's longest, as tokenize does
                part["input_ids"] = part["input_ids"][:, :longest]
                part["attention_mask"] = part["attention_mask"][:, :longest]
                part["state"] = {"role": 0, "slots": [], "step": self.trainer.step}
                yield part


class FixedBatchTrainer(Trainer):
    def _build_loader(self, data_state: dict | None):
        self.stream = StreamState(data_state)
        return FixedGlobalBatches(self)


def main(argv: list[str]) -> int:
    import train

    args = train.parse_args(argv)
    from common.distributed import cleanup
    from fusedit.config import load_config

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    try:
        FixedBatchTrainer(cfg, deepspeed_config_path=args.deepspeed_config_path).train()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
