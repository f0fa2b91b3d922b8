"""Autotune: `auto` precision and memory format are measured, cached, never override an explicit
value, drop unstable candidates, and agree across DDP ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_lab import autotune
from cifar_lab.cli.train import train
from conftest import SYNTH, compose_cfg

# SYNTH with the defaults put back: both values measured
AUTO = [*SYNTH, "trainer.precision=auto", "module.memory_format=auto"]


class FakeDevice:
    """Step functions whose duration and loss the test sets per candidate, on a fake clock."""

    def __init__(self, seconds: dict[tuple[str, str], float], losses: dict[tuple[str, str], float] | None = None):
        self.seconds, self.losses = seconds, losses or {}
        self.built: list[tuple[str, str]] = []
        self.steps: dict[tuple[str, str], int] = {}
        self.current: tuple[str, str] | None = None

    def step_factory(self, cfg, precision, memory_format, device, batch_size):
        pair = (precision, memory_format)
        self.built.append(pair)

        def step() -> float:
            self.current = pair
            self.steps[pair] = self.steps.get(pair, 0) + 1
            return self.losses.get(pair, 1.0)

        return step

    def timer(self, step) -> float:
        step()
        return self.seconds[self.current]


def _cfg(tmp_path: Path, *extra: str):
    return compose_cfg([*AUTO, *extra], tmp_path / "run")


def _decide(cfg, fake: FakeDevice, run_dir=None, rank: int = 0):
    return autotune.decide(cfg, run_dir, rank=rank, timer=fake.timer, step_factory=fake.step_factory)


def test_the_faster_candidate_is_chosen_and_written_into_the_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fake = FakeDevice({("bf16-mixed", "channels_last"): 0.30, ("bf16-mixed", "contiguous"): 0.20,
                       ("32", "channels_last"): 0.50, ("32", "contiguous"): 0.55})
    decision = _decide(cfg, fake)
    assert (decision.precision, decision.memory_format, decision.source) == ("bf16-mixed", "contiguous", "measured")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.module.memory_format == "contiguous"
    speeds = {(c.precision, c.memory_format): c.images_per_s for c in decision.table}
    assert speeds[("bf16-mixed", "contiguous")] == pytest.approx(cfg.data.batch_size / 0.20)
    # 0.50 s is more than 1.5x the best 0.20 s: both fp32 candidates stop after their first timed step
    assert fake.steps[("32", "channels_last")] == 2 and fake.steps[("32", "contiguous")] == 2
    assert fake.steps[("bf16-mixed", "contiguous")] == 3  # warm-up + 2 timed
    assert "| bf16-mixed | contiguous |" in autotune.format_table(decision)


def test_a_second_run_with_the_same_setup_hits_the_cache(tmp_path: Path) -> None:
    first = FakeDevice({("bf16-mixed", "channels_last"): 0.1, ("bf16-mixed", "contiguous"): 0.2,
                        ("32", "channels_last"): 0.3, ("32", "contiguous"): 0.4})
    _decide(_cfg(tmp_path, "model.fc_units=48"), first)
    again = FakeDevice({})
    decision = _decide(_cfg(tmp_path, "model.fc_units=48"), again)
    assert decision.source == "cache" and again.built == []
    assert (decision.precision, decision.memory_format) == ("bf16-mixed", "channels_last")
    # another network (or batch size) is another setup: measured again
    other = FakeDevice(first.seconds)
    assert _decide(_cfg(tmp_path, "model.fc_units=40"), other).source == "measured" and other.built


def test_explicit_values_are_never_measured(tmp_path: Path) -> None:
    fake = FakeDevice({})
    decision = _decide(_cfg(tmp_path, "trainer.precision=32", "module.memory_format=contiguous"), fake)
    assert (decision.precision, decision.memory_format, decision.source) == ("32", "contiguous", "explicit")
    assert fake.built == []
    # one explicit, one auto: only the auto one varies
    fake = FakeDevice({("32", "channels_last"): 0.2, ("32", "contiguous"): 0.1})
    decision = _decide(_cfg(tmp_path, "trainer.precision=32", "model.fc_units=24"), fake)
    assert sorted(fake.built) == [("32", "channels_last"), ("32", "contiguous")]
    assert (decision.precision, decision.memory_format) == ("32", "contiguous")


def test_a_candidate_with_a_non_finite_loss_is_dropped(tmp_path: Path) -> None:
    fake = FakeDevice({("bf16-mixed", "channels_last"): 0.05, ("bf16-mixed", "contiguous"): 0.3,
                       ("32", "channels_last"): 0.2, ("32", "contiguous"): 0.25},
                      losses={("bf16-mixed", "channels_last"): float("nan")})
    decision = _decide(_cfg(tmp_path, "model.fc_units=20"), fake)
    assert (decision.precision, decision.memory_format) == ("32", "channels_last")
    dropped = next(c for c in decision.table if (c.precision, c.memory_format) == ("bf16-mixed", "channels_last"))
    assert dropped.images_per_s is None and "not finite" in dropped.note


def test_ddp_ranks_agree(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake = FakeDevice({("bf16-mixed", "channels_last"): 0.4, ("bf16-mixed", "contiguous"): 0.3,
                       ("32", "channels_last"): 0.1, ("32", "contiguous"): 0.2})
    zero = _decide(_cfg(tmp_path, "model.fc_units=16"), fake, run_dir, rank=0)
    never = FakeDevice({})
    other_cfg = _cfg(tmp_path, "model.fc_units=16")
    one = _decide(other_cfg, never, run_dir, rank=1)
    assert never.built == []  # rank 1 measures nothing
    assert (one.precision, one.memory_format, one.source) == (zero.precision, zero.memory_format, "rank 0")
    assert other_cfg.trainer.precision == "32" and other_cfg.module.memory_format == "channels_last"


def test_measuring_leaves_the_runs_random_stream_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autotune.decide(_cfg(tmp_path, "model.fc_units=12", "data.batch_size=8", "autotune.steps=1"), None)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_a_run_records_the_choice_in_metrics_and_tensorboard(tmp_path: Path) -> None:
    cfg = compose_cfg([*AUTO, "model.fc_units=32", "data.batch_size=32", "debug=fast_dev_run", "logger=tensorboard"],
                      tmp_path / "run")
    train(cfg)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["precision"] in ("32", "bf16-mixed") and summary["memory_format"] in ("channels_last", "contiguous")
    assert summary["autotune"]["source"] == "measured" and len(summary["autotune"]["table"]) == 4
    chosen = max((c for c in summary["autotune"]["table"] if c["images_per_s"]), key=lambda c: c["images_per_s"])
    assert (chosen["precision"], chosen["memory_format"]) == (summary["precision"], summary["memory_format"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any("autotune" in tag for tag in events.Tags()["tensors"])


def test_a_resume_keeps_the_checkpoints_choice(tmp_path: Path) -> None:
    saved = {"trainer": {"precision": "bf16-mixed"}, "module": {"memory_format": "contiguous"}}
    fake = FakeDevice({})
    cfg = _cfg(tmp_path)
    decision = autotune.decide(cfg, None, saved, timer=fake.timer, step_factory=fake.step_factory)
    assert (decision.precision, decision.memory_format, decision.source) == ("bf16-mixed", "contiguous", "checkpoint")
    assert fake.built == []


class FakeCompiler:
    """Eager and compiled steps on a fake clock: the compiled first step pays ``compile_s``."""

    def __init__(self, eager_s: float, compiled_s: float, compile_s: float) -> None:
        self.eager_s, self.compiled_s, self.compile_s = eager_s, compiled_s, compile_s
        self.built: list[bool] = []
        self.calls = {True: 0, False: 0}
        self.current = False

    def step_factory(self, cfg, precision, memory_format, device, batch_size, compile=False):
        self.built.append(compile)

        def step() -> float:
            self.current = compile
            self.calls[compile] += 1
            return 1.0

        return step

    def timer(self, step) -> float:
        step()
        if self.current:
            return self.compiled_s + (self.compile_s if self.calls[True] == 1 else 0.0)
        return self.eager_s


def _compile_cfg(tmp_path: Path, epochs: int, *extra: str):
    # explicit precision and format: only the compile candidate is measured
    return compose_cfg([*SYNTH, "module.compile=auto", f"trainer.max_epochs={epochs}", "data.batch_size=100",
                        *extra], tmp_path / "run")


@pytest.mark.parametrize("epochs, train_images, compiled", [
    (1, 1000, False),    # 10 steps save 10 x 0.05 s = 0.5 s: compiling (30 s) does not pay
    (100, 1000, True),   # 1000 steps save 50 s > 30 s
    (59, 1000, False),   # 590 steps save 29.5 s < 30 s
    (61, 1000, True),    # 610 steps save 30.5 s > 30 s
    (5, None, True),     # the length unknown: counted as long, the faster step wins
])
def test_compile_is_chosen_only_when_the_run_pays_for_it(tmp_path: Path, monkeypatch, epochs, train_images,
                                                        compiled) -> None:
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _compile_cfg(tmp_path, epochs)
    fake = FakeCompiler(eager_s=0.10, compiled_s=0.05, compile_s=30.0)
    decision = autotune.decide(cfg, None, timer=fake.timer, step_factory=fake.step_factory,
                               train_images=train_images)
    assert decision.compile is compiled and cfg.module.compile is compiled
    assert decision.compile_timing["compile_s"] == pytest.approx(30.0)
    assert decision.record()["compile"] is compiled


def test_a_slower_compiled_step_is_never_chosen(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    fake = FakeCompiler(eager_s=0.05, compiled_s=0.06, compile_s=1.0)
    decision = autotune.decide(_compile_cfg(tmp_path, 1000), None, timer=fake.timer,
                               step_factory=fake.step_factory, train_images=10_000)
    assert decision.compile is False and decision.compile_timing["saved_s"] < 0


def test_the_compile_timing_is_cached_and_reused_for_a_run_of_another_length(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    first = FakeCompiler(eager_s=0.10, compiled_s=0.05, compile_s=30.0)
    short = autotune.decide(_compile_cfg(tmp_path, 1), None, timer=first.timer, step_factory=first.step_factory,
                            train_images=1000)
    assert short.compile is False and first.built == [False, True]
    never = FakeCompiler(eager_s=9.0, compiled_s=9.0, compile_s=9.0)  # would decide otherwise if it were asked
    long = autotune.decide(_compile_cfg(tmp_path, 100), None, timer=never.timer, step_factory=never.step_factory,
                           train_images=1000)
    assert long.compile is True and never.built == []  # the same timing, a longer run


@pytest.mark.slow
def test_a_run_records_the_compile_decision_in_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_cfg([*SYNTH, "module.compile=auto", "trainer.max_epochs=1", "logger=none",
                       "data.source.train_size=200", "data.source.test_size=50", "data.val_size=50"],
                      tmp_path / "run")
    # a cached timing where compiling never pays back in one short epoch: nothing is compiled here
    key = autotune.cache_key(cfg, torch.device("cpu"), int(cfg.data.batch_size),
                             [(str(cfg.trainer.precision), str(cfg.module.memory_format), "compile")])
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "autotune.json").write_text(json.dumps({key: {"eager_s": 0.02, "compiled_s": 0.01,
                                                                        "compile_s": 60.0}}))
    train(cfg)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["autotune"]
    assert recorded["compile"] is False and recorded["compile_timing"]["compile_s"] == 60.0
    assert recorded["compile_timing"]["steps"] == -(-150 // int(cfg.data.batch_size))  # 1 epoch of 150 images
