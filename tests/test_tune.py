"""python -m cifar_lab.tune: the learning-rate range test and the batch-size finder print overrides a run accepts."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from cifar_lab.cli.tune import rescaled_lr
from conftest import ROOT, SYNTH, run_cli

PNG = b"\x89PNG\r\n\x1a\n"
BASE = [o for o in SYNTH if not o.startswith("callbacks.")] + ["optimizer=sgd", "optimizer.lr=0.05"]
BIG = ["data.source.train_size=2000"]  # 1,800 training images: room for batches up to 1,024


def _conf_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _use(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("use: ")]
    assert len(lines) == 1, stdout[-2000:]
    return lines[0].removeprefix("use: ").split()


def _tune_dir(tmp_path: Path) -> Path:
    [run_dir] = (tmp_path / "logs" / "tune" / "runs").iterdir()
    return run_dir


def _accepted(overrides: list[str], tmp_path: Path) -> None:
    proc = run_cli([*BASE, *overrides, "debug=fast_dev_run", "logger=none", "callbacks=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_rescaling_rules_by_hand() -> None:
    assert rescaled_lr(0.1, 128, 512, "linear") == pytest.approx(0.4)
    assert rescaled_lr(0.1, 128, 512, "sqrt") == pytest.approx(0.2)
    assert rescaled_lr(0.1, 128, 128, "sqrt") == pytest.approx(0.1)


@pytest.mark.slow
def test_lr_finder_prints_an_override_a_run_accepts(tmp_path: Path) -> None:
    before = _conf_digest()
    proc = run_cli(["lr", *BASE, "--steps", "30", "--min-lr", "1e-5", "--max-lr", "1"], tmp_path,
                   script="cifar_lab.tune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [override] = _use(proc.stdout)
    lr = float(re.fullmatch(r"optimizer\.lr=(\S+)", override).group(1))
    assert 1e-5 <= lr <= 1
    run_dir = _tune_dir(tmp_path)
    assert (run_dir / "lr_find.png").read_bytes()[:8] == PNG
    curve = json.loads((run_dir / "lr_find.json").read_text())
    assert curve["suggestion"] == pytest.approx(lr, rel=1e-2) and curve["configured_lr"] == 0.05
    assert len(curve["lr"]) == len(curve["loss"]) >= 10 and curve["lr"] == sorted(curve["lr"])
    assert _conf_digest() == before  # no config file changed
    _accepted([override], tmp_path)


@pytest.mark.slow
def test_batch_size_finder_stops_at_the_budget(tmp_path: Path) -> None:
    # a budget between two measured peaks: find them first with a budget nothing reaches
    proc = run_cli(["batch_size", *BASE, *BIG, "--memory-gb", "1000", "--max-trials", "4"], tmp_path,
                   script="cifar_lab.tune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    free = json.loads((_tune_dir(tmp_path) / "batch_size.json").read_text())
    assert free["batch_size"] == 64 * 2 ** 3 and free["stopped_by"] == "--max-trials 4"
    peaks = {int(k): v for k, v in free["peaks_gib"].items()}
    assert sorted(peaks) == [64, 128, 256, 512]
    assert peaks[512] > peaks[64]  # a larger batch takes more memory

    budget = (peaks[128] + peaks[512]) / 2
    second = tmp_path / "second"
    proc = run_cli(["batch_size", *BASE, *BIG, "--memory-gb", f"{budget}", "--rule", "sqrt"], second,
                   script="cifar_lab.tune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((_tune_dir(second) / "batch_size.json").read_text())
    found = result["batch_size"]
    # the budget lies between the peaks of 128 and 512 (another process may sit a little higher or lower)
    assert found in (64, 128, 256) and "over the budget" in result["stopped_by"]
    assert all(v <= budget for k, v in result["peaks_gib"].items() if int(k) <= found)
    assert "sqrt scaling rule" in proc.stdout
    overrides = _use(proc.stdout)
    assert overrides == [f"data.batch_size={found}", f"optimizer.lr={rescaled_lr(0.05, 64, found, 'sqrt'):.3g}"]
    _accepted(overrides, tmp_path)


@pytest.mark.slow
def test_a_budget_below_the_first_batch_is_one_error(tmp_path: Path) -> None:
    proc = run_cli(["batch_size", *BASE, "--memory-gb", "0.01"], tmp_path, script="cifar_lab.tune")
    assert proc.returncode == 2
    assert re.search(r"^Error: data.batch_size=64 does not fit: batch 64 peaked at .* over the budget of 0.01 GiB",
                     proc.stderr, re.M), proc.stderr[-2000:]


def test_overrides_may_follow_the_options() -> None:
    from cifar_lab.cli.tune import parse

    args = parse(["lr", "model=simple_cnn", "--steps", "20", "data=synthetic", "data.batch_size=8"])
    assert args.steps == 20 and args.overrides == ["model=simple_cnn", "data=synthetic", "data.batch_size=8"]
    with pytest.raises(SystemExit):
        parse(["batch_size", "--memory-gb", "2", "--nonsense", "model=simple_cnn"])
