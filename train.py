"""Train a CIFAR classifier: ``python train.py model=attention_net optimizer=sgd``.

Sweeps: ``python train.py -m optimizer=sgd,adam model=simple_cnn,simple_cnn_bn`` (grid) or
``python train.py hparams_search=optuna`` (Optuna TPE). In a sweep a failing job is recorded
(``<job dir>/error.txt``) and returns nan, and the sweep goes on (cifar_lab.sweeps.runner).
"""

import os
import sys
from pathlib import Path

from cifar_lab.cli.exits import exit_on_config_error, interrupted_while_starting
from cifar_lab.cli.usage import help_config_dirs, help_text

if __name__ == "__main__" and (_help := help_config_dirs(sys.argv[1:], Path(__file__).resolve().parent / "conf")):
    print(help_text(_help), end="")  # the groups from the file names: no composing (cifar_lab/cli/usage.py)
    sys.exit(0)

# torch and Lightning load once the config composes (cifar_lab/cli/starting.py): the options that only print
# (help, the config, its info) and a config that does not compose answer in about a second instead of five
with interrupted_while_starting("train.py"):
    import hydra
    from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cifar_lab.cli.train import main_guarded

    return main_guarded(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach exit_on_config_error
    with exit_on_config_error():
        main()
