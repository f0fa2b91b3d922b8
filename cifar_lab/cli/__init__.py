"""The commands: ``train`` (``python train.py``), ``evaluate``, ``predict``, ``compare``.

Each is also ``python -m cifar_lab.<name>``; every one runs under
:func:`cifar_lab.errors.exit_on_user_error` (one message, documented exit codes).
``sweep`` is the per-job runner and end-of-sweep report of ``python train.py -m``;
``summary`` writes a run's metrics.json.
"""
