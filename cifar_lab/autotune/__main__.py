"""``python -m cifar_lab.autotune show|clear [model]``: see :mod:`cifar_lab.autotune.command` (it loads
neither torch nor Lightning: it starts in a fraction of a second)."""

import sys

from cifar_lab.autotune.command import main

if __name__ == "__main__":
    sys.exit(main())
