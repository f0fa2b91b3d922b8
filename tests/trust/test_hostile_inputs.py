"""The hostile-input corpus (tests/trust/hostile.py) against every command that reads saved state.

For each input and command: the documented exit code (2 for a refusal), one ``Error:`` line and no
traceback, no marker file from a payload, and every file outside the job's own new directory byte
for byte as it was (the run that was attacked, the victim folder, the inputs).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import hostile
from cifar_lab.cli import evaluate, export, predict
from cifar_lab.cli.train import main_guarded
from conftest import SYNTH, compose_cfg, run_cli, start_command

# every test here starts a process (a command, or a fixture's run made by the command line)
pytestmark = pytest.mark.slow

# fc_units=32: a 1.7 MB checkpoint instead of 25 MB; each of the 300-odd cases copies the run (two
# checkpoints) and hashes it before and after
QUICK = [*SYNTH, "data.source.train_size=300", "data.source.test_size=100", "data.val_size=100",
         "model.fc_units=32", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run made by the command line, as a user has it."""
    root = tmp_path_factory.mktemp("pristine")
    proc = run_cli([*QUICK, f"hydra.run.dir={root / 'run'}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


class World:
    """Everything outside the job's own new directory: the run, a victim folder, an input file."""

    def __init__(self, tmp_path: Path, pristine: Path) -> None:
        self.root = tmp_path / "world"
        self.run = self.root / "run"
        shutil.copytree(pristine, self.run)
        self.victim = self.root / "victim"
        (self.victim / "sub").mkdir(parents=True)
        (self.victim / "precious.txt").write_text("do not touch\n")
        (self.victim / "sub" / "more.txt").write_text("nor this\n")
        self.input = self.root / "images.npy"
        np.save(self.input, np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
        self.marker = self.root / "MARKER"
        self.job = tmp_path / "job"

    def snapshot(self, skip: Path | None = None) -> dict[str, str]:
        files = {}
        for path in sorted(self.root.rglob("*")):
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_symlink():
                files[str(path)] = "-> " + str(path.readlink())
            elif path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                files[str(path)] = "dir"
        return files


@pytest.fixture
def world(tmp_path: Path, pristine: Path) -> World:
    return World(tmp_path, pristine)


def _train(overrides: list[str], run_dir: Path) -> None:
    main_guarded(compose_cfg(overrides, run_dir))


COMMANDS: dict[str, Callable[[World], None]] = {
    "evaluate": lambda w: evaluate.main([f"ckpt_path={w.run}", f"hydra.run.dir={w.job}",
                                         "trainer.enable_progress_bar=false"]),
    "predict": lambda w: predict.main([f"ckpt_path={w.run}", f"input={w.input}", f"output={w.job / 'p.csv'}",
                                       f"hydra.run.dir={w.job}"]),
    "export": lambda w: export.main([f"ckpt_path={w.run}", "format=torchscript", f"output={w.job / 'm.pt'}",
                                     "parity.limit=8", f"hydra.run.dir={w.job}"]),
    "init_from": lambda w: _train([*QUICK, f"init_from={w.run}"], w.job),
    "resume": lambda w: _train([*QUICK, f"ckpt_path={w.run}", "trainer.max_epochs=2"], w.job),
}
# commands that read the stored overrides (resume and init_from take only the checkpoint's config)
REPLAYING = ("evaluate", "predict", "export")


def invoke(command: Callable[[World], None], world: World, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a command in this process as its entry point would; its exit code and its stderr."""
    capsys.readouterr()
    handlers = {name: list(logging.getLogger(name).handlers) for name in ("", "cifar_lab", "lightning")}
    try:
        command(world)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:  # the command line's logging set-up writes to this test's captured streams: undo it
        for name, kept in handlers.items():
            logging.getLogger(name).handlers = kept
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err


def _cases(families: dict, commands: tuple[str, ...]) -> list:
    return [pytest.param(f, c, id=f"{f}-{c}") for f in families for c in commands]


# ----------------------------------------------------------------------------- interpolation
_HPARAMS = [name for name in hostile.INTERPOLATIONS if name.startswith(("hparams", "hydra_config"))]
_OVERRIDES = [name for name in hostile.INTERPOLATIONS if name not in _HPARAMS]


@pytest.mark.parametrize("family, command", _cases(dict.fromkeys(_HPARAMS), tuple(COMMANDS))
                         + _cases(dict.fromkeys(_OVERRIDES), REPLAYING))
def test_interpolations_in_saved_data_are_refused(world: World, capsys, family: str, command: str) -> None:
    hostile.INTERPOLATIONS[family](world.run, world.marker)
    before = world.snapshot()
    code, err = invoke(COMMANDS[command], world, capsys)
    assert_refused(code, err)
    assert "saved" in err or "refers" in err or "interpolat" in err
    assert not world.marker.exists() and world.snapshot() == before
    assert not list(world.job.glob("*.log"))  # a refused command opens no log file


# ----------------------------------------------------------------------------- replay
@pytest.mark.parametrize("family, command", _cases(hostile.replay_overrides(Path("victim")), REPLAYING))
def test_stored_overrides_never_aim_the_command_elsewhere(world: World, capsys, family: str, command: str) -> None:
    hostile.add_override(world.run, hostile.replay_overrides(world.victim)[family])
    before = world.snapshot()
    code, err = invoke(COMMANDS[command], world, capsys)
    assert code == 0, err[-3000:]
    assert world.snapshot() == before  # nothing written to the victim, the run or anywhere else
    assert world.job.is_dir()


@pytest.mark.parametrize("family, command", _cases(hostile.UNSHIPPED_CHOICES, REPLAYING))
def test_stored_group_choices_must_be_shipped_options(world: World, capsys, family: str, command: str) -> None:
    hostile.add_override(world.run, hostile.UNSHIPPED_CHOICES[family])
    before = world.snapshot()
    code, err = invoke(COMMANDS[command], world, capsys)
    assert_refused(code, err)
    assert "shipped" in err and world.snapshot() == before


# ----------------------------------------------------------------------------- callback state
@pytest.mark.parametrize("family", list(hostile.callback_state_paths(Path("victim"))))
def test_resume_removes_nothing_a_checkpoint_state_names_outside_the_run(world: World, capsys,
                                                                           family: str) -> None:
    hostile.edit_checkpoint_callback_state(world.run, hostile.callback_state_paths(world.victim)[family])
    before = world.snapshot(skip=world.run)
    code, err = invoke(lambda w: _train([*QUICK, "ckpt_path=last", "trainer.max_epochs=3"], w.run), world, capsys)
    assert code == 0, err[-3000:]
    assert (world.victim / "precious.txt").read_text() == "do not touch\n"
    assert world.snapshot(skip=world.run) == before
    assert (world.run / "checkpoints" / "last.ckpt").is_file()


# ----------------------------------------------------------------------------- run directories
@pytest.mark.parametrize("relative", hostile.SYMLINKED)
def test_a_run_directory_holding_a_link_is_refused(world: World, capsys, relative: str) -> None:
    hostile.symlink(world.run, relative, world.victim)
    before = world.snapshot()
    code, err = invoke(lambda w: _train([*QUICK, "ckpt_path=last", "trainer.max_epochs=2"], w.run), world, capsys)
    assert_refused(code, err)
    assert "symbolic link" in err and world.snapshot() == before


def test_a_new_run_into_a_finished_one_is_refused(world: World, capsys) -> None:
    before = world.snapshot()
    code, err = invoke(lambda w: _train(QUICK, w.run), world, capsys)
    assert_refused(code, err)
    assert "already holds a run" in err and "ckpt_path=last" in err and "init_from=" in err
    assert world.snapshot() == before


def test_a_refused_resume_changes_nothing_in_the_run(world: World, capsys) -> None:
    """Missing data is found after the lock is taken: the directory (no lock file either) stays as it was."""
    before = world.snapshot()
    no_data = [*(o for o in QUICK if not o.startswith("data.source")), "data=imagefolder"]
    code, err = invoke(lambda w: _train([*no_data, f"data.root={w.root / 'nowhere'}", "ckpt_path=last",
                                         "trainer.max_epochs=2"], w.run), world, capsys)
    assert code == 2, err[-3000:]
    assert world.snapshot() == before and not (world.run / ".lock").exists()


# ----------------------------------------------------------------------------- outputs and inputs
OUTPUT_IS_INPUT = {
    "export_over_its_checkpoint": lambda w: export.main([f"ckpt_path={w.run}", "format=torchscript",
                                                         f"output={hostile.checkpoints_of(w.run)[0]}",
                                                         f"hydra.run.dir={w.job}"]),
    "export_over_its_parity_images": lambda w: export.main([f"ckpt_path={w.run}", "format=torchscript",
                                                            f"output={w.input}", f"parity.images={w.input}",
                                                            f"hydra.run.dir={w.job}"]),
    "predict_over_its_input": lambda w: predict.main([f"ckpt_path={w.run}", f"input={w.input}",
                                                      f"output={w.input}", f"hydra.run.dir={w.job}"]),
    "predict_over_its_checkpoint": lambda w: predict.main([f"ckpt_path={hostile.checkpoints_of(w.run)[0]}",
                                                           f"input={w.input}",
                                                           f"output={hostile.checkpoints_of(w.run)[0]}",
                                                           f"hydra.run.dir={w.job}"]),
}


@pytest.mark.parametrize("case", list(OUTPUT_IS_INPUT))
def test_an_output_that_is_an_input_is_refused(world: World, capsys, case: str) -> None:
    before = world.snapshot()
    code, err = invoke(OUTPUT_IS_INPUT[case], world, capsys)
    assert_refused(code, err)
    assert "destroy the input" in err and world.snapshot() == before


# ----------------------------------------------------------------------------- bombs
@pytest.mark.parametrize("file", [".hydra/overrides.yaml", ".hydra/config.yaml"])
def test_a_yaml_alias_bomb_is_refused_at_once(world: World, capsys, file: str) -> None:
    (world.run / file).write_text(hostile.yaml_bomb())
    if file.endswith("config.yaml"):  # read only when the checkpoint lacks its config
        hostile.edit_checkpoints(world.run, lambda c: c["hyper_parameters"].pop("model"))
    before = world.snapshot()
    code, err = invoke(COMMANDS["evaluate"], world, capsys)
    assert_refused(code, err)
    # refused by the loader, before any alias is followed (the expansion would be 10**9 strings)
    assert "aliases are not allowed" in err and world.snapshot() == before


def test_compare_skips_a_config_bomb_with_a_warning(world: World, tmp_path: Path) -> None:
    (world.run / "config.yaml").write_text(hostile.yaml_bomb())
    proc = run_cli([str(world.run), "--out", str(tmp_path / "cmp.md")], tmp_path, script="cifar_lab.compare",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aliases are not allowed" in proc.stderr + proc.stdout


def test_an_image_declaring_huge_dimensions_is_refused_before_decoding(world: World, capsys) -> None:
    folder = world.root / "bombs"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(hostile.png_bomb())
    before = world.snapshot()
    code, err = invoke(lambda w: predict.main([f"ckpt_path={w.run}", f"input={folder}", f"output={w.job / 'p.csv'}",
                                               f"hydra.run.dir={w.job}"]), world, capsys)
    assert_refused(code, err)
    assert "declares" in err and "4096x4096" in err and world.snapshot() == before


def test_a_batch_larger_than_the_training_set_is_refused_before_autotune(world: World, capsys) -> None:
    code, err = invoke(lambda w: _train([*QUICK, "data.batch_size=100000", "trainer.precision=auto"], w.job),
                       world, capsys)
    assert_refused(code, err)
    assert "data.batch_size=100000 is larger than the training set (200 images)" in err
    assert not (world.job / "metrics.json").exists()


# ----------------------------------------------------------------------------- settings no work can use
def _evaluate_tta(*overrides: str) -> Callable[[World], None]:
    return lambda w: evaluate.main([f"ckpt_path={w.run}", f"hydra.run.dir={w.job}", "tta.enabled=true", *overrides])


def _predict_tta(*overrides: str) -> Callable[[World], None]:
    return lambda w: predict.main([f"ckpt_path={w.run}", f"input={w.input}", f"output={w.job / 'p.csv'}",
                                   f"hydra.run.dir={w.job}", "tta.enabled=true", *overrides])


IMPOSSIBLE = {
    "evaluate_tta_translate_negative": _evaluate_tta("tta.translate=-2"),
    "evaluate_tta_translate_past_the_image": _evaluate_tta("tta.translate=20"),
    "evaluate_tta_padding_mode": _evaluate_tta("tta.padding_mode=mirror"),
    "evaluate_tta_unknown_key": _evaluate_tta("+tta.shift=[[1,1]]"),
    "evaluate_tta_shifts_not_pairs": _evaluate_tta("tta.shifts=[1,2]"),
    "evaluate_tta_shifts_past_half_the_image": _evaluate_tta("tta.shifts=[[0,16]]"),
    "predict_tta_translate": _predict_tta("tta.translate=40"),
    "predict_tta_unknown_key": _predict_tta("+tta.views=18"),
    "predict_tta_shifts": _predict_tta("tta.shifts=[[1,x]]"),
    "predict_cuda_without_gpu": lambda w: predict.main([f"ckpt_path={w.run}", f"input={w.input}", "device=cuda:3",
                                                        f"output={w.job / 'p.csv'}", f"hydra.run.dir={w.job}"]),
    "export_opset": lambda w: export.main([f"ckpt_path={w.run}", "format=onnx", "opset=99",
                                           f"output={w.job / 'm.onnx'}", f"hydra.run.dir={w.job}"]),
    "export_under_a_file": lambda w: export.main([f"ckpt_path={w.run}", "format=torchscript",
                                                  f"output={w.input}/m.pt", f"hydra.run.dir={w.job}"]),
    "evaluate_self_reference": lambda w: evaluate.main([f"ckpt_path={w.run}", f"hydra.run.dir={w.job}",
                                                        "data.eval_batch_size=${data.eval_batch_size}"]),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_settings_no_work_can_use_are_one_line(world: World, capsys, case: str) -> None:
    if case.endswith("without_gpu") and __import__("torch").cuda.device_count() > 3:
        pytest.skip("this machine has that GPU")
    before = world.snapshot()
    code, err = invoke(IMPOSSIBLE[case], world, capsys)
    assert_refused(code, err)
    assert world.snapshot() == before and not (world.job / "metrics.json").exists()


@pytest.mark.parametrize("key, value", [("class_names", "not json ["), ("image_size", "huge"),
                                        ("class_names", '{"a": 1}'), ("image_size", "100000")])
def test_a_malformed_exported_model_is_one_line(world: World, capsys, tmp_path: Path, key: str, value: str) -> None:
    import onnx

    model = tmp_path / "model.onnx"
    code, err = invoke(lambda w: export.main([f"ckpt_path={w.run}", "format=onnx", f"output={model}",
                                              "parity.limit=8", f"hydra.run.dir={w.job}"]), world, capsys)
    assert code == 0, err[-3000:]
    proto = onnx.load(str(model))
    next(p for p in proto.metadata_props if p.key == key).value = value
    onnx.save(proto, str(model))
    code, err = invoke(lambda w: predict.main([f"ckpt_path={model}", f"input={w.input}", f"output={w.job / 'p.csv'}",
                                               f"hydra.run.dir={w.job}"]), world, capsys)
    assert_refused(code, err)
    assert "metadata is malformed" in err and not (world.job / "p.csv").exists()


# ----------------------------------------------------------------------------- whole or absent
def test_export_keeps_an_existing_file_when_parity_fails(world: World, capsys) -> None:
    out = world.root / "model.pt"
    out.write_bytes(b"the previous export")
    before = world.snapshot()
    code, err = invoke(lambda w: export.main([f"ckpt_path={w.run}", "format=torchscript", f"output={out}",
                                              "parity.limit=8", "parity.tolerance=-1", f"hydra.run.dir={w.job}"]),
                       world, capsys)
    assert_refused(code, err)
    assert "was left as it was" in err
    after = world.snapshot()
    assert {k: v for k, v in after.items() if not k.endswith(".parity.json")} == before
    assert not [p for p in world.root.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "predict"])
def test_kill_9_while_writing_leaves_the_previous_file(world: World, tmp_path: Path, command: str) -> None:
    """The command is killed as its temporary output is created (tests/kill_at_write.py): the previous file is
    intact."""
    import glob
    import signal

    out = world.root / ("model.pt" if command == "export" else "p.csv")
    out.write_bytes(b"the previous output")
    args = ([f"ckpt_path={world.run}", "format=torchscript", f"output={out}", "parity.limit=100"]
            if command == "export" else [f"ckpt_path={world.run}", f"input={world.input}", f"output={out}"])
    temporary = glob.escape(str(world.root)) + f"/.{out.name}.*"
    log = tmp_path / "killed"
    proc = run_cli(["written", temporary, "1", "-m", f"cifar_lab.{command}", *args, f"hydra.run.dir={world.job}"],
                   tmp_path, script="tests/kill_at_write.py", env={"KILL_AT_WRITE_LOG": str(log)})
    assert proc.returncode == -signal.SIGKILL and log.is_file(), proc.stderr[-3000:]
    assert out.read_bytes() == b"the previous output"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_ctrl_c_exits_130_and_replaces_nothing(world: World, tmp_path: Path, command: str) -> None:
    """Ctrl-C once evaluate logs what it evaluates, or as export creates its temporary output
    (tests/kill_at_write.py): exit 130, no traceback, the previous file intact."""
    import glob
    import os
    import signal
    import subprocess
    import sys

    out = world.root / "model.pt"
    out.write_bytes(b"the previous export")
    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"}
    if command == "evaluate":  # its work has begun once it logs what it evaluates
        proc = start_command([sys.executable, "-m", "cifar_lab.evaluate", f"ckpt_path={world.run}", "robustness=true",
                              "corruption.severities=[1,2,3,4,5]", f"hydra.run.dir={world.job}"],
                             Path.cwd(), env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "evaluating " in line:
                    break
            os.kill(proc.pid, signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        returncode = proc.returncode
    else:  # export: as its temporary output is created
        temporary = glob.escape(str(world.root)) + f"/.{out.name}.*"
        done = run_cli(["interrupt", temporary, "1", "-m", "cifar_lab.export", f"ckpt_path={world.run}",
                        "format=torchscript", f"output={out}", f"hydra.run.dir={world.job}"], tmp_path,
                       script="tests/kill_at_write.py", env={"KILL_AT_WRITE_LOG": str(tmp_path / "interrupted")})
        assert (tmp_path / "interrupted").is_file(), done.stderr[-3000:]
        output, returncode = done.stdout + done.stderr, done.returncode
    assert returncode == 130, output[-3000:]
    assert "Traceback" not in output and out.read_bytes() == b"the previous export"


# ----------------------------------------------------------------------------- crafted exported models
@pytest.mark.parametrize("name", hostile.crafted_onnx_names())
def test_a_crafted_onnx_model_is_one_line(tmp_path: Path, capsys, name: str) -> None:
    """Allocations no machine makes, a missing ``probs`` output, another rank, class count or input: one line."""
    model = hostile.crafted_onnx(name, tmp_path / "model.onnx")
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "job" / "p.csv"
    code, err = invoke(lambda w: predict.main([f"ckpt_path={model}", f"input={images}", f"output={out}",
                                               f"hydra.run.dir={tmp_path / 'job'}"]), None, capsys)
    assert_refused(code, err)
    assert str(model) in err and "export the model again" in err and not out.exists()


# ----------------------------------------------------------------------------- sweep storage
@pytest.mark.parametrize("case", list(hostile.storage_settings(Path("v"), Path("e"))))
def test_a_storage_no_study_can_live_in_is_one_line_and_creates_nothing(tmp_path: Path, monkeypatch,
                                                                        case: str) -> None:
    from cifar_lab.errors import ConfigError
    from cifar_lab.sweeps.storage import open_storage, resolve_storage

    victim, elsewhere, cwd = tmp_path / "victim", tmp_path / "elsewhere", tmp_path / "cwd"
    for folder in (victim, elsewhere, cwd):
        folder.mkdir()
    (victim / "precious.txt").write_text("do not touch\n")
    monkeypatch.chdir(cwd)
    setting = hostile.storage_settings(victim, elsewhere)[case]
    with pytest.raises(ConfigError) as refused:
        open_storage(resolve_storage(setting, tmp_path / "sweep"))
    assert "\n" not in str(refused.value) and "hydra.sweeper.storage" in str(refused.value)
    assert list(cwd.iterdir()) == [] and list(elsewhere.iterdir()) == []
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]


def test_an_sqlite_uri_filename_is_the_file_it_names(tmp_path: Path, monkeypatch) -> None:
    """``sqlite:///file:<path>?uri=true``: the study is <path>, not a folder named ``file:`` in the working one."""
    import optuna

    from cifar_lab.sweeps.storage import open_storage, resolve_storage

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for url, made in ((f"sqlite:///file:{tmp_path}/new/a.db?mode=rwc&uri=true", tmp_path / "new" / "a.db"),
                      ("sqlite:///file:rel/b%20c.db?uri=true", cwd / "rel" / "b c.db")):
        optuna.create_study(storage=open_storage(resolve_storage(url, tmp_path / "sweep")), study_name="s")
        assert made.is_file(), url
    assert sorted(p.name for p in cwd.iterdir()) == ["rel"]


# ----------------------------------------------------------------------------- Ctrl-C while starting
STARTING = [("train.py", "torch"), ("train.py", "lightning"), ("train.py", "hydra"),
            *((f"-m cifar_lab.{name}", "torch") for name in ("evaluate", "predict", "export", "compare", "tune",
                                                             "zoo", "bench")),
            ("-m cifar_lab.export", "hydra")]


@pytest.mark.slow
@pytest.mark.parametrize("command, module", STARTING)
def test_ctrl_c_while_a_command_loads_its_libraries_is_one_line(tmp_path: Path, command: str, module: str) -> None:
    """SIGINT arrives as the command starts importing ``module`` (tests/kill_at_write.py's import hook)."""
    proc = run_cli(["import", module, "1", *command.split()], tmp_path, script="tests/kill_at_write.py",
                   fresh=True)  # a fresh interpreter: the imports are what is interrupted
    assert proc.returncode == 130, proc.stderr[-3000:]
    name = command if command.endswith(".py") else command.split(".")[-1]
    expected = f"Error: interrupted (Ctrl-C) while {name} was starting; nothing was done"
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- murky messages
def test_the_lr_finder_runs_its_steps_whatever_the_run_limits(tmp_path: Path) -> None:
    """A run of one epoch of two batches (and validation) still gives the range test all of --steps."""
    from cifar_lab.cli.tune import find_lr

    steps = 14  # Lightning suggests from 12 points on
    for limits in (["trainer.max_epochs=1", "++trainer.limit_train_batches=2"], ["++trainer.max_steps=3"],
                   ["trainer.max_epochs=1", "++trainer.limit_train_batches=0.5", "++trainer.limit_val_batches=2"]):
        cfg = compose_cfg([*QUICK, "logger=none", *limits], tmp_path / "tune")
        result = find_lr(cfg, tmp_path / "tune", steps, 1e-6, 1e-4)
        assert len(result["lr"]) == steps, limits


@pytest.mark.parametrize("override, named", [("++trainer.limit_train_batches=0", "trainer.limit_train_batches=0"),
                                             ("++trainer.max_time=00:00:01:00", "trainer.max_time=")])
def test_the_lr_finder_refuses_limits_it_cannot_honour_in_one_line(tmp_path: Path, override: str,
                                                                   named: str) -> None:
    from cifar_lab.cli.tune import find_lr
    from cifar_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(named)):
        find_lr(compose_cfg([*QUICK, "logger=none", override], tmp_path / "tune"), tmp_path / "tune", 5, 1e-6, 1e-4)
    assert not (tmp_path / "tune").exists()


NOT_NUMBERS = {  # a YAML spelling of nan/inf (a string to Hydra), nan/inf themselves, numbers in quotes
    "optimizer.lr=.nan": "optimizer.lr", "optimizer.lr=nan": "optimizer.lr", "optimizer.lr=inf": "optimizer.lr",
    "optimizer.weight_decay=-.inf": "optimizer.weight_decay", "optimizer.lr='0.1'": "optimizer.lr",
    "optimizer.momentum=.nan": "optimizer.momentum", "scheduler.scheduler.eta_min=.inf": "scheduler.scheduler.eta_min",
    "module.label_smoothing=nan": "module.label_smoothing", "data.source.noise=.NaN": "data.source.noise",
    "++model.dropout=.nan": "model.dropout", "trainer.gradient_clip_val=nan": "trainer.gradient_clip_val",
    "module.distill.temperature=.inf": "module.distill.temperature",
}


@pytest.mark.parametrize("override", list(NOT_NUMBERS))
def test_a_setting_that_is_not_a_finite_number_is_named(override: str) -> None:
    from cifar_lab.config.schema import find_problems

    overrides = [*QUICK, "optimizer=sgd"] if "momentum" in override else QUICK
    problems = find_problems(compose_cfg([*overrides, override]))
    key = NOT_NUMBERS[override]
    assert any(p.startswith(f"{key}=") and "finite number" in p for p in problems), problems


@pytest.mark.parametrize("setting", ["init_from", "module.distill.teacher", "ckpt_path"])
def test_a_missing_checkpoint_is_named_by_the_setting_that_gave_it(tmp_path: Path, capsys, setting: str) -> None:
    missing = tmp_path / "no" / "such.ckpt"
    code, err = invoke(lambda w: _train([*QUICK, f"++{setting}={missing}"], tmp_path / "job"), None, capsys)
    assert_refused(code, err)
    assert f"Error: {setting}={missing}: no" in err


@pytest.mark.parametrize("overrides", [["data.fold=1"], ["data.fold=3", "data.folds=0"]])
def test_a_fold_without_folds_is_refused(overrides: list[str]) -> None:
    from cifar_lab.config.schema import find_problems

    problems = find_problems(compose_cfg([*QUICK, *overrides]))
    assert any(p.startswith("data.fold=") and "data.folds" in p for p in problems), problems


# ----------------------------------------------------------------------------- spreadsheet formulas
@pytest.mark.parametrize("start", list(hostile.FORMULAS))
def test_predict_never_writes_a_live_spreadsheet_formula(tmp_path: Path, capsys, start: str) -> None:
    """Class names from an exported model's metadata and file names from the input folder: neutralised."""
    import csv

    import torch
    from torchvision.io import write_png

    formula = hostile.FORMULAS[start]
    model = hostile.formula_classifier(tmp_path / "model.onnx", formula)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):  # file names with the formula's first character
        write_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), str(folder / f"{formula[0]}x{i}.png"))
    out = tmp_path / "p.csv"
    code, err = invoke(lambda w: predict.main([f"ckpt_path={model}", f"input={folder}", f"output={out}",
                                               "include_file=true", f"hydra.run.dir={tmp_path / 'job'}"]), None, capsys)
    assert code == 0, err[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 3
    for _, label, file in rows:
        assert label.startswith("'" + formula) and file.startswith("'" + formula[0]), rows


@pytest.mark.parametrize("metric", ["val/acc_best", "val/loss", "train/acc"])
def test_an_optimized_metric_the_run_did_not_log_is_one_line(metric: str) -> None:
    """A run that logged no fit metric (a resume with nothing left to train, from a checkpoint without them)."""
    from cifar_lab.cli.train import _objective
    from cifar_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=f"optimized_metric={re.escape(metric)} was not logged") as refused:
        _objective(compose_cfg([*QUICK, f"optimized_metric={metric}"]), {"test/acc": 0.5})
    assert "\n" not in str(refused.value) and "optimized_metric=null" in str(refused.value)
