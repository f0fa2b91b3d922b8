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
                         "data.val_size=0", "model=simple_cnn", "module.memory_format=channels_last"])
    dm = bench.lab_datamodule(cfg, 16)
    x, y = next(bench.lab_batches(dm, torch.device("cpu")))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.shape == (16,)
    assert x.is_contiguous(memory_format=torch.channels_last)  # the config's layout: channels_last
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
                     "tiny": {"plain_median_step_ms": 10.0, "lightning_median_step_ms": 12.0, "median_paired_difference_ms": 2.0},
                     "lightning_floor": {"plain_median_step_ms": 0.11, "lightning_median_step_ms": 0.42,
                                         "median_paired_difference_ms": 0.31}},
        "memory": {"available": True, "peak_rss_increase_mb": 300.0, "peak_ratio": 1.6, "dataset_uint8_mb": 180.0, "val_size": 5000},
    }
    res["overhead"]["callbacks"] = {
        "none": {"lightning_median_step_ms": 1.50}, "default": {"lightning_median_step_ms": 1.62},
        "default_minus_none_ms": 0.12, "per_callback_total_us": 95.0,
        "per_callback_us": {"ModelCheckpoint": 8.5, "NonFiniteLossGuard": 6.25, "FitMetrics": 0.25}}
    table = bench.format_table(res)
    for text in ("6.8x", "3.00x", "1.020 ratio", "1.60x", "ablation simple_cnn", "+0.31 ms  Lightning's floor",
                 "no callbacks vs the default set", "+0.12 ms", "3 callbacks, 95 us a step"):
        assert text in table, text
    # one row per callback, the costliest first
    rows = [line.split(", us per step")[0].strip() for line in table.splitlines() if ", us per step" in line]
    assert rows == ["callback ModelCheckpoint", "callback NonFiniteLossGuard", "callback FitMetrics"]
    assert "6.2" in next(line for line in table.splitlines() if "NonFiniteLossGuard" in line)
    # the autotuned pair against the best pair of the ablation, and the speedrun's GFLOP/s
    res["train"]["simple_cnn"]["default_over_best"] = {
        "ratio": 0.8, "default": "bf16", "default_images_per_s": 320.0, "best": "32 NCHW", "best_images_per_s": 400.0}
    res["speedrun"] = {
        "model": "speedrun_net", "batch_size": 1024, "precision": "bf16-mixed", "memory_format": "channels_last",
        "train_flops": 7.2e11, "median_step_s": 2.4, "achieved_gflops": 300.0, "peak_precision": "bf16",
        "peak_matmul": {"n": 2048, "gflops": {"bf16": 400.0, "fp32": 200.0}},
        "fraction_of_peak": 0.75, "fraction_of_bf16_peak": 0.75}
    # autotune's compile decision (module.compile=auto): a faster compiled step that does not pay here
    res["train"]["simple_cnn"]["autotune"] = {"source": "measured", "compile": False, "compile_timing": {
        "eager_s": 0.05, "compiled_s": 0.04, "compile_s": 60.0, "steps": 3910, "saved_s": -20.9}}
    table = bench.format_table(res)
    for text in ("default / best simple_cnn", "0.800 ratio", "best 32 NCHW", "speedrun_net step GFLOP/s",
                 "0.750 of peak", "bf16 400", "fp32 200", "720.0 GFLOP/step",
                 "compile simple_cnn: step ms eager vs compiled", "1.25x", "compiling 60 s, 3910 steps: eager"):
        assert text in table, text


def test_default_over_best_is_taken_from_the_ablation() -> None:
    ablation = {"32 NCHW": {"median": 100.0}, "32 channels_last": {"median": 200.0},
                "bf16-mixed NCHW": {"median": 190.0}, "bf16-mixed channels_last": {"median": 160.0},
                "32 channels_last 1 thread": {"median": 500.0}}
    pairs = ["bf16-mixed channels_last", "bf16-mixed NCHW", "32 channels_last", "32 NCHW"]
    r = bench.default_over_best(ablation, "bf16-mixed NCHW", pairs)  # the threads variant is no pair
    assert r["best"] == "32 channels_last" and r["ratio"] == pytest.approx(0.95)
    assert r["default_images_per_s"] == 190.0 and r["best_images_per_s"] == 200.0
    assert bench.default_over_best(ablation, "32 channels_last", pairs)["ratio"] == 1.0
    assert bench.default_over_best(ablation, "32 NCHW")["best"] == "32 channels_last 1 thread"  # every entry
    assert bench.default_over_best(ablation, "16-mixed NCHW", pairs)["ratio"] is None


def test_default_over_best_counts_only_timed_pairs() -> None:
    ablation = {"32 channels_last": {"median": 300.0}, "32 NCHW": {"median": 280.0},
                "bf16-mixed channels_last": {"median": None, "probe_ratio": 13.6}}
    r = bench.default_over_best(ablation, "32 NCHW", list(ablation))
    assert r["best"] == "32 channels_last" and r["ratio"] == pytest.approx(280 / 300)
    assert bench.default_over_best(ablation, "bf16-mixed channels_last", list(ablation))["ratio"] is None


def test_interleaved_stops_a_runner_far_behind_after_its_first_repeat() -> None:
    calls: list[str] = []

    def runner(name: str, value: float):
        return lambda: (calls.append(name), value)[1]

    runners = {"a": runner("a", 100.0), "slow": runner("slow", 20.0), "b": runner("b", 30.0)}
    stopped: dict[str, str] = {}
    runs = bench._interleaved(4, runners, lambda _: None, give_up=4.0, stopped=stopped)
    # 5x behind the fastest first repeat: one repeat; 3.3x is within give_up: every repeat
    assert runs == {"a": [100.0] * 4, "slow": [20.0], "b": [30.0] * 4} and calls.count("slow") == 1
    assert stopped == {"slow": "stopped after its first repeat: 5.0x slower than the fastest"}
    assert bench._interleaved(2, runners, lambda _: None)["slow"] == [20.0, 20.0]  # no give_up: every repeat


EMULATED = {"bf16-mixed": {"source": "cache", "fp32_s": 0.001, "reduced_s": 0.0136, "ratio": 13.6,
                           "note": "not timed: bf16-mixed convolution 13.6x slower than fp32 here (probe)"}}


def _fake_ablation(default, probe: dict, speeds: dict, repeats: int = 4):
    """bench_ablation on fake runners (images/s per variant) and a fake precision probe."""
    built, asked = [], []

    def runner(cfg, variant, bs, settings, device):
        built.append(variant.name)
        return lambda: speeds[variant.name]

    def probes(cfg, precisions, device):
        asked.append(list(precisions))
        return {p: probe.get(p, {"ratio": 0.8, "note": ""}) for p in precisions if p != "32"}

    settings = bench.Settings(repeats=2 * repeats)
    res = bench.bench_ablation("simple_cnn", ["data=synthetic", "model=simple_cnn"], default, 8, settings,
                               torch.device("cpu"), lambda _: None, probes=probes, runner=runner)
    return res, built, asked


def test_ablation_leaves_a_precision_the_probe_rules_out_untimed(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    speeds = {"32 channels_last": 300.0, "32 NCHW": 280.0, "32 NCHW 1 thread": 200.0}
    res, built, asked = _fake_ablation(bench.LabVariant("32", False), EMULATED, speeds)
    assert sorted(built) == ["32 NCHW", "32 NCHW 1 thread", "32 channels_last"]  # no bf16 runner even built
    ab = res["ablation"]
    assert list(ab) == [v.name for v in bench.ablation_variants(bench.LabVariant("32", False), torch.device("cpu"))] \
        + ["32 NCHW 1 thread"]  # every pair listed, in autotune's order
    for name in ("bf16-mixed channels_last", "bf16-mixed NCHW"):
        assert ab[name] == {"images_per_s": [], "median": None, "probe_ratio": 13.6,
                            "note": "not timed: bf16-mixed convolution 13.6x slower than fp32 here (probe)"}
        assert bench.ablation_cell(ab[name]) == "not timed (probe 13.6x)"
    assert ab["32 NCHW"]["images_per_s"] == [280.0] * 4 and "note" not in ab["32 NCHW"]
    r = res["default_over_best"]
    assert r["best"] == "32 channels_last" and r["ratio"] == pytest.approx(280 / 300)
    assert len(asked) == 1 and "bf16-mixed" in asked[0]  # the probe asked once, for the pairs but the default


def test_ablation_times_the_default_and_a_precision_at_native_speed(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    speeds = {"32 channels_last": 300.0, "32 NCHW": 60.0, "bf16-mixed channels_last": 500.0, "bf16-mixed NCHW": 450.0}
    # explicit bf16 NCHW where the probe rules bf16 out: the default is timed, its sibling pair is not
    res, built, _ = _fake_ablation(bench.LabVariant("bf16-mixed", False), EMULATED, speeds)
    assert "bf16-mixed NCHW" in built and "bf16-mixed channels_last" not in built
    assert res["ablation"]["bf16-mixed channels_last"]["median"] is None
    # the NCHW fp32 pair 5x behind after its first repeat: stopped there, its one figure kept
    assert res["ablation"]["32 NCHW"]["images_per_s"] == [60.0] and "stopped" in res["ablation"]["32 NCHW"]["note"]
    assert bench.ablation_cell(res["ablation"]["32 NCHW"]) == "60.0 (1 repeat: stopped)"
    assert res["default_over_best"]["best"] == "bf16-mixed NCHW"
    # bf16 at native speed: every pair timed
    res, built, _ = _fake_ablation(bench.LabVariant("bf16-mixed", True), {}, speeds)
    assert sorted(built) == sorted(speeds) and res["default_over_best"]["ratio"] == 1.0


def _autotune_check():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "autotune_check.py"
    spec = importlib.util.spec_from_file_location("autotune_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_autotune_check_table_shows_untimed_pairs_and_judges_the_timed() -> None:
    untimed = {"images_per_s": [], "median": None, "probe_ratio": 13.6, "note": EMULATED["bf16-mixed"]["note"]}
    decision = {"precision": "32", "memory_format": "channels_last", "decided": True, "margin": 0.08,
                "spread": 0.03, "rounds": 6, "measuring_s": 9.5, "probe": {"bf16-mixed": EMULATED["bf16-mixed"]}}

    def model(default: float, best: float) -> dict:
        ablation = {"32 channels_last": {"median": default}, "32 NCHW": {"median": best},
                    "bf16-mixed channels_last": untimed, "bf16-mixed NCHW": untimed}
        return {"batch_size": 128, "ablation": ablation, "autotune": decision,
                "default_over_best": bench.default_over_best(ablation, "32 channels_last", list(ablation))}

    res = {"machine": {"cpu": "AMD EPYC", "cpu_bf16": [], "torch_threads": 2, "torch": "2", "date": "2026-12-06"},
           "data_source": "batches in /data", "wall_s": 600.0, "train": {"simple_cnn": model(300.0, 290.0)}}
    text, ok = _autotune_check().table(res)
    row = next(line for line in text.splitlines() if line.startswith("| simple_cnn"))
    assert ok and row.count("not timed (probe 13.6x)") == 2 and "**300**" in row and "| 290 |" in row
    assert row.endswith("| 1.000 |") and "| 8% | 3% | 6 | 9.5 s |" in row
    assert "a bf16-mixed convolution took 13.6x fp32's time here; over autotune.probe_slower" in text
    res["train"]["attention_net"] = model(25.0, 30.0)  # 0.83x of the best timed pair: below the target
    text, ok = _autotune_check().table(res)
    assert not ok and "| 0.833 |" in text and "or better: NO" in text


def test_ablation_holds_the_autotuned_pair() -> None:
    cpu = torch.device("cpu")
    default = bench.LabVariant("bf16-mixed", False)
    names = [v.name for v in bench.ablation_variants(default, cpu)]
    assert sorted(names) == sorted(["32 NCHW", "32 channels_last", "bf16-mixed NCHW", "bf16-mixed channels_last"])
    assert default.name in names
    explicit = [v.name for v in bench.ablation_variants(bench.LabVariant("16-mixed", True), cpu)]
    assert len(explicit) == 5 and explicit[-1] == "16-mixed channels_last"


def test_matmul_peak_is_positive() -> None:
    assert bench.matmul_peak(torch.float32, n=32, repeats=2) > 0
    assert bench.matmul_peak(torch.bfloat16, n=32, repeats=2) > 0


def test_flops_of_a_linear_layer_match_the_hand_count() -> None:
    net = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert bench.forward_flops(net, x) == 2 * 8 * 4 * 2 == 128  # 2 FLOPs per multiply-add
    assert bench.training_flops(net, x) == 3 * 128 == 384


def test_speedrun_net_composes_as_its_experiment() -> None:
    s = bench.Settings.for_run(bench._parser().parse_args(["--models", "speedrun_net"]))
    assert s.batch_for("speedrun_net") == 1024 and s.speedrun and s.models == ("speedrun_net",)
    quick = bench.Settings.for_run(bench._parser().parse_args(["--quick", "--speedrun"]))
    assert quick.speedrun and quick.batch_for("speedrun_net") < 1024
    assert not bench.Settings.for_run(bench._parser().parse_args(["--quick"])).speedrun
    cfg = bench.compose(["data=synthetic", *bench.model_overrides("speedrun_net")])
    assert cfg.model._target_.endswith("SpeedrunNet") and cfg.data.batch_size == 1024
    assert bench.model_overrides("simple_cnn") == ["model=simple_cnn"]


def test_autotuned_writes_a_concrete_choice(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path))
    cfg = bench.compose(["data=synthetic", "model=simple_cnn", "trainer.precision=32"])
    assert cfg.module.memory_format == "auto"
    calls, stepped = [], []

    def fake_step_factory(cfg, precision, memory_format, device, batch_size):
        calls.append((precision, memory_format, batch_size))
        return lambda: (stepped.append((precision, memory_format)), 1.0)[1]

    seconds = {("32", "channels_last"): 1.0, ("32", "contiguous"): 2.0}  # a fake clock per step
    settled = bench.autotuned(cfg, 24, step_factory=fake_step_factory,
                              timer=lambda step: (step(), seconds[stepped[-1]])[1])
    decision = settled.decision
    assert (decision.precision, decision.memory_format, decision.source) == ("32", "channels_last", "measured")
    final = settled.cfg
    assert (final.trainer.precision, final.module.memory_format, final.data.batch_size) == ("32", "channels_last", 24)
    assert final.module.compile is False and cfg.module.memory_format == "auto"  # the composed config is left as it was
    assert {c[2] for c in calls} == {24}  # measured at the benchmark's batch size
    again = bench.autotuned(bench.compose(["data=synthetic", "model=simple_cnn", "trainer.precision=32"]), 24)
    assert again.decision.source == "cache" and again.cfg.module.memory_format == "channels_last"  # the user's cache


@pytest.mark.slow
def test_quick_benchmark_on_generated_data_writes_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_DATA", str(tmp_path / "no_data_here"))
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--steps", "1", "--repeats", "1", "--batch-size", "16", "--heavy-batch-size", "4",
                       "--generated-size", "400", "--workers", "1", "--out", str(out),
                       # autotune decides the choice the table reports in at most 3 rounds: its own
                       # tests cover how it measures (under a loaded suite it took most of this test's time)
                       "autotune.max_rounds=3", "autotune.min_rounds=2"])
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
    for t in res["train"].values():  # the autotuned choice, as a training run would make it
        assert t["autotune"]["precision"] in ("32", "bf16-mixed", "16-mixed")
        assert t["autotune"]["memory_format"] in ("channels_last", "contiguous")
        assert t["cifar_lab"]["settings"].startswith(t["autotune"]["precision"])
    assert res["overhead"]["precision"] != "auto"
    callbacks = res["overhead"]["callbacks"]  # the default set against none, and each callback's microseconds
    assert {"NonFiniteLossGuard", "ModelCheckpoint", "EpochLines"} <= set(callbacks["per_callback_us"])
    assert callbacks["default"]["steps_timed"] > 0 and callbacks["none"]["steps_timed"] > 0
    floor = res["overhead"]["lightning_floor"]  # Lightning alone: both sides timed, paired step by step
    assert floor["steps_timed"] > 0 and floor["plain_median_step_ms"] > 0 and floor["lightning_median_step_ms"] > 0
    assert "speedrun" not in res and res["default_over_best"] == {}  # --quick: neither


@pytest.mark.slow
def test_ablation_and_speedrun_on_a_tiny_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_DATA", str(tmp_path / "no_data_here"))
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--steps", "1", "--repeats", "1", "--batch-size", "8", "--generated-size", "200",
                       "--workers", "1", "--models", "simple_cnn", "--ablation", "--speedrun",
                       "--speedrun-batch-size", "4", "--skip", "data", "memory", "overhead", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    t = res["train"]["simple_cnn"]
    default = t["cifar_lab"]["settings"]
    assert default in t["ablation"] and t["default_over_best"]["default"] == default
    assert 0 < res["default_over_best"]["simple_cnn"] <= 1
    s = res["speedrun"]
    assert s["batch_size"] == 4 and s["train_flops"] == 3 * s["forward_flops"] > 0
    assert s["peak_matmul"]["n"] == 256  # --steps scales the peaks' matmuls down too
    assert s["achieved_gflops"] > 0 and s["peak_matmul"]["gflops"]["bf16"] > 0 and s["peak_matmul"]["gflops"]["fp32"] > 0
    assert s["fraction_of_peak"] > 0 and res["speedrun_fraction_of_peak"] == s["fraction_of_peak"]


def test_lab_batches_are_those_of_the_runs_last_epoch() -> None:
    """The speedrun trains at 24 px in epochs 0-2 and at 32 px from epoch 3: the bench's batches are 32 px,
    the size the reference trains at."""
    cfg = bench.compose(["data=synthetic", *bench.model_overrides("speedrun_net"), "module.memory_format=contiguous"])
    dm = bench.lab_datamodule(cfg, 8)
    assert dm.trainer.current_epoch == cfg.trainer.max_epochs - 1 > 2
    x, _ = next(bench.lab_batches(dm, torch.device("cpu")))
    assert x.shape[-1] == 32
