"""The machine a run was measured on: CPU, cores, bf16 support, GPU, versions and load."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
from typing import Any

import torch

from cifar_lab.host import cpu_flags, cpu_name


def machine_info() -> dict[str, Any]:
    import lightning
    import torchvision

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info["env"] = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "GOMP_SPINCOUNT", "CIFAR_LAB_DATA") if k in os.environ}
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info
