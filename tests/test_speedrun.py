"""The speedrun pieces: network, whitening init, weight averaging, optimizer/schedule, TTA, recipe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
from hydra.utils import instantiate
from omegaconf import OmegaConf
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks.averaging import EMA, Lookahead, ScheduledAveraging
from cifar_lab.callbacks.tta import TTACallback
from cifar_lab.models.tta import TestTimeAugmentation as TTAWrapper
from cifar_lab.models.tta import tta_views
from cifar_lab.callbacks.whitening import WhiteningInit, training_images
from cifar_lab.models.flops import count_macs
from cifar_lab.models.speedrun_net import SpeedrunNet
from cifar_lab.models.whitening import extract_patches, init_whitening_, patch_whitening_weights
from cifar_lab.optim.grouped_sgd import grouped_sgd
from cifar_lab.optim.muon import muon_sgd, orthogonalize
from cifar_lab.optim.schedules import WarmupDecay, linear_warmup_decay
from cifar_lab.cli import evaluate
from cifar_lab.cli.train import train
from conftest import NetModule, compose_cfg


def _correlated_images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: neighbouring pixels and channels strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size, size, generator=g)
    base = F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    colour = torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    return 2.0 * base * colour + 0.3 * torch.randn(n, 3, size, size, generator=g) + 0.7


# ----------------------------------------------------------------------------- network


def test_speedrun_net_shapes_frozen_parts_and_dirac_init() -> None:
    net = SpeedrunNet(num_classes=10, widths=[16, 32, 32])
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert net.whiten.out_channels == 24 and not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in bns)
    # partial identity: the first min(in, out) filters of each 3x3 conv copy their channel
    conv = net.blocks[1][0]
    x = torch.randn(2, conv.in_channels, 8, 8)
    assert torch.allclose(conv(x)[:, : conv.in_channels], x, atol=1e-6)
    small = SpeedrunNet(num_classes=7, widths=[8], convs_per_block=1, whiten_kernel=3, activation="relu")
    assert small.whiten.out_channels == 54 and small(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# ----------------------------------------------------------------------------- whitening


def test_whitening_init_decorrelates_patches() -> None:
    images = _correlated_images()
    patches = extract_patches(images, 2)
    raw_corr = torch.corrcoef(patches.T)
    assert (raw_corr - torch.eye(12)).abs().max() > 0.5  # strongly correlated input

    conv = nn.Conv2d(3, 24, 2, bias=True)
    init_whitening_(conv, images, eps=1e-8)
    with torch.no_grad():
        out = conv(images)  # (N, 24, H-1, W-1)
    feats = out.permute(0, 2, 3, 1).reshape(-1, 24).double()
    cov = torch.cov(feats[:, :12].T)
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=1e-3), cov
    assert feats.mean(0).abs().max() < 1e-4  # the bias centres the output
    assert torch.allclose(feats[:, 12:], -feats[:, :12], atol=1e-5)  # symmetric half


def test_whitening_eps_damps_weak_directions_and_checks_shapes() -> None:
    images = _correlated_images(n=16, size=8)
    w_small, _ = patch_whitening_weights(images, 2, eps=1e-8, symmetric=False)
    w_big, _ = patch_whitening_weights(images, 2, eps=1.0, symmetric=False)
    assert w_small.shape == (12, 3, 2, 2)
    assert w_big.flatten(1).norm(dim=1).max() < w_small.flatten(1).norm(dim=1).max()
    with pytest.raises(ValueError, match="output channels"):
        init_whitening_(nn.Conv2d(3, 16, 2), images)


class _ToyData:
    """Stand-in for CIFARDataModule: uint8 training split plus ``normalize``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.splits = {"train": (images, torch.zeros(len(images), dtype=torch.long))}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - 0.5) / 0.25


def test_whitening_callback_initialises_from_training_images_and_freezes_bias() -> None:
    images = (_correlated_images(n=40, size=12) * 40 + 60).clamp(0, 255).to(torch.uint8)
    data = _ToyData(images)
    holder = nn.Module()
    holder.net = SpeedrunNet(widths=[8, 8, 8])
    callback = WhiteningInit(module="net.whiten", num_images=30, eps=1e-3, bias_epochs=2, seed=1)
    callback.setup(SimpleNamespace(datamodule=data), holder, "fit")

    sample = training_images(data, 30, seed=1)
    expected, bias = patch_whitening_weights(sample, 2, eps=1e-3)
    assert sample.shape == (30, 3, 12, 12)
    assert torch.allclose(holder.net.whiten.weight, expected) and torch.allclose(holder.net.whiten.bias, bias)
    for epoch, trains in ((0, True), (1, True), (2, False), (5, False)):
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), holder)
        assert holder.net.whiten.bias.requires_grad is trains


# ----------------------------------------------------------------------------- averaging


def _toy() -> NetModule:
    return NetModule(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), lr=0.5, momentum=0.5)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def _fit(callbacks: list[L.Callback], steps: int = 7, checkpoint_dir: Path | None = None) -> NetModule:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8 * steps, 4), torch.randint(0, 2, (8 * steps,))), batch_size=8)
    model = _toy()
    if checkpoint_dir is not None:
        callbacks = [*callbacks, L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=checkpoint_dir is not None,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, data)
    if checkpoint_dir is not None:  # as train.py does: test the saved checkpoint with the same trainer
        trainer.test(model, data, ckpt_path=str(checkpoint_dir / "last.ckpt"), weights_only=False, verbose=False)
    return model


@pytest.mark.parametrize("checkpoint", [False, True], ids=["in_memory", "tested_from_checkpoint"])
def test_ema_matches_hand_computed_average(checkpoint: bool, tmp_path: Path) -> None:
    recorder = _Recorder()
    decay = 0.6
    model = _fit([recorder, EMA(decay=decay, every_n_steps=1)], checkpoint_dir=tmp_path if checkpoint else None)
    expected = dict(recorder.weights[0])  # the first update copies the weights
    for w in recorder.weights[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in expected}
    assert len(recorder.weights) == 7
    for name, param in model.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name
    # without averaging the final weights differ: the check above is not vacuous
    assert not torch.allclose(recorder.weights[-1]["net.0.weight"], expected["net.0.weight"])


def test_lookahead_writes_the_slow_weights_back_every_k_steps() -> None:
    fast, after = _Recorder(), _Recorder()
    decay, k = 0.7, 2
    model = _fit([fast, Lookahead(decay=decay, every_n_steps=k, ramp_power=0.0), after])
    d = decay**k
    slow = None
    for step, w in enumerate(fast.weights, start=1):
        if step % k:
            assert all(torch.equal(after.weights[step - 1][n], w[n]) for n in w)  # no update: untouched
            continue
        slow = dict(w) if slow is None else {n: d * slow[n] + (1 - d) * w[n] for n in w}
        for n in w:  # reset to the slow weights right after the update
            assert torch.allclose(after.weights[step - 1][n], slow[n], atol=1e-6), (step, n)
    for name, param in model.named_parameters():  # training ends on the slow weights (step 6)
        assert torch.allclose(param, slow[name], atol=1e-6), name


def test_scheduled_decay_ramps_up() -> None:
    avg = ScheduledAveraging(decay=0.9, every_n_steps=5, ramp_power=3.0)
    assert avg.decay_at(0, 100) == 0.0
    assert avg.decay_at(50, 100) == pytest.approx(0.9**5 * 0.125)
    assert avg.decay_at(100, 100) == pytest.approx(0.9**5)
    assert not avg.should_update(step_idx=3) and avg.should_update(step_idx=4) and not avg.should_update(epoch_idx=0)


# ----------------------------------------------------------------------------- optimizer, schedule


def test_grouped_sgd_scales_vector_learning_rate_and_keeps_decay_per_step() -> None:
    net = SpeedrunNet(widths=[8, 8, 8])
    opt = grouped_sgd(net.parameters(), lr=0.5, momentum=0.85, weight_decay=1e-3, bias_lr_scale=64.0)
    matrices, vectors = opt.param_groups
    assert all(p.ndim >= 2 for p in matrices["params"]) and all(p.ndim == 1 for p in vectors["params"])
    assert vectors["lr"] == 32.0 and matrices["lr"] == 0.5
    assert vectors["lr"] * vectors["weight_decay"] == pytest.approx(matrices["lr"] * matrices["weight_decay"])
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable
    assert opt.defaults["nesterov"]


@pytest.mark.parametrize("shape", [(64, 216), (300, 40)])
def test_orthogonalize_flattens_the_spectrum(shape) -> None:
    g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))  # badly conditioned
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.6 and s.max() < 1.3, (s.min(), s.max())


def test_muon_sgd_groups_and_steps() -> None:
    torch.manual_seed(0)
    net = SpeedrunNet(widths=[8, 16, 16])
    opt = muon_sgd(net.parameters(), lr=0.2, momentum=0.6, sgd_lr=0.1, weight_decay=1e-3, bias_lr_scale=10.0)
    filters, head, vectors = opt.param_groups
    assert filters["muon"] and all(p.ndim == 4 for p in filters["params"]) and len(filters["params"]) == 6
    assert head["params"] == [net.head.weight] and head["lr"] == 0.1 and not head["muon"]
    assert vectors["lr"] == pytest.approx(1.0) and vectors["weight_decay"] == pytest.approx(1e-4)
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    conv = net.blocks[1][0].weight
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(net(x) * 9, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert conv.norm().item() == pytest.approx(len(conv) ** 0.5, rel=0.3)  # renormalised each step
    assert losses[-1] < 0.5 * losses[0], losses


def test_linear_warmup_decay_shape() -> None:
    f = WarmupDecay(total=100, warmup=20, start=0.2, end=0.0, shape="linear")
    assert [f(0), f(10), f(20), f(60), f(100), f(150)] == pytest.approx([0.2, 0.6, 1.0, 0.5, 0.0, 0.0])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = linear_warmup_decay(opt, total_steps=10, warmup_fraction=0.3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- TTA


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Content moved by (dy, dx) with reflected borders, written out by hand for |d| <= 1."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - dy: 1 - dy + h, 1 - dx: 1 - dx + w]


class _TTAModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def forward(self, x):
        return self.net(x)


def test_tta_averages_the_listed_views() -> None:
    module = _TTAModule()
    x = torch.randn(3, 3, 8, 8)
    views = tta_views(flip=True, shifts=[[1, 1], [-1, -1]])
    assert views == [(False, 0, 0), (False, 1, 1), (False, -1, -1), (True, 0, 0), (True, 1, 1), (True, -1, -1)]
    with torch.no_grad():
        mirrored = x.flip(-1)  # mirror first, then shift
        by_hand = [x, _shift(x, 1, 1), _shift(x, -1, -1), mirrored, _shift(mirrored, 1, 1), _shift(mirrored, -1, -1)]
        expected = torch.stack([module(v).softmax(1) for v in by_hand]).mean(0)

        callback = TTACallback(flip=True, shifts=[[1, 1], [-1, -1]], stages=["test"])
        callback.on_test_start(None, module)
        got = module(x).softmax(1)
        callback.on_test_end(None, module)
        plain = module(x).softmax(1)
        wrapped = TTAWrapper(module.net, flip=True, shifts=[[1, 1], [-1, -1]])(x).softmax(1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(wrapped, expected, atol=1e-5)
    assert torch.allclose(plain, module.net(x).softmax(1)) and not torch.allclose(plain, expected)


# ----------------------------------------------------------------------------- the recipe

SPEEDRUN_SYNTH = [
    "experiment=speedrun",
    "data=synthetic",
    "data.source.train_size=256",
    "data.source.test_size=64",
    "data.batch_size=64",
    "data.eval_batch_size=64",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=1",
    # one step at 24 px, one at full size
    "data.augment.resize.schedule=[[0,24],[1,null]]",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
    "model.widths=[16,32,32]",
    "callbacks.whitening.num_images=64",
]


def test_speedrun_experiment_composes() -> None:
    cfg = compose_cfg(["experiment=speedrun"], Path("/tmp/unused"))
    assert cfg.model._target_ == "cifar_lab.models.speedrun_net.SpeedrunNet"
    assert cfg.optimizer._target_ == "cifar_lab.optim.muon.muon_sgd" and cfg.optimizer.bias_lr_scale == 64
    assert cfg.optimizer.lr == 0.24 and cfg.optimizer.sgd_lr == 1.5
    assert "ProgressiveResize" in cfg.data.augment.resize._target_ and cfg.data.augment.resize.schedule == [[0, 16], [2, 24], [4, None]]
    assert cfg.callbacks.tta.translate == 1 and cfg.callbacks.tta.shifts is None
    assert cfg.module.label_smoothing == 0.2 and cfg.data.batch_size == 1024 and cfg.data.val_size == 0
    assert cfg.data.augment.flip is None and "AlternatingFlip" in cfg.data.augment.alternating_flip._target_
    assert {"whitening", "lookahead", "tta"} <= set(cfg.callbacks) and cfg.callbacks.model_checkpoint.monitor is None
    # precision follows the device default, so the recipe also runs on GPUs without bf16
    assert "precision" not in OmegaConf.load(Path(__file__).parents[1] / "conf/experiment/speedrun.yaml").trainer
    long = compose_cfg(["experiment=speedrun_long"], Path("/tmp/unused"))
    assert long.trainer.max_epochs > cfg.trainer.max_epochs and long.optimizer == cfg.optimizer


@pytest.mark.slow
def test_speedrun_experiment_runs_two_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_cfg(SPEEDRUN_SYNTH, run_dir)
    assert train(cfg) is None  # no validation, nothing to optimise
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 2
    # the final (Lookahead-averaged) weights are saved, tested, and usable like any run's
    assert summary["best_ckpt"].startswith("checkpoints/") and (run_dir / summary["best_ckpt"]).is_file()
    # the card says that there is no validation, and gives the run's TTA accuracy
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "val none (no validation), test 64" in card
    assert f"{100 * summary['metrics']['test/acc']:.2f}%" in card  # the TTA accuracy, one view's or recorded
    again = evaluate.run([f"ckpt_path={run_dir}", "trainer.enable_progress_bar=false"], tmp_path / "eval")
    assert again["metrics"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    assert summary["choices"]["model"] == "speedrun_net"
    # the run counted its compute from the network as built: 64 images at 24 px, 64 at 32 px
    net = instantiate(cfg.model)
    macs24, macs32 = count_macs(net, 24), count_macs(net, 32)
    compute = summary["compute"]
    assert compute["train_images"] == 128 and macs24 < macs32
    assert compute["train_pflop"] == (64 * 3 * 2 * macs24 + 64 * 3 * 2 * macs32) / 1e15
    assert set(compute["train_forward_gflop_per_image"]) == {"3x24x24", "3x32x32"}
    assert compute["test_pflop"] == compute["test_images"] * 10 * 2 * macs32 / 1e15 > 0  # 10 TTA views
