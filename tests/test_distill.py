"""Knowledge distillation: the documented loss by hand, a distilled run, and teachers that are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cifar_lab.builders import build_teacher
from cifar_lab.cli.train import train
from cifar_lab.module import Renormalize, distillation_loss
from conftest import SYNTH, compose_cfg, run_cli

TINY = [*SYNTH, "trainer.max_epochs=1", "data.source.train_size=300", "data.source.test_size=60",
        "data.val_size=60", "model.filters=[8,16]", "model.fc_units=32", "logger=none",
        "trainer.enable_progress_bar=false"]


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_distillation_loss_is_the_documented_combination_by_hand() -> None:
    student = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]
    teacher = [[3.0, 0.0, 0.0], [-1.0, 2.0, 1.0]]
    labels = [0, 2]
    t, w = 2.0, 0.75
    # by hand: cross-entropy at T = 1, KL(p_teacher || p_student) at T, averaged over the batch
    ce = sum(-math.log(_softmax(s, 1.0)[y]) for s, y in zip(student, labels)) / 2
    kl = sum(sum(p * math.log(p / q) for p, q in zip(_softmax(tr, t), _softmax(s, t)))
             for s, tr in zip(student, teacher)) / 2
    expected = (1 - w) * ce + w * t * t * kl

    s, tch = torch.tensor(student), torch.tensor(teacher)
    hard = torch.nn.functional.cross_entropy(s, torch.tensor(labels))
    assert float(hard) == pytest.approx(ce, rel=1e-6)
    assert float(distillation_loss(s, tch, hard, t, w)) == pytest.approx(expected, rel=1e-6)
    # weight 0 is plain cross-entropy; a student equal to its teacher has no soft loss
    assert float(distillation_loss(s, tch, hard, t, 0.0)) == pytest.approx(ce, rel=1e-6)
    assert float(distillation_loss(tch, tch, hard, t, 1.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(compose_cfg([*TINY, "model.filters=[16,32]"], run_dir))
    return run_dir


@pytest.mark.slow
def test_a_student_trains_from_a_teacher_run(teacher_run: Path, tmp_path: Path) -> None:
    student_dir = tmp_path / "student"
    train(compose_cfg([*TINY, f"module.distill.teacher={teacher_run}", "module.distill.temperature=3",
                       "module.distill.weight=0.5"], student_dir))
    summary = json.loads((student_dir / "metrics.json").read_text())
    compute = summary["compute"]
    teacher_gflop = sum(compute["teacher_forward_gflop_per_image"].values())
    student_gflop = sum(compute["train_forward_gflop_per_image"].values())
    assert teacher_gflop > student_gflop > 0  # the teacher has more filters
    # training compute: 3 student forwards (forward + backward) + 1 teacher forward per image
    expected = compute["train_images"] * (3 * student_gflop + teacher_gflop) * 1e9 / 1e15
    assert compute["train_pflop"] == pytest.approx(expected, rel=1e-6)
    checkpoint = torch.load(student_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in key for key in checkpoint["state_dict"])  # the student only
    assert checkpoint["hyper_parameters"]["module"]["distill"]["teacher"] == str(teacher_run)


def _hostile_copy(teacher_run: Path, folder: Path) -> Path:
    """The teacher's best checkpoint with a saved config that would run a shell command."""
    best = json.loads((teacher_run / "metrics.json").read_text())["best_ckpt"]
    checkpoint = torch.load(teacher_run / best, weights_only=True)
    checkpoint["hyper_parameters"]["model"] = {"_target_": "os.system", "command": "touch pwned"}
    folder.mkdir(parents=True)
    path = folder / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.slow
def test_a_teacher_with_a_hostile_saved_config_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    hostile = _hostile_copy(teacher_run, tmp_path / "hostile")
    run_dir = tmp_path / "student"
    proc = run_cli([*TINY, f"module.distill.teacher={hostile}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr[proc.stderr.index("Error: "):]
    assert error.startswith(f"Error: refusing to build the config from {hostile}")
    assert "model._target_=os.system" in error  # names the key and the target
    assert not (run_dir / "checkpoints").exists()  # refused before training
    assert not (tmp_path / "pwned").exists() and not (Path.cwd() / "pwned").exists()


@pytest.mark.slow
def test_a_teacher_of_other_classes_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    proc = run_cli([*TINY, "data.num_classes=5", f"module.distill.teacher={teacher_run}",
                    f"hydra.run.dir={tmp_path / 'student'}"], tmp_path)
    assert proc.returncode == 2
    assert "the teacher classifies 10 classes (data.num_classes), this run 5" in proc.stderr


def test_a_teacher_of_other_normalisation_sees_its_own_inputs(teacher_run: Path) -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    cfg = compose_cfg([*TINY, f"module.distill.teacher={teacher_run}", f"data.mean={mean}", f"data.std={std}"])
    wrapped = build_teacher(cfg)
    assert isinstance(wrapped[0], Renormalize)
    teacher_cfg = compose_cfg(TINY)
    raw = torch.rand(4, 3, 32, 32)
    ours = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    theirs = ((raw - torch.tensor(list(teacher_cfg.data.mean)).view(1, 3, 1, 1))
              / torch.tensor(list(teacher_cfg.data.std)).view(1, 3, 1, 1))
    assert torch.allclose(wrapped[0](ours), theirs, atol=1e-5)
    wrapped.eval()
    assert torch.allclose(wrapped(ours), wrapped[1](theirs), atol=1e-4)
    assert not isinstance(build_teacher(compose_cfg([*TINY, f"module.distill.teacher={teacher_run}"])),
                          torch.nn.Sequential)  # same normalisation: the network as it is
