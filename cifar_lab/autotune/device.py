"""The device side of autotune: its candidates in their usual order, one real training step of the
run's network per candidate, and what a measurement was made under."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_lab.autotune.decision import AUTO
from cifar_lab.host import cpu_flags, cpu_name
from cifar_lab.module import MEMORY_FORMATS

StepFactory = Callable[..., Callable[[], float]]


def device_of(cfg: DictConfig) -> torch.device:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def _native_bf16_cpu() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def candidate_pairs(device: torch.device, precision: str, memory_format: str) -> list[tuple[str, str]]:
    """The pairs to time, the usual choice for the device first: reduced precision where the device has
    it natively (bf16, else fp16 on a GPU; bf16 on a CPU with AVX512-BF16 or AMX), channels_last."""
    if precision != AUTO:
        precisions = [precision]
    elif device.type == "cuda":
        precisions = ["bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", "32"]
    else:
        precisions = ["bf16-mixed", "32"] if _native_bf16_cpu() else ["32", "bf16-mixed"]
    formats = [memory_format] if memory_format != AUTO else ["channels_last", "contiguous"]
    return [(p, f) for p in precisions for f in formats]


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context a Lightning precision string means (none for full precision)."""
    precision = str(precision)
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def image_size(cfg: DictConfig) -> int:
    return int(OmegaConf.select(cfg, "data.source.image_size", default=32) or 32)


def machine(device: torch.device) -> dict[str, Any]:
    """The machine setup a measurement was made under (the precision probe's conditions)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}


def conditions(device: torch.device, batch_size: int, size: int) -> dict[str, Any]:
    """What a measurement was made under: any change means it is measured again."""
    return {**machine(device), "batch_size": int(batch_size), "image_size": int(size)}


def step_fn(cfg: DictConfig, precision: str, memory_format: str, device: torch.device, batch_size: int,
            compile: bool = False) -> Callable[[], float]:
    """One real training step (forward, loss, backward, optimizer step) of a fresh copy of the run's
    network on one resident batch (compiled when asked); returns the loss."""
    net = instantiate(cfg.model, _convert_="all").to(device).train()
    net = net.to(memory_format=MEMORY_FORMATS[memory_format])
    if compile:
        net.compile(mode=OmegaConf.select(cfg, "module.compile_mode", default=None))
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    size = image_size(cfg)
    num_classes = int(OmegaConf.select(cfg, "data.num_classes", default=10))
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def step() -> float:
        with autocast_for(precision, device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    return step


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """The measured steps draw random numbers; the run's own stream must not notice."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
