"""The README's and docs' lists agree with the code (no training: files are parsed, lists imported).

- the Data table's options against ``conf/data/*.yaml``, its augmentation sets against ``conf/augment/``;
- the Configuration table: every config group's options against ``conf/<group>/*.yaml``, both ways
  (the model row points to the Models table, checked against ``conf/model/``);
- the optimizer and scheduler lists of "Recipes", and which schedulers step per batch
  (``interval: step`` in ``conf/scheduler/*.yaml``);
- the exit-code table against ``cifar_lab/errors.py``;
- the Optuna search's model, optimizer and trial count against ``conf/hparams_search/optuna.yaml``;
- every repository path named in README.md, CONTRIBUTING.md, docs/*.md and the comments of
  ``conf/**/*.yaml`` exists, every relative link and ``#anchor`` resolves, and no file cites a
  specification that is not in the repository;
- the example package of "Add your own model, dataset or callback" builds.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import yaml

from cifar_lab import errors

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUPS = ["data", "model", "augment", "optimizer", "scheduler", "trainer", "callbacks", "logger",
          "experiment", "debug", "hparams_search", "paths"]
OPTION = re.compile(r"`([A-Za-z0-9_]+)`")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def _table_rows(text: str, first_header: str) -> dict[str, str]:
    """The rows of the Markdown table whose header starts with ``| first_header |``: first cell -> rest."""
    lines = text[text.index(f"| {first_header} |"):].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = " | ".join(cells[1:])
    return rows


def test_every_config_group_lists_its_options() -> None:
    rows = _table_rows(_section(README.read_text(), "## Configuration"), "group")
    assert {name.strip("`") for name in rows} == set(GROUPS), "the table's groups"
    problems = []
    for group in GROUPS:
        if group == "model":
            continue
        listed = set(OPTION.findall(rows[f"`{group}`"]))
        shipped = _options(group)
        if listed != shipped:
            problems.append(f"{group}: README lists {sorted(listed - shipped)} not in conf/, "
                            f"misses {sorted(shipped - listed)}")
    assert not problems, "\n".join(problems)


def test_the_data_table_lists_every_data_option() -> None:
    rows = _table_rows(_section(README.read_text(), "## Data"), "option")
    listed = {m.group(1) for cell in rows for m in [re.match(r"`data=([A-Za-z0-9_]+)", cell)] if m}
    assert len(listed) == len(rows), f"rows that are not `data=<option>`: {sorted(rows)}"
    assert listed == _options("data"), (f"README's Data table lists {sorted(listed - _options('data'))} not in "
                                        f"conf/data/, misses {sorted(_options('data') - listed)}")


def test_the_data_sections_augmentation_sets_are_conf_augment() -> None:
    data = _section(README.read_text(), "## Data")
    assert _listed_after(data, "selected with `augment=<name>`:") == _options("augment")


def test_the_models_table_lists_every_model_config() -> None:
    for doc in (README, ROOT / "docs" / "models.md"):
        listed = {cell.strip("`") for cell in _table_rows(doc.read_text(), "Config")}
        assert listed == _options("model"), doc.name


def _listed_after(text: str, label: str) -> set[str]:
    match = re.search(re.escape(label) + r"(.*?)(?:;|\.\s)", text, re.S)
    assert match, label
    return set(OPTION.findall(match.group(1)))


def test_optimizers_and_when_schedulers_step() -> None:
    recipes = _section(README.read_text(), "## Recipes")
    assert _listed_after(recipes, "Optimizers (`optimizer=`):") == _options("optimizer")
    interval = {name: yaml.safe_load((CONF / "scheduler" / f"{name}.yaml").read_text())["interval"]
                for name in _options("scheduler")}
    per_batch = _listed_after(recipes, "stepped per batch:")
    per_epoch = _listed_after(recipes, "stepped per\nepoch:") | _listed_after(recipes, "epoch:")
    assert per_batch == {n for n, i in interval.items() if i == "step"}, "schedulers stepped per batch"
    assert per_epoch == {n for n, i in interval.items() if i == "epoch"}, "schedulers stepped per epoch"


def test_the_exit_code_table_matches_errors_py() -> None:
    rows = _table_rows(README.read_text(), "exit")
    documented = {int(code) for cell in rows for code in re.findall(r"\d+", cell)}
    code = {0, 1, errors.EXIT_USER, errors.EXIT_DIVERGED, errors.EXIT_SWEEP_FAILED, errors.EXIT_PEER_LOST,
            128 + signal.SIGINT, 128 + signal.SIGTERM}
    assert errors.EXIT_INTERRUPTED == 128 + signal.SIGINT
    assert documented == code
    in_docstring = set(re.findall(r"^(\d+)\s", errors.__doc__, re.M)) - {"128"}  # "128 + N": 130, 143
    assert in_docstring | {"130", "143"} == {str(c) for c in code}


def test_the_optuna_search_is_described_as_configured() -> None:
    config = yaml.safe_load((CONF / "hparams_search" / "optuna.yaml").read_text())
    defaults = {k: v for d in config["defaults"] for k, v in d.items()}
    text = " ".join(_section(README.read_text(), "### Optuna search").split())
    assert f"`model={defaults['override /model']}`" in text
    assert f"`optimizer={defaults['override /optimizer']}`" in text
    assert f"{config['hydra']['sweeper']['n_trials']} trials unless `hydra.sweeper.n_trials`" in text


def test_speedrun_long_header_counts_its_epochs() -> None:
    base = yaml.safe_load((CONF / "experiment" / "speedrun.yaml").read_text())["trainer"]["max_epochs"]
    text = (CONF / "experiment" / "speedrun_long.yaml").read_text()
    more = int(re.search(r"with (\d+) more epochs", text).group(1))
    assert base + more == yaml.safe_load(text)["trainer"]["max_epochs"]


# ----------------------------------------------------------------------------- paths and links

TOP = ("cifar_lab", "conf", "docs", "tests", "benchmarks", "examples", "hydra_plugins")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP))
LINK = re.compile(r"\]\(([^)\s]+)\)")
RUN_OUTPUTS = {"MODEL_CARD.md"}  # written into run directories, not files of the repository


def _texts() -> list[tuple[str, str]]:
    found = [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in DOCS]
    for path in sorted(CONF.rglob("*.yaml")):
        comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        found.append((path.relative_to(ROOT).as_posix(), comments))
    return found


def _anchors(markdown: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_named_path_exists() -> None:
    missing = []
    for name, text in _texts():
        for path in PATH.findall(text):
            if not (ROOT / path.rstrip("/.")).exists():
                missing.append(f"{name}: {path}")
        for cited in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text):
            if cited not in RUN_OUTPUTS and not (ROOT / cited).exists():
                missing.append(f"{name}: {cited}")
        if re.search(r"\bSPEC\b", text):
            missing.append(f"{name}: cites SPEC, which is not in the repository")
    assert not missing, "\n".join(missing)


def test_every_link_and_anchor_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file) if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ----------------------------------------------------------------------------- the example package


def test_the_example_package_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import torch

    from mylab.callbacks import EpochClock
    from mylab.data import SquaresSource
    from mylab.models import TinyNet

    splits = SquaresSource(train_size=8, test_size=4).load()
    assert splits.num_classes == 4 and splits.train_x.dtype == torch.uint8
    assert TinyNet(num_classes=4)(splits.train_x.float() / 255).shape == (8, 4)
    assert EpochClock() is not None
    targets = {yaml.safe_load(p.read_text()).get("_target_") or
               next(v["_target_"] for v in yaml.safe_load(p.read_text()).values() if isinstance(v, dict) and "_target_" in v)
               for p in (ROOT / "examples" / "conf").rglob("*.yaml") if "source" not in p.read_text()}
    assert targets == {"mylab.models.TinyNet", "mylab.callbacks.EpochClock"}
    assert "mylab" in sys.modules
