"""The layering in CONTRIBUTING.md ("Layers") holds, and the contract checker catches a break of it.

The contracts live in pyproject.toml (``[tool.importlinter]``); ``lint-imports`` reads them. The
negative tests copy the package, add one import that breaks a rule, and check that the checker
fails naming the rule and the offending import: a contract that cannot fail would prove nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_tree_keeps_its_layers() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "cifar_lab", root / "cifar_lab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


# (file, the added line, what the checker must name): an upward import from the bottom, from the middle,
# a lazy import inside a function, and a network importing Lightning.
BREAKS = [
    ("models/simple_cnn.py", "from cifar_lab.cli import train", "cifar_lab.models is not allowed to import cifar_lab.cli"),
    ("data/splits.py", "from cifar_lab.module import ClassifierModule",
     "cifar_lab.data is not allowed to import cifar_lab.module"),
    ("errors.py", "def _later():\n    from cifar_lab.sweeps import runner", "cifar_lab.errors is not allowed to import cifar_lab.sweeps"),
    ("callbacks/tta.py", "import cifar_lab.deploy.exported", "cifar_lab.callbacks is not allowed to import cifar_lab.deploy"),
    ("models/blocks.py", "import lightning", "cifar_lab.models is not allowed to import lightning"),
]


@pytest.mark.slow
@pytest.mark.parametrize("file,line,named", BREAKS, ids=[b[0] for b in BREAKS])
def test_an_upward_import_fails_the_contract(tree_copy: Path, file: str, line: str, named: str) -> None:
    path = tree_copy / "cifar_lab" / file
    original = path.read_text()
    path.write_text(original + "\n\n" + line + "\n")
    try:
        result = lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert named in result.stdout, result.stdout
