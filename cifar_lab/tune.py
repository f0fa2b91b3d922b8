"""``python -m cifar_lab.tune``: see :mod:`cifar_lab.cli.tune`."""

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("tune"):
    from cifar_lab.cli.tune import main

if __name__ == "__main__":
    main()
