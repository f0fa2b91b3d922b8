"""``python train.py --help`` answers from the config folders' file names: the same groups and options as
Hydra's own listing, and only when help is all that was asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cifar_lab.cli.usage import config_groups, help_config_dirs, help_text
from conftest import ROOT, run_cli

CONF = ROOT / "conf"
EXAMPLES = ROOT / "examples" / "conf"


def _hydras_groups() -> dict[str, list[str]]:
    """Every non-``hydra/`` group and its options as Hydra's config loader lists them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        found: dict[str, list[str]] = {}

        def walk(parent: str) -> None:
            for name in loader.list_groups(parent):
                group = f"{parent}/{name}" if parent else name
                if group.split("/")[0] == "hydra":
                    continue
                options = loader.get_group_options(group)
                if options:
                    found[group] = sorted(options)
                walk(group)

        walk("")
    return dict(sorted(found.items()))


def test_the_groups_are_hydras() -> None:
    assert config_groups([CONF]) == _hydras_groups()


def test_a_config_dir_adds_its_options() -> None:
    groups = config_groups([CONF, EXAMPLES])
    assert "tiny_net" in groups["model"] and "simple_cnn" in groups["model"]
    assert "squares" in groups["data"] and "with_clock" in groups["callbacks"]


@pytest.mark.parametrize("argv,dirs", [
    (["--help"], [CONF]),
    (["-h"], [CONF]),
    (["-cd", "mine", "--help"], [CONF, Path("mine")]),
    (["--help", "--config-dir", "mine"], [CONF, Path("mine")]),
    (["--config-dir=mine", "-h"], [CONF, Path("mine")]),
    ([], None),
    (["-cd", "mine"], None),
    (["model=simple_cnn", "--help"], None),  # Hydra's help shows the config these overrides compose
    (["--help", "-m"], None),
    (["--cfg", "job"], None),
    (["--hydra-help"], None),
    (["--help", "-cd"], None),  # a flag without its folder: Hydra's message
])
def test_only_a_plain_help_is_answered_here(argv: list[str], dirs: list[Path] | None) -> None:
    assert help_config_dirs(argv, CONF) == dirs


def test_the_text_lists_every_group_and_option() -> None:
    text = help_text([CONF])
    for group, options in config_groups([CONF]).items():
        assert f"  {group}: {', '.join(options)}\n" in text
    assert "hydra/" not in text and "--hydra-help" in text


@pytest.mark.slow
def test_train_py_help_prints_it_and_runs_nothing(tmp_path: Path) -> None:
    proc = run_cli(["-cd", str(EXAMPLES), "--help"], tmp_path, fresh=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == help_text([CONF, EXAMPLES])
    assert list(tmp_path.iterdir()) == []  # no run directory, no outputs/


@pytest.mark.slow
@pytest.mark.parametrize("argv, refused", [
    (["model=no_such_model"], "Could not find 'model/no_such_model'"),  # a group's option that is not there
    (["trainer.no_such_key=1"], "no_such_key"),  # a key the config does not have
    (["optimizer.lr=[1,"], "'[1,'"),  # an override that does not parse: its text
    (["+experiment=no_such_recipe", "model=simple_cnn"], "no_such_recipe"),
    (["--cfg", "job", "model=simple_cnn"], None),  # print-only: the composed config
    (["--info", "defaults"], None),
])
def test_a_command_that_only_composes_loads_neither_torch_nor_lightning(tmp_path: Path, argv: list[str],
                                                                       refused: str | None) -> None:
    """torch and Lightning load once the config composes and a job starts (cifar_lab/cli/starting.py): a refused
    config or a print-only option answers without them, and makes no run directory."""
    import os
    import sys

    from conftest import run_command

    env = {**os.environ, "CIFAR_LAB_LOGS": str(tmp_path / "logs")}
    proc = run_command([sys.executable, "-X", "importtime", "train.py", *argv], ROOT, env, timeout=120)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not loaded & {"torch", "lightning", "torchvision"}, sorted(loaded & {"torch", "lightning"})
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    if refused:
        assert proc.returncode == 2 and len(said) == 1 and said[0].startswith("Error: ") and refused in said[0], said
    else:
        assert proc.returncode == 0 and not said, said
    assert not (tmp_path / "logs").exists()
