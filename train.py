"""Train a CIFAR classifier: ``python train.py model=attention_net optimizer=sgd``."""

import hydra
from omegaconf import DictConfig

from cifar_lab.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
