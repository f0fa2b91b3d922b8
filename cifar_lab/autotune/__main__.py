"""``python -m cifar_lab.autotune show|clear [model]``: see :mod:`cifar_lab.autotune.command`."""

import sys

from cifar_lab.errors import interrupted_while_starting

with interrupted_while_starting("autotune"):
    from cifar_lab.autotune.command import main

if __name__ == "__main__":
    sys.exit(main())
