"""Sample GenEval prompts from a training checkpoint; all logic lives in evaluation/sampling.py.

python evaluation/sample_geneval_ckpt.py --checkpoint RUN --save-dir OUT
accelerate launch --num_processes 8 evaluation/sample_geneval_ckpt.py --checkpoint RUN --save-dir OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere, installed or not

from evaluation.sampling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("geneval"))
