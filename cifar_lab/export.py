"""``python -m cifar_lab.export``: see :mod:`cifar_lab.cli.export`."""

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("export"):
    from cifar_lab.cli.export import main

if __name__ == "__main__":
    main()
