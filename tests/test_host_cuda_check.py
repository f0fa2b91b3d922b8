"""Without an NVIDIA driver, an optimizer step does not load NVML (checked in a fresh interpreter)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from cifar_lab import host

SCRIPT = """
import os, sys
import lightning  # sets PYTORCH_NVML_BASED_CUDA_CHECK=1
import torch
from cifar_lab.host import cheap_cuda_check
switched = cheap_cuda_check() if sys.argv[1] == "switch" else False
loads = []
real = torch.cuda._raw_device_count_nvml
torch.cuda._raw_device_count_nvml = lambda: loads.append(1) or real()
model = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW(model.parameters())
for _ in range(5):
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
print(switched, os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"), len(loads), torch.cuda.is_available())
"""


def _nvml_loads(mode: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          check=True).stdout.split()


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_driver(), reason="an NVIDIA driver is installed: the NVML check stays")
def test_without_a_driver_optimizer_steps_stop_loading_nvml() -> None:
    if not hasattr(__import__("torch")._C, "_cuda_getDeviceCount"):
        pytest.skip("a CPU-only torch build never asks NVML")
    assert _nvml_loads("keep") == ["False", "1", "5", "False"]  # Lightning's setting: NVML at every step
    assert _nvml_loads("switch") == ["True", "0", "0", "False"]  # the same answer without loading it


def test_the_nvml_check_stays_where_a_driver_loads(monkeypatch) -> None:
    monkeypatch.setenv(host.NVML_CHECK, "1")
    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: object())  # the library loads: a driver is there
    assert host.cheap_cuda_check() is False and host.os.environ[host.NVML_CHECK] == "1"
    monkeypatch.delenv(host.NVML_CHECK)  # never set (no Lightning): left alone
    assert host.cheap_cuda_check() is False and host.NVML_CHECK not in host.os.environ
