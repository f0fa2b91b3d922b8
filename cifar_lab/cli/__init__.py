"""The commands: ``train`` (``python train.py``, a sweep with ``-m``), ``evaluate``, ``predict``, ``compare``,
``export`` and ``tune`` (the learning-rate and batch-size finders).

Each is also ``python -m cifar_lab.<name>``; every one runs under
:func:`cifar_lab.cli.exits.exit_on_user_error` (one message, the exit codes of :mod:`cifar_lab.errors`).
"""
