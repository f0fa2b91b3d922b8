"""``python -m cifar_lab.compare``: see :mod:`cifar_lab.cli.compare`."""

import sys

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("compare"):
    from cifar_lab.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
