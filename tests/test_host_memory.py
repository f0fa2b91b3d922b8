"""The allocator switch keeps freed host memory in the process (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from cifar_lab.host import keep_freed_memory
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
switched = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(128 << 20, dtype=torch.uint8)  # 128 MB, touched
held = rss_mb()
del x
print(switched, held - rss_mb())
"""


def _freed_mb(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    switched, freed = out.stdout.split()
    return switched == "True", float(freed)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_stays_in_the_process_only_when_switched() -> None:
    switched, freed = _freed_mb("keep")
    assert switched and freed < 16, f"{freed:.0f} MB went back to the OS after the switch"
    _, freed_default = _freed_mb("default")
    assert freed_default > 100  # glibc's default: a large block is unmapped on free
