"""cifar-lab's Optuna sweeper for Hydra (``hydra/sweeper=optuna``); the logic is in :mod:`cifar_lab.sweeps`."""
