"""export: ONNX and TorchScript files agree with the network; predict runs the ONNX file; clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_lab.cli import export as export_mod
from cifar_lab.cli.export import export, write_model
from cifar_lab.cli.predict import predict
from cifar_lab.errors import CheckpointError, ConfigError, ExportError, InputError
from cifar_lab.deploy.exported import Deployable, ExportedModel, make_metadata
from conftest import CLASSES10, ROOT, SYNTH, compose_cfg, run_cli

SMALL = [*SYNTH, "data.source.test_size=64"]


def write_checkpoint(path: Path, overrides: list[str], seed: int = 0) -> Path:
    """A checkpoint as training saves it: the resolved config and the network's (random) weights."""
    cfg = compose_cfg(overrides, path.parent / "train_run")
    torch.manual_seed(seed)
    net = instantiate(cfg.model, _convert_="all")
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    checkpoint = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": OmegaConf.to_container(cfg, resolve=True),
        "class_names": CLASSES10,
        "epoch": 0,
        "global_step": 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.ckpt", SMALL)


@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_parity_on_the_run_test_set(small_ckpt: Path, tmp_path: Path, format: str, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    result = export(small_ckpt, format, out)
    assert result["passed"] and result["images"] == 64
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_prob_diff"] < 1e-4
    assert json.loads(Path(f"{out}.parity.json").read_text())["top1_agreement"] == 1.0
    model = ExportedModel(out)
    assert model.class_names == CLASSES10
    assert model.metadata["input_dtype"] == "uint8" and model.metadata["input_layout"] == "NCHW"
    for batch in (1, 5):  # the batch axis is dynamic
        probs = model.probs(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8))
        assert probs.shape == (batch, 10)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(batch))


@pytest.mark.slow  # exporting a 5M-parameter network twice
@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_parity_resnet_se_on_a_generated_set(tmp_path: Path, format: str, suffix: str) -> None:
    ckpt = write_checkpoint(tmp_path / "resnet.ckpt", [*SMALL, "model=resnet_se"])
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    result = export(ckpt, format, tmp_path / f"model{suffix}", images=str(tmp_path / "images.npy"))
    assert result["images"] == 48 and result["top1_agreement"] == 1.0
    assert result["max_abs_prob_diff"] < result["tolerance"] == 1e-4


@pytest.mark.slow
def test_predict_from_onnx_equals_predict_from_the_checkpoint(small_ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(1).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8))
    onnx_file = tmp_path / "model.onnx"
    export(small_ckpt, "onnx", onnx_file)
    for label_format in ("name", "index"):
        from_ckpt = predict(small_ckpt, tmp_path / "x.npy", tmp_path / f"ckpt_{label_format}.csv",
                            label_format=label_format, device="cpu", batch_size=16)
        from_onnx = predict(onnx_file, tmp_path / "x.npy", tmp_path / f"onnx_{label_format}.csv",
                            label_format=label_format, batch_size=16)
        rows = list(csv.reader(open(from_onnx)))
        assert rows == list(csv.reader(open(from_ckpt))) and len(rows) == 38


def test_parity_failure_exits_with_the_numbers(small_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    class Shuffled(ExportedModel):
        def probs(self, images):
            return super().probs(images).roll(1, dims=1)

    monkeypatch.setattr(export_mod, "ExportedModel", Shuffled)
    with pytest.raises(ExportError, match=r"disagrees .* top-1 agreement .* max \|prob diff\|"):
        export(small_ckpt, "onnx", tmp_path / "model.onnx")
    saved = json.loads((tmp_path / "model.onnx.parity.json").read_text())
    assert not saved["passed"] and saved["top1_agreement"] < 1


def test_an_op_without_onnx_mapping_is_named(tmp_path: Path) -> None:
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0(x).mean(dim=(2, 3))

    model = Deployable(Bessel(), (0.5,) * 3, (0.25,) * 3)
    example = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ExportError, match="aten::i0.*no ONNX mapping"):
        write_model(model, "onnx", example, tmp_path / "m.onnx", make_metadata(["a", "b", "c"], 8, (0.5,) * 3,
                                                                                (0.25,) * 3))


def test_bad_requests(small_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format='tflite' is not an export format; use one of onnx, torchscript"):
        export(small_ckpt, "tflite", tmp_path / "m.tflite")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        export(foreign, "onnx", tmp_path / "m.onnx")
    with pytest.raises(InputError, match="output is required"):
        export(small_ckpt, "onnx", "")
    (tmp_path / "not.onnx").write_bytes(b"nonsense")
    np.save(tmp_path / "x.npy", np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="not a readable ONNX model"):
        predict(tmp_path / "not.onnx", tmp_path / "x.npy", tmp_path / "p.csv")


@pytest.mark.slow  # a fresh interpreter importing torch
def test_cli_reports_an_unknown_format_in_one_line(small_ckpt: Path, tmp_path: Path) -> None:
    done = run_cli([f"ckpt_path={small_ckpt}", "format=tflite", f"output={tmp_path / 'm.tflite'}"], tmp_path,
                   script="cifar_lab.export")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Error: format='tflite' is not an export format")
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # a fresh interpreter
def test_predict_from_onnx_needs_no_lightning(small_ckpt: Path, tmp_path: Path) -> None:
    export(small_ckpt, "onnx", tmp_path / "model.onnx")
    np.save(tmp_path / "x.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    code = ("import sys; from cifar_lab.cli.predict import predict; "
            f"predict({str(tmp_path / 'model.onnx')!r}, {str(tmp_path / 'x.npy')!r}, {str(tmp_path / 'p.csv')!r}); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4


def test_parity_check_prints_progress(small_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CIFAR_LAB_PROGRESS_S", "0")
    export(small_ckpt, "torchscript", tmp_path / "model.pt", batch_size=16)
    out = capsys.readouterr().out
    assert [line.split(",")[0] for line in out.splitlines() if line.startswith("parity (torchscript): ")][:4] == [
        f"parity (torchscript): {i}/4 batches" for i in range(1, 5)]
