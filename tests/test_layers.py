"""The layering in CONTRIBUTING.md ("Layers") holds, and the contract checker catches a break of it.

The contracts live in pyproject.toml (``[tool.importlinter]``); ``lint-imports`` reads them. The
negative tests copy the package, add one import that breaks a rule, and check that the checker
fails naming the rule and the offending import: a contract that cannot fail would prove nothing.
Siblings of one layer may import each other, so the contracts allow a circle between them; the
import graph read from the source (imports inside functions included) must have none.
"""

from __future__ import annotations

import ast
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


# ----------------------------------------------------------------------------- no import circle
def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside a function, read from the source."""
    top = package.parent
    names = {".".join(p.relative_to(top).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in names:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as ``[a, b, ..., a]``, or None (a depth-first walk)."""
    done: set[str] = set()
    for start in sorted(graph):
        path, todo = [start], [iter(sorted(graph[start]))]
        while todo:
            step = next(todo[-1], None)
            if step is None:
                done.add(path.pop())
                todo.pop()
            elif step in path:
                return path[path.index(step):] + [step]
            elif step not in done:
                path.append(step)
                todo.append(iter(sorted(graph.get(step, ()))))
    return None


def test_no_module_of_cifar_lab_imports_itself_through_others() -> None:
    cycle = find_cycle(import_graph(ROOT / "cifar_lab"))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_finder_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("import os\n\n\ndef later():\n    from ..c import thing\n")
    (package / "c.py").write_text("from pkg import VERSION\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg"}
    assert find_cycle(graph) is None
    (package / "c.py").write_text("def thing():\n    from pkg import a\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
