"""``python -m cifar_lab.evaluate``: see :mod:`cifar_lab.cli.evaluate`."""

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("evaluate"):
    from cifar_lab.cli.evaluate import main

if __name__ == "__main__":
    main()
