"""train.py with a NaN injected into the loss at chosen steps: ``nonfinite_train.py STEPS train-args...``.

The guard test launches this instead of train.py, the same way (python or torchrun): every rank
poisons the loss of the listed 1-based optimizer steps (``RANKS=0`` poisons rank 0 only).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusedit.train import trainer  # noqa: E402

BAD = {int(s) for s in sys.argv[1].split(",") if s}
RANKS = {int(r) for r in os.environ.get("RANKS", "").split(",") if r}
_micro_step = trainer.Trainer.micro_step


def poisoned(self, batch, micro):
    loss = _micro_step(self, batch, micro)
    if self.step + 1 in BAD and (not RANKS or self.env.rank in RANKS):
        return loss * math.nan
    return loss


trainer.Trainer.micro_step = poisoned

if __name__ == "__main__":
    import train

    sys.exit(train.main(sys.argv[2:]))
