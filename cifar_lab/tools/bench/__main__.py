"""``python -m cifar_lab.tools.bench``, the same command as ``python -m cifar_lab.bench``."""

import sys

from cifar_lab.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
