"""``python -m repae.bench``: exit status 1 when the two formulations disagree on the losses."""

import sys

from repae.bench.joint import main

if __name__ == "__main__":
    sys.exit(0 if main()["loss_check"]["agree"] else 1)
