"""Every project command the README (and docs/*.md) shows in a shell block runs, on a tiny synthetic run.

Which commands: each line (``\\``-continued lines joined, ``# comments`` dropped) of a fenced
``bash``/``sh``/``shell`` block in README.md and docs/*.md whose words start with a project command:
``python train.py``, ``python -m cifar_lab.<command>`` or ``make train``. Other lines (``pip install``,
``pytest``, ``tensorboard``, variable assignments) are not project commands and are not run. A project
command that cannot run here is skipped with its reason (:data:`CANNOT_RUN`, first match wins), so the
skip list is visible in the test report; ``python tests/test_readme.py`` prints every command with what
happens to it.

The substitution rule, the only changes made to a command (:func:`substitute`):

==================================  =================================================================
in the README                       in the test
==================================  =================================================================
data: ``data=<any>``,               ``data=synthetic`` (generated; ``data.root`` and
``data.root=...``                   ``data.source.*`` dropped) at the size of the variant below, with
                                    ``data.batch_size`` / ``data.eval_batch_size`` to match
epochs: ``trainer.max_epochs``      the variant's epochs; a per-epoch image-size schedule
                                    (``experiment=speedrun*``) is compressed to fit
                                    (``data.augment.resize.schedule=[[0,24],[1,null]]``)
paths: ``<run dir>``, ``<run>``,    the module's shared tiny run (trained once, by
``<... .ckpt ...>``, a teacher      ``python train.py experiment=speedrun`` at the smallest size)
paths: ``logs/.../<any name>``      ``logs/.../*``: every directory an earlier command made there
paths: ``input=``, ``output=``,     files in the test's temporary folder (``input=`` a folder of
``--out``, ``--plot``,              generated PNGs, ``parity.images=`` a generated ``.npy``);
``parity.images=``, ``logs/``       ``logs/`` is the module's log folder (``CIFAR_LAB_LOGS``)
==================================  =================================================================

A command may start with environment assignments (``PYTHONPATH=examples CIFAR_LAB_TRUSTED_PACKAGES=mylab
python train.py --config-dir examples/conf ...``): they are set for it (``PYTHONPATH`` ahead of the
test's own), and a ``key=logs/.../<name>`` value is the newest directory an earlier command made there.
``python -m cifar_lab.tune`` composes a training run, so it gets the data rule of ``train.py``.
``make train`` runs the Makefile's own recipe (its no-GPU default included) with this interpreter
(``PY=``) and without its install step (``-o install``); ``ARGS`` get the same rule. Commands run in
document order and share the module's files, so ``predict ckpt_path=model.onnx`` reads the file the
``export`` before it wrote.

Variants (``VARIANTS``): ``smallest`` (the default suite, every command): 32 training and 16 test
images, 1 epoch (2 with a size schedule), at most 2 training batches, sweeps cut to 2 jobs or trials
(``hydra.sweeper.n_trials``, ``hydra.sweeper.n_workers``, the first 2 values of a multirun's
``key=a,b,c`` list), robustness to 2 of the test images per corruption
and severity (``corruption.max_images``; every corruption and severity still runs); ``as_written`` (``slow``): the synthetic
source at its default size (2,000 + 500 images) and the command's own epochs, jobs and trials, with
epochs capped at 2 so a 420-epoch recipe stays a test; it runs with ``CIFAR_LAB_README_AS_WRITTEN=1``
(about half an hour on 2 cores). Measured speed settings are fixed in both
(``trainer.precision=32 module.memory_format=contiguous``): measuring them per network is
``tests/test_autotune.py``'s business.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import run_command

# every test here starts a process (a command, or a fixture's run made by the command line)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(?:bash|sh|shell)\s*\n(.*?)^```", re.S | re.M)

# (pattern in the command, why it cannot run in a hermetic test); the first match wins
CANNOT_RUN: list[tuple[str, str]] = [
    (r"^make (test|test-fast)\b", "runs this test suite itself"),
    (r"^make bench\b", "a timing benchmark (tests/test_bench.py runs it small)"),
    (r"http://|tracking_uri=", "needs a tracking server"),
    (r"hydra/launcher=slurm", "needs a SLURM cluster"),
    (r"\$STORAGE|postgresql://", "needs a database every machine reaches (tests/sweeps start their own)"),
    (r"trainer=(gpu|ddp)\b", "needs GPUs"),
    (r"model.pretrained=true|experiment=finetune_pretrained", "downloads ImageNet weights"),
    (r"cifar_lab\.(bench|zoo)\b", "a timing benchmark: measures the machine (tests/test_bench.py, "
                                   "tests/models/test_zoo.py run it small)"),
    (r"\.\.\.", "an elided command line (...)"),
    (r"<the best trial's overrides>", "needs the best overrides of a finished study (the command above it)"),
]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PROJECT = re.compile(r"^(python3? (train\.py|-m cifar_lab\.\w+)|make (train|test|test-fast|bench))\b")
SMALL_DATA = {"smallest": ["data.source.train_size=32", "data.source.test_size=16", "data.val_size=8",
                           "data.batch_size=8", "data.eval_batch_size=16"],
              "as_written": []}
FIXED = ["trainer.precision=32", "module.memory_format=contiguous"]
# as_written trains the report recipes at the synthetic source's size: about half an hour on 2 cores, so
# it runs when asked (CIFAR_LAB_README_AS_WRITTEN=1), like a benchmark, not in every test run
VARIANTS = ["smallest", pytest.param("as_written", marks=[
    pytest.mark.slow, pytest.mark.skipif(not os.environ.get("CIFAR_LAB_README_AS_WRITTEN"),
                                         reason="set CIFAR_LAB_README_AS_WRITTEN=1 to run every command as written")])]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def env(self) -> dict[str, str]:
        """The command's leading ``NAME=value`` assignments."""
        return dict(w.split("=", 1) for w in _leading_assignments(shlex.split(self.text, comments=True)))

    @property
    def reads_the_shared_run(self) -> bool:
        """Whether a placeholder of the command stands for the module's shared run (:func:`substitute`)."""
        return any(p in self.text for p in PLACEHOLDERS) or bool(re.search(TEACHER, self.text))

    def skip_reason(self) -> str | None:
        return next((why for pattern, why in CANNOT_RUN if re.search(pattern, self.text)), None)


def _leading_assignments(words: list[str]) -> list[str]:
    n = 0
    while n < len(words) and ASSIGNMENT.match(words[n]):
        n += 1
    return words[:n]


def project_commands() -> list[Command]:
    """Every project command of a shell block, in document order."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in BLOCK.finditer(text):
            first = text.count("\n", 0, block.start(1)) + 1
            lines = block.group(1).splitlines()
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                split = shlex.split(line, comments=True)
                words = " ".join(split[len(_leading_assignments(split)):])
                if PROJECT.match(words):
                    found.append(Command(doc.relative_to(ROOT).as_posix(), first + start, line.strip()))
    return found


COMMANDS = project_commands()


DROP = ("data=", "data.root", "data.source.", "trainer.max_epochs", "hydra.sweeper.n_trials",
        "hydra.sweeper.n_workers")
PATH_FLAGS = ("--out", "--plot", "--onnx")
PLACEHOLDERS = ("<run dir or .ckpt>", "<file.ckpt | run dir>", "<run dir>", "<run>")
TEACHER = r"(module\.distill\.teacher=)logs/\S*<[^>]+>"  # a teacher run named by a placeholder: the shared run
SPEEDRUN_SCHEDULE = "data.augment.resize.schedule=[[0,24],[1,null]]"
ROBUSTNESS_IMAGES = 2  # the smallest variant's corrupted images per corruption and severity (of its 32): the
# speedrun network runs its 10 test-time views on each (8 images: 14.1 s in corruption_accuracy, 2: 4.5 s)


def substitute(command: Command, variant: str, run_dir: Path, tmp: Path, logs: Path) -> list[str]:
    """The command's words after the substitution rule of the module docstring."""
    text = command.text
    for placeholder in PLACEHOLDERS:  # before splitting: a placeholder may hold spaces
        text = text.replace(placeholder, shlex.quote(str(run_dir)))
    text = re.sub(TEACHER, lambda m: m.group(1) + shlex.quote(str(run_dir)), text)
    text = re.sub(r"(logs/\S*?)<[^>]+>", r"\1*", text)  # logs/.../<name>: what earlier commands made there
    words = shlex.split(text, comments=True)
    words = words[len(_leading_assignments(words)):]
    make = words[:2] == ["make", "train"]
    if make:
        head = ["make", "-s", "-o", "install", "train", f"PY={sys.executable}"]
        given = shlex.split(next((w[len("ARGS="):] for w in words if w.startswith("ARGS=")), ""))
    else:
        head, given = [sys.executable], words[1:]
    args: list[str] = []
    for i, word in enumerate(given):
        after_flag = i > 0 and given[i - 1] in PATH_FLAGS
        args.extend([str(tmp / Path(word).name)] if after_flag else _word(word, tmp, logs))
    trains = make or args[:1] == ["train.py"]
    if args[:2] == ["-m", "cifar_lab.tune"]:  # composes a training run: the data rule of train.py
        kept = [w for w in args if not w.startswith(DROP)]
        return [*head, *kept, "data=synthetic", *SMALL_DATA[variant], *FIXED]
    if not trains:
        data = ["data=synthetic"] if any(w.startswith("data=") for w in args) else []
        kept = [w for w in args if not w.startswith(("data=", "data.root"))]
        return [*head, *_robustness_images(variant, kept), *data]
    # make train on a machine without a GPU trains the speedrun unless ARGS choose a model or experiment
    cpu_speedrun = make and not any(w.startswith(("model=", "experiment=", "+experiment=")) for w in args)
    speedrun = cpu_speedrun or any(re.match(r"\+?experiment=speedrun", w) for w in args)
    added = ["data=synthetic", *SMALL_DATA[variant], *_length(variant, args, speedrun), *_counts(variant, args),
             *FIXED]
    kept = _sweep_values(variant, [w for w in args if not w.startswith(DROP)])
    if make:
        return [*head, "ARGS=" + shlex.join([*kept, *added])]
    return [*head, *kept, *added]


def _word(word: str, tmp: Path, logs: Path) -> list[str]:
    key, sep, value = word.partition("=")
    if sep and key == "input":
        return [f"input={tmp / 'images'}"]
    if sep and key in ("output", "parity.images"):
        return [f"{key}={tmp / Path(value).name}"]
    if sep and key == "ckpt_path" and value.endswith((".onnx", ".pt")) and "/" not in value:
        return [f"ckpt_path={tmp / value}"]  # a file an earlier command exported
    if sep and value.startswith("logs/"):  # key=logs/.../<name>: the newest match an earlier command made
        found = sorted(glob.glob(str(logs / value[len("logs/"):])), key=os.path.getmtime)
        return [f"{key}={found[-1] if found else logs / value[len('logs/'):]}"]
    if word == "logs" or word.startswith("logs/"):
        pattern = str(logs / word[len("logs/"):]) if word != "logs" else str(logs)
        return sorted(glob.glob(pattern)) or [pattern]
    return [word]


def _length(variant: str, words: list[str], speedrun: bool) -> list[str]:
    schedule = [SPEEDRUN_SCHEDULE] if speedrun else []
    if variant == "smallest":
        return [f"trainer.max_epochs={2 if schedule else 1}", "+trainer.limit_train_batches=2", *schedule]
    written = next((int(w.split("=", 1)[1]) for w in words if w.startswith("trainer.max_epochs=")), 2)
    return [f"trainer.max_epochs={max(2 if schedule else 1, min(written, 2))}", *schedule]


def _robustness_images(variant: str, words: list[str]) -> list[str]:
    """``robustness=true`` at the smallest size: every corruption and severity on a few of the test images."""
    if variant != "smallest" or "robustness=true" not in words:
        return words
    return [*(w for w in words if not w.startswith("corruption.max_images=")),
            f"corruption.max_images={ROBUSTNESS_IMAGES}"]


SWEEP_LIST = re.compile(r"^([\w.+~/@-]+)=([^,\[\]{}()'\"]+(?:,[^,\[\]{}()'\"]+)+)$")  # key=a,b,c (a multirun list)


def _sweep_values(variant: str, words: list[str]) -> list[str]:
    """A multirun's listed values cut to their first 2 at the smallest size (``data.fold=0,1,2,3,4`` ->
    ``data.fold=0,1``): two jobs per list run the sweep as five do."""
    if variant != "smallest" or not {"-m", "--multirun"} & set(words):
        return words
    cut = lambda m: f"{m.group(1)}={','.join(m.group(2).split(',')[:2])}"  # noqa: E731
    return [SWEEP_LIST.sub(cut, w) for w in words]


def _counts(variant: str, words: list[str]) -> list[str]:
    counts = []
    for key in ("hydra.sweeper.n_trials", "hydra.sweeper.n_workers"):
        value = next((w.split("=", 1)[1] for w in words if w.startswith(key + "=")), None)
        if value is not None:
            counts.append(f"{key}={min(int(value), 2) if variant == 'smallest' else value}")
    if variant == "smallest" and any(w.startswith("hparams_search=") for w in words) and not any(
            c.startswith("hydra.sweeper.n_trials") for c in counts):
        counts.append("hydra.sweeper.n_trials=2")
    return counts


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The commands' log root, removed when the module is done if none of its tests failed (as
    ``tmp_path_retention_policy = "failed"`` does for each test's own folder): the runs take a few GB."""
    root, failed = tmp_path_factory.mktemp("readme"), request.session.testsfailed
    yield root / "logs"
    if request.session.testsfailed == failed:
        shutil.rmtree(root, ignore_errors=True)


def _env(logs: Path, own: dict[str, str] | None = None) -> dict[str, str]:
    own = dict(own or {})
    first = [str(ROOT / p) for p in own.pop("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, **own, "CIFAR_LAB_LOGS": str(logs), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join([*first, str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def shared_run(logs: Path) -> Path:
    """The run `<run dir>` stands for: the speedrun (make train on a CPU), at the smallest size."""
    command = Command("README.md", 0, "python train.py experiment=speedrun")
    args = substitute(command, "smallest", Path("unused"), logs.parent, logs)
    proc = run_command(args, ROOT, _env(logs), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(re.findall(r"^Run directory: (.+)$", proc.stdout, re.M)[-1])


@pytest.fixture(scope="module")
def inputs(logs: Path) -> Path:
    """The files commands read and write: a folder of images to predict, a .npy of images for
    parity, and what commands write (shared: a file one command exports, a later one reads)."""
    from torchvision.io import write_png
    import torch

    tmp_path = logs.parent / "files"
    folder = tmp_path / "images"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    for i, image in enumerate(images):
        write_png(image, str(folder / f"{i}.png"))
    np.save(tmp_path / "extra.npy", images.permute(0, 2, 3, 1).numpy())
    return tmp_path


# ----------------------------------------------------------------------------- the test


def test_the_readme_shows_commands_of_every_kind() -> None:
    """The rule finds what the README documents (a regression in the extraction would run nothing)."""
    texts = [c.text for c in COMMANDS]
    for start in ("python train.py", "python -m cifar_lab.evaluate", "python -m cifar_lab.predict",
                  "python -m cifar_lab.export", "python -m cifar_lab.compare", "make train"):
        assert any(t.startswith(start) for t in texts), start
    assert any(c.skip_reason() for c in COMMANDS) and any(not c.skip_reason() for c in COMMANDS)


def test_the_rule_changes_only_data_epochs_and_paths(tmp_path: Path) -> None:
    run, logs = tmp_path / "run dir", tmp_path / "logs"
    (logs / "speedrun" / "runs" / "a").mkdir(parents=True)
    train = Command("README.md", 1, "python train.py experiment=speedrun data=imagefolder data.root=/x "
                                    "trainer.max_epochs=9 optimizer.lr=0.1  # a comment")
    assert substitute(train, "smallest", run, tmp_path, logs) == [
        sys.executable, "train.py", "experiment=speedrun", "optimizer.lr=0.1", "data=synthetic",
        *SMALL_DATA["smallest"], "trainer.max_epochs=2", "+trainer.limit_train_batches=2", SPEEDRUN_SCHEDULE, *FIXED]
    assert substitute(train, "as_written", run, tmp_path, logs)[-5:] == [
        "data=synthetic", "trainer.max_epochs=2", SPEEDRUN_SCHEDULE, *FIXED]
    sweep = Command("README.md", 1, "python train.py hparams_search=optuna hydra.sweeper.n_trials=20")
    assert "hydra.sweeper.n_trials=2" in substitute(sweep, "smallest", run, tmp_path, logs)
    assert "hydra.sweeper.n_trials=20" in substitute(sweep, "as_written", run, tmp_path, logs)
    folds = Command("README.md", 1, "python train.py -m experiment=simple_cnn data.folds=5 data.fold=0,1,2,3,4 "
                                    "model=simple_cnn,simple_cnn_bn tags=[a,b,c] \"notes='x,y,z'\"")
    assert substitute(folds, "smallest", run, tmp_path, logs)[2:8] == [
        "-m", "experiment=simple_cnn", "data.folds=5", "data.fold=0,1", "model=simple_cnn,simple_cnn_bn",
        "tags=[a,b,c]"]
    assert "notes='x,y,z'" in substitute(folds, "smallest", run, tmp_path, logs)  # Hydra's quoted value: one value
    assert "data.fold=0,1,2,3,4" in substitute(folds, "as_written", run, tmp_path, logs)
    single = Command("README.md", 1, "python train.py experiment=simple_cnn notes=x,y")
    assert "notes=x,y" in substitute(single, "smallest", run, tmp_path, logs)  # no -m: not a sweep
    evaluate = Command("README.md", 1, "python -m cifar_lab.evaluate ckpt_path=<run dir> output=x/model.onnx")
    assert substitute(evaluate, "smallest", run, tmp_path, logs)[1:] == [
        "-m", "cifar_lab.evaluate", f"ckpt_path={run}", f"output={tmp_path / 'model.onnx'}"]
    robust = Command("docs/deploy.md", 1, "python -m cifar_lab.evaluate ckpt_path=<run dir> robustness=true "
                                          "corruption.max_images=1000")
    assert substitute(robust, "smallest", run, tmp_path, logs)[1:] == [
        "-m", "cifar_lab.evaluate", f"ckpt_path={run}", "robustness=true", f"corruption.max_images={ROBUSTNESS_IMAGES}"]
    assert substitute(robust, "as_written", run, tmp_path, logs)[-1] == "corruption.max_images=1000"
    compare = Command("README.md", 1, "python -m cifar_lab.compare logs/*/runs/* --out compare.md")
    assert substitute(compare, "smallest", run, tmp_path, logs)[1:] == [
        "-m", "cifar_lab.compare", str(logs / "speedrun" / "runs" / "a"), "--out", str(tmp_path / "compare.md")]
    make = Command("README.md", 1, 'make train ARGS="model=simple_cnn trainer.max_epochs=5"')
    assert substitute(make, "smallest", run, tmp_path, logs) == [
        "make", "-s", "-o", "install", "train", f"PY={sys.executable}",
        "ARGS=" + shlex.join(["model=simple_cnn", "data=synthetic", *SMALL_DATA["smallest"], "trainer.max_epochs=1",
                              "+trainer.limit_train_batches=2", *FIXED])]


def _document_commands(doc: str) -> type:
    """The commands of one document as a test class: a document's commands run in their order on one test
    worker (a later command reads what an earlier one made), and the documents run side by side."""

    class DocumentCommands:
        @pytest.mark.parametrize("variant", VARIANTS)
        @pytest.mark.parametrize("command", [c for c in COMMANDS if c.doc == doc],
                                 ids=[c.id for c in COMMANDS if c.doc == doc])
        def test_command_runs(self, command: Command, variant: str, logs: Path, inputs: Path,
                              request: pytest.FixtureRequest) -> None:
            reason = command.skip_reason()
            if reason:
                pytest.skip(f"{command.text}: {reason}")
            # the shared run is trained when a command first needs it (a document without one trains none)
            run_dir = request.getfixturevalue("shared_run") if command.reads_the_shared_run else Path("<no run>")
            args = substitute(command, variant, run_dir, inputs, logs)
            proc = run_command(args, ROOT, _env(logs, command.env), timeout=900)
            shown = f"{command.id}: {command.text}\nran: {shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            assert proc.returncode == 0, shown
            assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr, shown

    DocumentCommands.__name__ = DocumentCommands.__qualname__ = "TestCommandsOf_" + re.sub(r"\W", "_", doc)
    return DocumentCommands


for _doc in dict.fromkeys(c.doc for c in COMMANDS):
    _class = _document_commands(_doc)
    globals()[_class.__name__] = _class


if __name__ == "__main__":  # the list of commands and what the test does with each
    for c in COMMANDS:
        reason = c.skip_reason()
        print(f"{c.id:22} {'skipped: ' + reason if reason else 'runs'}\n    {c.text}")
