"""``python -m cifar_lab.zoo``: see :mod:`cifar_lab.tools.zoo`."""

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("zoo"):
    from cifar_lab.tools.zoo import main

if __name__ == "__main__":
    main()
