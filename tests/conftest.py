"""Shared fixtures: tiny data written to temporary folders, config composition, CLI runs."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.process
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import cifar_lab  # noqa: F401  (registers resolvers)
from cifar_lab.console import quiet_third_party
from cifar_lab.config.compose import hydra_job
from zygote import Zygote, runnable

# Autotune decisions go to a cache of this test session only (hermetic, and no stale entries),
# removed when the session ends (pytest_sessionfinish). A process spawned by a test (torch's spawn
# start method imports the test modules, and so this file) uses its parent's: it has no session end
# that would remove its own; multiprocessing names it before it imports anything).
if multiprocessing.current_process().name == "MainProcess":
    SESSION_CACHE: str | None = tempfile.mkdtemp(prefix="cifar_lab_test_cache_")
    os.environ["CIFAR_LAB_CACHE_DIR"] = SESSION_CACHE
else:
    SESSION_CACHE = None

# Parallel workers (pytest-xdist, `make test`) share the cores: each worker, and every command it
# starts, uses cores / workers threads. Oversubscribed OpenMP threads spin-wait for each other.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    from cifar_lab.sweeps.workers import limit_threads

    limit_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))

# The same narrow filters as the commands: third-party noise nobody can act on.
quiet_third_party()

# The Ctrl-C tests send SIGINT to the commands they start. A suite started in the background by a shell
# without job control (`make test &` in a script) inherits SIGINT ignored, and an ignored signal stays
# ignored across exec, so every command would shrug the Ctrl-C off. A handled one is reset to the
# default at exec: the commands take SIGINT as they would from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# CIFAR-10 statistics the augmentation tests normalise with
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


class NetModule(L.LightningModule):
    """The smallest LightningModule around a network: cross-entropy steps, plain SGD."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.net, self.lr, self.momentum = net, lr, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def seeded_generator(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def random_images(b: int = 16, seed: int = 0, h: int = 32, w: int = 32, dtype=torch.uint8) -> torch.Tensor:
    """A seeded batch of random uint8 images, or the same scaled to [0, 1] in a float dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def write_cifar_batches(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> Path:
    """A tiny cifar-10-batches-py folder in the official layout; labels cycle through classes."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int, offset: int) -> None:
        batch = {
            "batch_label": name,
            "labels": [int((offset + i) % 10) for i in range(n)],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch, i)
    dump("test_batch", test, 0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES10, "num_cases_per_batch": per_batch}, f)
    return folder


def write_image_folder(root: Path, classes: int = 3, train: int = 6, test: int = 2, size: int = 32) -> Path:
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                write_png(image, str(folder / f"{i:04d}.png"))
    return root


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar_batches(tmp_path / "cifar")
    return tmp_path / "cifar"


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def compose_cfg(overrides: list[str], output_dir: Path = Path("unused-run-dir")) -> DictConfig:
    """Compose conf/train.yaml as the CLI would, with Hydra's runtime set for interpolations."""
    with hydra_job("train", overrides, output_dir) as cfg:
        return cfg


@pytest.fixture(autouse=True)
def _seeded_single_thread_for_model_tests(request):
    """Model tests run seeded and single-threaded: several small test processes on a small
    machine oversubscribe the cores with intra-op threads and slow each other down."""
    if "models" not in request.node.path.parts:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the two tiers
# `make test-fast` runs the tests not marked slow: unit and in-process tests. A test that starts a
# process (a command, torchrun, DDP workers, a server, a cluster), itself or through a fixture, is in
# the whole suite only: it is marked slow, and an unmarked one fails here, naming what it started.
_RUNNING: list[pytest.Item | None] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING[0] = item


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _RUNNING[0] = None  # stopping what a fixture started (a server, a cluster) is not checked


def _refuse_outside_slow_tests(what: str) -> None:
    item = _RUNNING[0]
    if item is not None and item.get_closest_marker("slow") is None:
        raise AssertionError(f"{item.nodeid} starts {what}: a test that starts a process is marked slow "
                             "(the quick tier, `make test-fast`, runs in-process tests only)")


def _guard(cls: type, method: str, describe) -> None:
    real = getattr(cls, method)

    def guarded(self, *args, **kwargs):
        _refuse_outside_slow_tests(describe(self, *args, **kwargs))
        return real(self, *args, **kwargs)

    setattr(cls, method, guarded)


_guard(subprocess.Popen, "__init__", lambda self, args, *a, **k: f"a process ({str(args)[:120]})")
_guard(multiprocessing.process.BaseProcess, "start", lambda self: f"a worker process ({self.name})")


# `make test` hands whole modules (test classes) to its workers, in the order of the collected items: the
# heaviest first, so the last ones out are short and no worker ends the suite alone on a long one. A test
# that starts processes weighs 10 (they took 10-40 s, an in-process test well under 1 s; 2-core Zen 3).
# Measured (3 workers, quiet 2-core Zen 3): in the workers' alphabetical order the three ended 906, 957 and
# 1,018 s into the tests; in this one all three end within a second of each other (simulated on that run's
# module times: 960 s each, 52 s sooner).
SLOW_TEST_WEIGHT = 10


def _scope(item: pytest.Item) -> str:
    return item.nodeid.rsplit("::", 1)[0]  # pytest-xdist's loadscope unit: the module, or the test class


def _loadscope(config: pytest.Config) -> bool:
    """Whether pytest-xdist hands out whole scopes. A worker's own ``dist`` option reads "no" (xdist resets
    it), so a worker learns it from the controller (:func:`pytest_configure_node`). The scheduler hands the
    scopes out in the order the workers collected them: the order must be made there."""
    if hasattr(config, "workerinput"):
        return bool(config.workerinput.get("cifar_lab_loadscope"))
    return config.getoption("dist", "no") == "loadscope"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist's hook: the controller, before a worker starts
    node.workerinput["cifar_lab_loadscope"] = _loadscope(node.config)


def pytest_configure(config: pytest.Config) -> None:
    if _loadscope(config) and not hasattr(config, "workerinput"):
        config.option.loadscopereorder = False  # the scopes go out in the items' order, this file's


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _loadscope(config):
        return
    weights: dict[str, int] = {}
    for item in items:
        weight = SLOW_TEST_WEIGHT if item.get_closest_marker("slow") is not None else 1
        weights[_scope(item)] = weights.get(_scope(item), 0) + weight
    first = {scope: rank for rank, scope in enumerate(sorted(weights, key=lambda scope: -weights[scope]))}
    items.sort(key=lambda item: first[_scope(item)])  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _logging_as_found():
    """Every logger's level and propagation back as the test found them: a command run in-process
    (the bench's ``main`` quiets ``cifar_lab`` to warnings) must not change what a later test on the
    same worker captures (``caplog`` sees the records that reach the root logger). Handlers are
    pytest's own business (it swaps its capturing handler at every test phase)."""
    import logging

    def loggers() -> dict[str, logging.Logger]:
        return {"": logging.getLogger(), **{name: lg for name, lg in logging.root.manager.loggerDict.items()
                                            if isinstance(lg, logging.Logger)}}

    saved = {name: (lg.level, lg.propagate, lg.disabled) for name, lg in loggers().items()}
    yield
    for name, lg in loggers().items():  # a logger made during the test (`cifar_lab` itself, say): as new
        level, propagate, disabled = saved.get(name, (logging.NOTSET, True, False))
        if (lg.level, lg.propagate, lg.disabled) != (level, propagate, disabled):
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


@pytest.fixture(autouse=True)
def _signal_handlers_as_found():
    """Every test leaves every signal handler as it found it, and fails if it did not (the handler is put
    back first, so the tests after it run as usual). A run trained in-process once left Lightning's SIGTERM
    handler installed, which notes a SIGTERM and carries on: a Python session (a notebook, a test worker)
    that trained would ignore SIGTERM from then on."""
    # SIGCHLD: torch's DataLoader installs a handler once per process when it first starts worker
    # processes, by design for the process's lifetime (it calls the one it found first).
    signums = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD})
    found = {signum: signal.getsignal(signum) for signum in signums}
    yield
    left = {signum: signal.getsignal(signum) for signum in signums}
    changed = {signum: handler for signum, handler in left.items() if handler != found[signum]}
    for signum in changed:
        if found[signum] is not None:
            signal.signal(signum, found[signum])
    assert not changed, "the test left signal handlers behind: " + ", ".join(
        f"{signal.Signals(signum).name}: {handler!r} (was {found[signum]!r})" for signum, handler in changed.items())


def run_cli(args: list[str], tmp_path: Path, script: str = "train.py", timeout: int = 300,
            env: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, with logs under tmp_path; returns the finished process (forked
    from the zygote unless ``fresh``: see :func:`run_command`)."""
    full_env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200", **(env or {})}
    cmd = [sys.executable, script, *args] if script.endswith(".py") else [sys.executable, "-m", script, *args]
    return run_command(cmd, cwd=ROOT, env=full_env, timeout=timeout, fresh=fresh)


_ZYGOTE = Zygote()


def run_command(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None,
                fresh: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)``; a ``python SCRIPT``/``python -m MODULE``
    command is forked from the zygote (tests/zygote.py: the same process, less the 4 s of imports)
    unless ``fresh`` asks for a new interpreter (a test about start-up itself)."""
    env = dict(os.environ if env is None else env)
    if fresh or not runnable(argv):
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    _refuse_outside_slow_tests(f"a command ({str(argv)[:120]})")
    return _ZYGOTE.run(argv, cwd, env, timeout)


def start_command(argv: list[str], cwd: Path, env: dict[str, str], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL):
    """``subprocess.Popen(argv, text=True)`` for a ``python SCRIPT``/``python -m MODULE`` command, forked from
    the zygote (tests/zygote.py, :meth:`Zygote.popen`): for a test that signals the command or reads its output
    as it runs. One at a time in a test process."""
    assert runnable(argv), argv
    _refuse_outside_slow_tests(f"a command ({str(argv)[:120]})")
    return _ZYGOTE.popen(argv, cwd, env, stdout, stderr)


# The most the suite holds on disk at once (its tests' folders, each removed as the test passes), with
# room for the folders failing tests keep: `make test` peaked at 3.4 GB on 2026-12-06, the quick tier
# at well under 1 GB. A disk that fills midway turns every later test into an error.
DISK_NEEDED_GB = {"whole suite": 5.0, "quick tier": 1.5}


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the test modules imported and collected lives as long as the session: it goes to the collector's
    permanent generation, so the collections a test's run triggers walk only what the test made."""
    gc.freeze()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to start, in one line, on a disk without room for the run (the controller only)."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    where = Path(config.option.basetemp or tempfile.gettempdir()).resolve()
    while not where.exists():
        where = where.parent
    tier = "quick tier" if "not slow" in (config.option.markexpr or "") else "whole suite"
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < DISK_NEEDED_GB[tier]:
        pytest.exit(f"only {free_gb:.1f} GB free on the disk of {where}, where the tests write their runs; the "
                    f"{tier} needs about {DISK_NEEDED_GB[tier]:g} GB: free some space there (old "
                    f"pytest-of-* folders?) or point TMPDIR (or --basetemp) at a disk with room", returncode=4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _ZYGOTE.close()
    if SESSION_CACHE is not None:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


# Small, quick synthetic runs for end-to-end tests.
SYNTH = [
    "data=synthetic",
    "data.source.train_size=600",
    "data.source.test_size=200",
    "data.val_size=200",
    "model=simple_cnn",
    "trainer=cpu",
    # fixed, so results do not depend on what the machine measures fastest (tests/test_autotune.py
    # covers `auto`, the default)
    "trainer.precision=32",
    "module.memory_format=channels_last",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    # report figures no test of a run looks at: the misclassified grid and TensorBoard's validation confusion
    # matrix (drawing them took 1.0-1.6 s of a 4.0-4.7 s run of these settings, 2-core Zen 3); the tests of
    # the figures, and those that look for them, add FIGURES
    "callbacks.report.misclassified=0",
    "callbacks.report.val_confusion_every_n_epochs=0",
]
# the report figures of the default callbacks (conf/callbacks/default.yaml), after SYNTH
FIGURES = ["callbacks.report.misclassified=32", "callbacks.report.val_confusion_every_n_epochs=5"]
