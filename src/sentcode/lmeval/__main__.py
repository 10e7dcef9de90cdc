"""``python -m sentcode.lmeval ARGS``: lm-eval's command line with the ``sentcode`` model registered."""

import sys

from sentcode.cli import main

if __name__ == "__main__":
    sys.exit(main(["lm-eval", *sys.argv[1:]]))
