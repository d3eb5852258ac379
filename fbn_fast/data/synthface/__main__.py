"""``python -m fbn_fast.data.synthface --out DIR ...``: the same command as ``python -m fbn_fast.data synth``."""

import sys

from .dataset import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
