"""``python -m cifar_lab.predict``: see :mod:`cifar_lab.cli.predict`."""

from cifar_lab.cli.exits import interrupted_while_starting

with interrupted_while_starting("predict"):
    from cifar_lab.cli.predict import main

if __name__ == "__main__":
    main()
