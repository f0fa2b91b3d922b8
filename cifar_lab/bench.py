"""``python -m cifar_lab.bench``: see :mod:`cifar_lab.tools.bench`."""

import sys

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("bench"):
    from cifar_lab.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
