"""The benchmark command: data detection, the reference dataset, settings, report, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches, write_image_folder

from cifar_lab.tools import bench


def test_detect_data_layouts(tmp_path: Path) -> None:
    assert bench.detect_data(tmp_path / "missing") == "generated"
    write_cifar_batches(tmp_path / "batches")
    assert bench.detect_data(tmp_path / "batches") == "batches"
    write_image_folder(tmp_path / "folder")
    assert bench.detect_data(tmp_path / "folder") == "folder"


def test_default_data_root_follows_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("CIFAR_LAB_DATA", raising=False)
    assert bench.default_data_root() == Path("data")
    monkeypatch.setenv("CIFAR_LAB_DATA", "/somewhere")
    assert bench.default_data_root() == Path("/somewhere")


def test_reference_dataset_on_each_layout(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "batches")
    write_image_folder(tmp_path / "folder")
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    cases = {
        "batches": (tmp_path / "batches", None, 100),
        "folder": (tmp_path / "folder", None, 18),
        "generated": (tmp_path, (images, labels), 10),
    }
    for kind, (root, generated, n) in cases.items():
        dataset, description = bench.reference_dataset(kind, root, generated)
        assert len(dataset) == n and description
        x, y = dataset[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


def test_pil_images_serve_like_cifar10() -> None:
    from torchvision import transforms as T

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ds = bench.PILImages(images, np.array([3, 1, 4, 1]), T.ToTensor())
    x, y = ds[2]
    assert y == 4
    torch.testing.assert_close(x, torch.from_numpy(images[2]).permute(2, 0, 1).float() / 255)


def test_settings_scale_down_for_tests() -> None:
    args = bench._parser().parse_args(["--quick", "--steps", "2", "--repeats", "1", "--batch-size", "16",
                                       "--models", "simple_cnn"])
    s = bench.Settings.for_run(args)
    assert s.quick and s.train_steps == 2 and s.repeats == 1 and s.overhead_repeats == 1
    assert s.batch_size == 16 and s.heavy_batch_size <= 16 and s.models == ("simple_cnn",)
    assert not s.ablation
    full = bench.Settings.for_run(bench._parser().parse_args([]))
    assert full.ablation and full.batch_size == 128 and full.models == bench.MODELS


def test_interleaving_alternates_order() -> None:
    calls: list[str] = []
    runners = {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}
    out = bench._interleaved(3, runners, lambda _msg: None)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}


def test_time_steps_skips_the_first_batch_and_warmup() -> None:
    steps: list[int] = []
    batches = iter([(torch.tensor(i), None) for i in range(10)])
    rate = bench.time_steps(batches, lambda x, y: steps.append(int(x)), warmup=2, count=3, batch_size=4,
                            device=torch.device("cpu"))
    assert steps == [0, 1, 2, 3, 4] and rate > 0


def test_lab_batches_are_augmented_like_training(tmp_path: Path) -> None:
    cfg = bench.compose(["data=synthetic", "data.source.train_size=64", "data.source.test_size=16",
                         "data.val_size=0", "model=simple_cnn"])
    dm = bench.lab_datamodule(cfg, 16)
    x, y = next(bench.lab_batches(dm, torch.device("cpu")))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.shape == (16,)
    assert x.is_contiguous(memory_format=torch.channels_last)  # simple_cnn's config: channels_last
    assert not torch.allclose(x, dm.normalize(dm.splits["train"][0][:16]))


def test_format_table_reports_every_part() -> None:
    res = {
        "machine": {"cpu": "CPU", "cores": 2, "gpu": None, "torch": "2", "torch_threads": 2,
                    "loadavg_start": [1, 1, 1], "loadavg_end": [1, 1, 1]},
        "data_source": "generated", "reference_dataset": "PIL",
        "data": {"batch_size": 128, "reference": {"median": 8800.0}, "cifar_lab": {"median": 60000.0, "output": "f32"},
                 "speedup": 6.8},
        "train": {"simple_cnn": {"batch_size": 128, "reference": {"median": 300.0}, "cifar_lab": {"median": 900.0, "settings": "bf16"},
                                 "speedup": 3.0, "ablation": {"32 NCHW": {"median": 400.0}}}},
        "overhead": {"model_name": "simple_cnn", "batch_size": 128, "precision": "bf16-mixed", "ratio": 1.02,
                     "ratio_from_tiny_overhead": 1.03,
                     "model": {"plain_median_step_ms": 100.0, "lightning_median_step_ms": 102.0, "ratio": 1.02},
                     "tiny": {"plain_median_step_ms": 10.0, "lightning_median_step_ms": 12.0, "median_paired_difference_ms": 2.0}},
        "memory": {"available": True, "peak_rss_increase_mb": 300.0, "peak_ratio": 1.6, "dataset_uint8_mb": 180.0, "val_size": 5000},
    }
    table = bench.format_table(res)
    for text in ("6.8x", "3.00x", "1.020 ratio", "1.60x", "ablation simple_cnn"):
        assert text in table


@pytest.mark.slow
def test_quick_benchmark_on_generated_data_writes_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_DATA", str(tmp_path / "no_data_here"))
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--steps", "1", "--repeats", "1", "--batch-size", "16", "--heavy-batch-size", "4",
                       "--generated-size", "400", "--workers", "1", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["data_source"] == "generated"
    assert res["data_speedup"] > 0
    assert set(res["train_speedup"]) == set(bench.MODELS)
    assert all(v > 0 for v in res["train_speedup"].values())
    assert res["lightning_overhead"] > 0
    assert res["memory"]["available"] in (True, False)
    for key in ("cpu", "cores", "torch", "date", "gpu"):
        assert key in res["machine"]
