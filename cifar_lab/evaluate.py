"""``python -m cifar_lab.evaluate``: see :mod:`cifar_lab.cli.evaluate`."""

from cifar_lab.cli.evaluate import main

if __name__ == "__main__":
    main()
