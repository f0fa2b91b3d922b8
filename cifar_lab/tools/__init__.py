"""Developer tools, apart from the library: ``bench`` (data path and training speed against the
reports' pipeline) and ``zoo`` (the model table: parameters, MACs, CPU speed).

Each is also ``python -m cifar_lab.<name>``.
"""
