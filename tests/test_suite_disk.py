"""The suite itself: it refuses, in one line and before any test, to start on a disk without room for its
runs (``pytest_sessionstart`` in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DISK_NEEDED_GB

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # starts pytest itself, which imports torch and Lightning
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root (CI runs as root)")
@pytest.mark.parametrize("tier, selection", [("quick tier", ["-m", "not slow"]), ("whole suite", [])])
def test_a_run_on_a_disk_without_room_is_refused_before_any_test(tmp_path: Path, tier: str,
                                                                   selection: list[str]) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], check=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *selection,
                               "tests/test_export.py"], cwd=ROOT, env={**os.environ, "TMPDIR": str(small)},
                              capture_output=True, text=True, timeout=300)
        written = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"only 0.0 GB free on the disk of {small}, where the tests write their runs; the {tier} needs about "
            f"{DISK_NEEDED_GB[tier]:g} GB") in proc.stdout
    assert "passed" not in proc.stdout and "pytest-of-" not in " ".join(written)  # no test ran, no folder made

