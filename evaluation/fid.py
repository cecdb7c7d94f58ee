"""FID of generated images against real ones: the command line of :mod:`common.fid`.

    python evaluation/fid.py --real-images data/mjhq30k --fake-images out/mjhq --resolution 256 \\
        --dataset-name mjhq --out out/mjhq_fid.json

The metric itself lives in ``common.fid`` because both stages use it (the REPA-E VAE
diagnostics compute rFID); this file keeps the evaluation layer's entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common.fid import main

    sys.exit(main())
