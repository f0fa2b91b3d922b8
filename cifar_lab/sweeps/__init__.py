"""Optuna searches run by Hydra (``hparams_search=optuna``): the logic behind the sweeper plugin.

The plugin itself (``hydra_plugins/cifar_lab_optuna``) is a thin Hydra ``Sweeper``; here:

- :mod:`.space`: the ``hydra.sweeper.params`` grammar -> Optuna distributions, a trial -> overrides
- :mod:`.storage`: where the study lives (SQLite in the sweep directory, an RDB URL, a journal file)
- :mod:`.trials`: the study's queue of ``n_trials`` trials, taking one, telling its result
- :mod:`.heartbeat`: a running trial's heartbeat; trials of dead workers become FAIL
- :mod:`.workers`: extra worker processes of one sweep command and their thread budget
- :mod:`.optuna_sweeper`: the sweep loop (ask, launch through Hydra's launcher, tell) and its results
- :mod:`.job`: the trial of the current job (for the pruning callback)
"""
