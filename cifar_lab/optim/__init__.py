"""Optimizers and learning-rate schedules that torch does not ship, as ``_partial_`` factories.

* :mod:`~cifar_lab.optim.grouped_sgd`: SGD with its own rate for biases and norm shifts.
* :mod:`~cifar_lab.optim.muon`: Muon on convolution filters, SGD on the rest.
* :mod:`~cifar_lab.optim.schedules`: warmup followed by a cosine or linear decay.

torch's own optimizers and schedulers are named directly from the configs.
"""
