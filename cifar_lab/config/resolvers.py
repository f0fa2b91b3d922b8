"""OmegaConf resolvers the configs use; registered when cifar_lab is imported."""

from __future__ import annotations

import functools
import os
from omegaconf import OmegaConf

from cifar_lab.host import cpu_flags


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """True when the CPU multiplies bfloat16 matrices in hardware (AMX tiles, Linux flag ``amx_bf16``).

    On such CPUs oneDNN runs bf16 convolutions several times faster than float32 (see
    docs/benchmarks.md); elsewhere bf16 autocast mostly adds conversions.
    """
    return "amx_bf16" in cpu_flags()


def default_precision(accelerator: str = "auto") -> str:
    """The Trainer precision measured fastest for ``accelerator`` on this machine.

    GPUs: ``bf16-mixed`` where supported, else ``16-mixed``. CPUs: ``bf16-mixed`` with AMX
    bf16 support, else ``32``. ``auto`` means the GPU when one is visible.
    """
    import torch

    accelerator = str(accelerator).lower()
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "16-mixed"
        return "bf16-mixed"
    if accelerator in ("cpu", "auto"):
        return "bf16-mixed" if cpu_has_bf16_matmul() else "32"
    return "32"


def register() -> None:
    # The process id makes run directories unique even for runs started in the same microsecond.
    if not OmegaConf.has_resolver("cifar_lab.pid"):
        OmegaConf.register_new_resolver("cifar_lab.pid", lambda: str(os.getpid()), use_cache=True)
    # Per-device precision default: trainer.precision: ${cifar_lab.precision:${trainer.accelerator}}
    if not OmegaConf.has_resolver("cifar_lab.precision"):
        OmegaConf.register_new_resolver("cifar_lab.precision", default_precision)
