"""DDP computes the numbers one process computes: metrics and reports of a 2-process run equal a single-process
evaluation of the same checkpoint, and 2 processes with half the batch each train like 1 with the whole batch.

Real processes throughout: ``trainer=ddp_cpu`` (2 CPU processes, gloo) and two gloo processes for the
synchronised BatchNorm layer itself.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cifar_lab.callbacks.sync_batchnorm import CPUSyncBatchNorm, DistributedBatchNorm
from conftest import SYNTH, run_cli

ONE_PROCESS = [a for a in SYNTH if a != "trainer=cpu"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ----------------------------------------------------------------------------- the layer, two real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batchnorm_rank(rank: int, port: int, x: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = CPUSyncBatchNorm().apply(nn.Sequential(nn.BatchNorm2d(3)))[0]
        assert isinstance(layer, DistributedBatchNorm)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        part = x.chunk(2)[rank].clone().requires_grad_(True)
        out = layer(part)
        # the mean loss over the whole batch, as DDP computes it: each rank's mean, gradients averaged
        (out * torch.arange(out.numel()).reshape(out.shape).float().sin()).mean().backward()
        grads = [layer.weight.grad, layer.bias.grad]
        for g in grads:
            dist.all_reduce(g)
            g /= 2
        torch.save({"out": out.detach(), "x_grad": part.grad, "weight_grad": grads[0], "bias_grad": grads[1],
                    "running_mean": layer.running_mean, "running_var": layer.running_var},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 10 s
def test_distributed_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mp.spawn(_batchnorm_rank, args=(_free_port(), x, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    whole = x.clone().requires_grad_(True)
    out = reference(whole)
    weights = torch.cat([torch.arange(o.numel()).reshape(o.shape).float().sin() for o in out.detach().chunk(2)])
    # the same objective: the mean over each half, averaged over the halves
    (out * weights).mean().backward()

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **close)
    # each rank's input gradient holds every rank's loss (the all-reduce's backward sums them); DDP's averaging
    # of the parameter gradients upstream halves it, to the whole batch's mean loss
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]) / 2, whole.grad, **close)
    for rank in ranks:
        torch.testing.assert_close(rank["weight_grad"], reference.weight.grad, **close)
        torch.testing.assert_close(rank["bias_grad"], reference.bias.grad, **close)
        torch.testing.assert_close(rank["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(rank["running_var"], reference.running_var, **close)


def test_the_plugin_reverts_to_plain_batchnorm_with_the_same_state() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    synced = CPUSyncBatchNorm().apply(net)
    assert isinstance(synced[1], DistributedBatchNorm) and synced.state_dict().keys() == before.keys()
    plain = CPUSyncBatchNorm().revert(synced)
    assert not isinstance(plain[1], DistributedBatchNorm)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, before[key]), key
    # outside a process group it is BatchNorm itself
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(CPUSyncBatchNorm().apply(nn.Sequential(nn.BatchNorm2d(3)))(x), nn.BatchNorm2d(3)(x))


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_ddp_test_metrics_and_reports_equal_a_single_process_evaluation(tmp_path: Path) -> None:
    run_dir, eval_dir = tmp_path / "ddp", tmp_path / "eval"
    # 101 test images in batches of 16: the two shards are uneven (51 and 50), and neither pads nor drops
    data = ["data.source.train_size=400", "data.source.test_size=101", "data.val_size=100", "data.eval_batch_size=16"]
    proc = run_cli([*ONE_PROCESS, *data, "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=csv",
                    f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sync_dist" not in proc.stderr  # every epoch-level value is synchronised across the processes
    evaluated = run_cli([f"ckpt_path={run_dir}", "trainer=cpu", f"hydra.run.dir={eval_dir}"], tmp_path,
                        script="cifar_lab.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    ddp, single = _metrics(run_dir)["metrics"], _metrics(eval_dir)["metrics"]
    for key in ("test/acc", "test/acc_top5"):  # counts over all 101 images: exactly equal
        assert ddp[key] == single[key], key
    assert round(ddp["test/acc"] * 101) == pytest.approx(ddp["test/acc"] * 101, abs=1e-4)
    for key in ("test/loss", "test/ece"):  # sums in another order: equal up to rounding
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    # per-class precision/recall/F1 with support, and the ECE line: the same report, every image once
    report = (run_dir / "classification_report.txt").read_text()
    assert report == (eval_dir / "classification_report.txt").read_text()
    supports = [int(line.split()[-1]) for line in report.splitlines()
                if re.match(r"\s*class_\d\s", line)]
    assert sum(supports) == 101
    # the model card's test accuracy, per-class table and calibration
    def card_results(path: Path) -> list[str]:
        text = path.read_text()
        return [line for line in text.splitlines() if re.match(r"(- accuracy:|\| class_\d|- expected calibration)", line)]

    ddp_card, single_card = card_results(run_dir / "MODEL_CARD.md"), card_results(eval_dir / "MODEL_CARD.md")
    assert len(ddp_card) >= 12 and ddp_card == single_card


def _train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_two_processes_with_half_batches_train_like_one_process(tmp_path: Path) -> None:
    # BatchNorm, no dropout or random augmentation (each rank draws its own): only the batch split differs.
    # 200 training images, 8 steps: longer runs amplify float32 rounding chaotically (600 images, 14 steps:
    # epoch losses 4e-6 apart after epoch 1, 5e-4 after epoch 2 on a Zen 4 EPYC, identical here)
    common = [*ONE_PROCESS, "data.source.train_size=400", "model=simple_cnn_bn", "model.dropout=0", "augment=none", "optimizer=sgd",
              "optimizer.lr=0.01", "scheduler=none", "trainer.max_epochs=2", "trainer.deterministic=true",
              "logger=csv", "test=false", "callbacks.report=null", "module.memory_format=contiguous"]
    runs = {"one": ["trainer=cpu", "data.batch_size=60"], "two": ["trainer=ddp_cpu", "data.batch_size=30"]}
    for name, args in runs.items():
        proc = run_cli([*common, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (_train_losses(tmp_path / name) for name in runs)
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-5)  # the loss of every epoch (without synchronised BatchNorm: 1e-3 off)
    weights = [torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for name in runs]
    # 200 training images: 4 steps an epoch, the last of 20 images (2 x 10 in the two processes)
    assert _metrics(tmp_path / "one")["global_step"] == _metrics(tmp_path / "two")["global_step"] == 8
    for key, value in weights[0].items():
        if key.startswith("net.") and value.is_floating_point():
            # after 8 steps (per-process BatchNorm statistics leave them far apart)
            gap = float((weights[1][key] - value).abs().max() / value.abs().max().clamp(min=1e-12))
            assert gap < 1e-3, (key, gap)
