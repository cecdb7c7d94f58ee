"""``python -m fusedit.export``: a training checkpoint -> a diffusers pipeline folder (fusedit/tools/export.py)."""

import sys

from fusedit.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
