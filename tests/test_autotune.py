"""Autotune: `auto` precision and memory format are measured in interleaved rounds until sure (on a fake
clock here), cached with what they were measured under, checked by the run, never override an explicit
value, drop unstable candidates, leave a precision the probe found far slower than fp32 untimed, and agree
across DDP ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_lab import autotune
from cifar_lab.autotune import cache, device as autotune_device
from cifar_lab.autotune.probe import ProbeStep
from cifar_lab.callbacks.estimate import Plan, RunEstimate
from cifar_lab.cli.train import train
from conftest import SYNTH, compose_cfg

# SYNTH with the defaults put back: both values measured
AUTO = [*SYNTH, "trainer.precision=auto", "module.memory_format=auto"]
BF16_CL, BF16_NCHW, FP32_CL, FP32_NCHW = (("bf16-mixed", "channels_last"), ("bf16-mixed", "contiguous"),
                                          ("32", "channels_last"), ("32", "contiguous"))


@pytest.fixture(autouse=True)
def _own_cache_and_a_bf16_cpu(tmp_path: Path, monkeypatch) -> None:
    """Each test its own cache; the usual pair is bf16-mixed channels_last whatever CPU runs the tests."""
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune_device, "_native_bf16_cpu", lambda: True)


NATIVE = {"32": 0.002, "bf16-mixed": 0.0016}  # the probe's convolution where bf16 is native: faster than fp32


class FakeDevice:
    """Step functions on a fake clock: ``seconds[pair]`` per step, or a list giving the first steps' times
    (the last repeats), and a loss per pair; the precision probe's convolution takes ``probe[precision]``
    (the same form) per call."""

    def __init__(self, seconds: dict, losses: dict | None = None, probe: dict | None = None):
        self.seconds, self.losses = seconds, losses or {}
        self.probe = {("probe", p): t for p, t in (NATIVE if probe is None else probe).items()}
        self.built: list[tuple[str, str]] = []
        self.probed: list[str] = []  # the precisions the probe built
        self.steps: dict[tuple[str, str], int] = {}
        self.order: list[tuple[str, str]] = []
        self.current: tuple[str, str] | None = None

    def step_factory(self, cfg, precision, memory_format, device, batch_size):
        pair = (precision, memory_format)
        self.built.append(pair)

        def step() -> float:
            self.current = pair
            self.steps[pair] = self.steps.get(pair, 0) + 1
            self.order.append(pair)
            return self.losses.get(pair, 1.0)

        return step

    def probe_steps(self, precision, device) -> ProbeStep:
        self.probed.append(precision)
        key = ("probe", precision)

        def step() -> None:
            self.current = key
            self.steps[key] = self.steps.get(key, 0) + 1
            self.order.append(key)

        return ProbeStep(precision, step)

    def timer(self, step) -> float:
        step()
        times = {**self.seconds, **self.probe}[self.current]
        if isinstance(times, list):
            return times[min(self.steps[self.current], len(times)) - 1]
        return times


def _cfg(tmp_path: Path, *extra: str):
    return compose_cfg([*AUTO, *extra], tmp_path / "run")


def _decide(cfg, fake: FakeDevice, run_dir=None, rank: int = 0, **kwargs):
    return autotune.decide(cfg, run_dir, rank=rank, timer=fake.timer, step_factory=fake.step_factory,
                           probe_steps=fake.probe_steps, **kwargs)


def _pairs_stepped(fake: FakeDevice) -> list:
    return [key for key in fake.order if key[0] != "probe"]


def _speeds(decision) -> dict:
    return {(c.precision, c.memory_format): c.images_per_s for c in decision.table}


def test_the_fastest_pair_wins_in_interleaved_rounds_and_is_written_into_the_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fake = FakeDevice({BF16_CL: 0.30, BF16_NCHW: 0.20, FP32_CL: 0.50, FP32_NCHW: 0.70})
    decision = _decide(cfg, fake)
    assert (decision.precision, decision.memory_format, decision.source) == ("bf16-mixed", "contiguous", "measured")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.module.memory_format == "contiguous"
    assert _pairs_stepped(fake)[:4] == [BF16_CL, BF16_NCHW, FP32_CL, FP32_NCHW]  # A B C D A B ...: interleaved
    assert decision.decided is True and decision.rounds == 4  # min_rounds settled rounds, no noise: sure
    assert decision.margin == pytest.approx(0.5) and decision.spread == pytest.approx(0.0)
    assert decision.measuring_s == pytest.approx(4 * 0.2 + 4 * 0.3 + 4 * 0.5 + 2 * 0.7)
    # 3.5x the leader twice: stopped after 2 rounds; 2.5x is not over give_up: stopped by its margin
    assert fake.steps[FP32_NCHW] == 2 and fake.steps[FP32_CL] == 4
    assert _speeds(decision)[BF16_NCHW] == pytest.approx(cfg.data.batch_size / 0.20)
    assert "stopped early" in next(c.note for c in decision.table if (c.precision, c.memory_format) == FP32_NCHW)
    assert "| bf16-mixed | contiguous |" in autotune.format_table(decision)
    assert decision.label == "measured: 50% ahead of the next pair, 4 rounds, 5.4 s"


def test_a_noisy_first_round_still_gives_the_right_decision(tmp_path: Path) -> None:
    # bf16 NCHW is the fastest, but its first two steps take twice as long (a burst of load, a slow start);
    # measured one candidate after another for 1 warm-up + 2 timed steps it would lose to bf16 channels_last
    fake = FakeDevice({BF16_CL: 0.12, BF16_NCHW: [0.20, 0.20, 0.10], FP32_CL: 0.20, FP32_NCHW: 0.22})
    decision = _decide(_cfg(tmp_path), fake)
    assert (decision.precision, decision.memory_format, decision.decided) == ("bf16-mixed", "contiguous", True)
    noisy = next(c for c in decision.table if (c.precision, c.memory_format) == BF16_NCHW)
    assert noisy.counted == noisy.steps - 2  # its slow steps were warm-up, measured as such
    assert noisy.images_per_s == pytest.approx(decision.batch_size / 0.10)
    assert decision.margin == pytest.approx(0.2)  # 0.12 / 0.10
    assert all(fake.steps[p] >= 3 for p in (FP32_CL, FP32_NCHW))  # twice as slow is not stopped early


def test_a_candidate_far_slower_in_its_first_step_costs_one_step(tmp_path: Path) -> None:
    # bf16 channels_last leads round 0 at 0.1 s; fp32 channels_last's first step 4.5x that (an emulated
    # precision, minutes a step on a heavy network) stops at once; 3.5x is under give_up_first (4)
    fake = FakeDevice({BF16_CL: 0.10, BF16_NCHW: 0.12, FP32_CL: 0.45, FP32_NCHW: 0.35})
    decision = _decide(_cfg(tmp_path), fake)
    assert (decision.precision, decision.memory_format, decision.decided) == ("bf16-mixed", "channels_last", True)
    notes = {(c.precision, c.memory_format): c.note for c in decision.table}
    assert fake.steps[FP32_CL] == 1 and notes[FP32_CL] == "stopped after its first step: 4.5x the leader's first step"
    assert fake.steps[FP32_NCHW] == 2 and notes[FP32_NCHW].startswith("stopped early")  # give_up after 2 steps
    # set wider, the same first step is not enough
    wider = FakeDevice(fake.seconds)
    _decide(_cfg(tmp_path, "autotune.give_up_first=5", "model.fc_units=40"), wider)
    assert wider.steps[FP32_CL] == 2


def test_a_slow_first_step_before_the_leader_ran_is_not_held_against_a_candidate(tmp_path: Path) -> None:
    # the first candidate of round 0 pays the process's one-time start-up costs (5x its settled step): the
    # leader had none to pay, so that first step says nothing, and it goes on to win
    fake = FakeDevice({BF16_CL: [0.5, 0.10], BF16_NCHW: 0.12, FP32_CL: 0.3, FP32_NCHW: 0.35})
    decision = _decide(_cfg(tmp_path), fake)
    assert (decision.precision, decision.memory_format, decision.decided) == ("bf16-mixed", "channels_last", True)
    assert fake.steps[BF16_CL] > 1


def test_a_reduced_precision_far_slower_on_the_probe_is_never_timed(tmp_path: Path) -> None:
    # bf16 emulated: the probe's convolution 6.3x fp32's time once warm (the warm-up calls, 10x, do not
    # count; nor does a disturbed call: each side's fastest counts)
    probe = {"32": [0.05, 0.002, 0.003, 0.002], "bf16-mixed": [0.5, 0.0126, 0.02, 0.013]}
    fake = FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1}, probe=probe)  # a bf16 step would raise KeyError
    decision = _decide(_cfg(tmp_path), fake)
    assert (decision.precision, decision.memory_format, decision.decided) == ("32", "contiguous", True)
    assert fake.built == [FP32_CL, FP32_NCHW] and set(_pairs_stepped(fake)) == {FP32_CL, FP32_NCHW}
    # the probe: one warm-up call each, then 3 interleaved pairs, before any candidate's step
    assert fake.probed == ["32", "bf16-mixed"]
    assert fake.order[:8] == [("probe", "32"), ("probe", "bf16-mixed")] * 4
    assert ("probe", "32") not in fake.order[8:]
    notes = {(c.precision, c.memory_format): (c.images_per_s, c.steps, c.note) for c in decision.table}
    for pair in (BF16_CL, BF16_NCHW):
        assert notes[pair] == (None, 0, "not timed: bf16-mixed convolution 6.3x slower than fp32 here (probe)")
    assert decision.probe["bf16-mixed"]["ratio"] == pytest.approx(6.3) and decision.probe["bf16-mixed"]["source"] \
        == "measured"
    table = autotune.format_table(decision)
    assert "precision probe (measured): a bf16-mixed convolution took 6.3x fp32's time; its candidates not timed" \
        in table and "| bf16-mixed | channels_last | - | 0/0 | - | not timed: bf16-mixed convolution 6.3x" in table
    assert decision.record()["probe"]["bf16-mixed"]["note"].startswith("not timed")  # metrics.json


@pytest.mark.parametrize("reduced_s", [0.0016, 0.0058])  # faster than fp32; 2.9x, under probe_slower (3)
def test_a_probe_at_native_speed_keeps_the_reduced_precision(tmp_path: Path, reduced_s: float) -> None:
    fake = FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4},
                      probe={"32": 0.002, "bf16-mixed": reduced_s})
    decision = _decide(_cfg(tmp_path), fake)
    assert (decision.precision, decision.memory_format) == BF16_CL and len(set(fake.built)) == 4
    assert decision.probe["bf16-mixed"]["note"] == "" and not any("not timed" in c.note for c in decision.table)


def test_the_probe_runs_once_per_machine_setup(tmp_path: Path, monkeypatch, capsys) -> None:
    emulated = {"32": 0.002, "bf16-mixed": 0.0126}
    _decide(_cfg(tmp_path), FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1}, probe=emulated))
    # another network on the same machine: the cached probe, no probe step, bf16 still not timed
    again = FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1}, probe={})
    decision = _decide(_cfg(tmp_path, "model.fc_units=40"), again)
    assert again.probed == [] and decision.probe["bf16-mixed"]["source"] == "cache"
    assert set(again.built) == {FP32_CL, FP32_NCHW}
    # the verdict is the current config's: the same cached figure under a wider probe_slower times bf16
    wider = FakeDevice({BF16_CL: 0.05, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4}, probe={})
    decision = _decide(_cfg(tmp_path, "model.fc_units=24", "autotune.probe_slower=8"), wider)
    assert wider.probed == [] and (decision.precision, decision.memory_format) == BF16_CL
    # `show` lists it with its figures
    code, out, _ = _command(capsys, "show")
    probe_rows = [line for line in out.splitlines() if "| bf16-mixed | 2.00 | 12.60 | 6.3x |" in line]
    assert code == 0 and "Precision probes" in out and len(probe_rows) == 1
    assert "bf16-mixed channels_last not timed (probe)" in out  # the pair rows say which were not timed
    # another thread count is another machine setup: probed again
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    third = FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1}, probe=emulated)
    assert _decide(_cfg(tmp_path), third).probe["bf16-mixed"]["source"] == "measured"
    assert third.probed == ["32", "bf16-mixed"]


def test_the_bench_ablation_leaves_out_what_autotune_left_out(tmp_path: Path) -> None:
    from cifar_lab.tools import bench

    _decide(_cfg(tmp_path), FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1}, probe={"32": 0.002, "bf16-mixed": 0.0126}))
    # the same probe, read from the cache: nothing is measured again
    fake = FakeDevice({}, probe={})
    found = autotune.precision_probes(_cfg(tmp_path), ["32", "bf16-mixed"], torch.device("cpu"), fake.timer,
                                      fake.probe_steps)
    assert fake.probed == [] and list(found) == ["bf16-mixed"] and found["bf16-mixed"]["source"] == "cache"
    note = "not timed: bf16-mixed convolution 6.3x slower than fp32 here (probe)"
    assert found["bf16-mixed"]["note"] == note
    # the bench's ablation asks the same probe, with the same threshold
    default = bench.LabVariant("32", True)
    variants = bench.ablation_variants(default, torch.device("cpu"))
    untimed = bench.not_timed(_cfg(tmp_path), variants, default, torch.device("cpu"))
    assert sorted(untimed) == ["bf16-mixed NCHW", "bf16-mixed channels_last"]
    assert {(u["note"], u["ratio"], u["source"]) for u in untimed.values()} == {(note, 6.3, "cache")}
    # under a wider probe_slower every pair is timed
    assert bench.not_timed(_cfg(tmp_path, "autotune.probe_slower=8"), variants, default, torch.device("cpu")) == {}


def test_an_explicit_precision_is_never_probed(tmp_path: Path) -> None:
    fake = FakeDevice({BF16_CL: 0.2, BF16_NCHW: 0.1}, probe={"32": 0.002, "bf16-mixed": 0.02})
    decision = _decide(_cfg(tmp_path, "trainer.precision=bf16-mixed"), fake)
    assert fake.probed == [] and decision.probe == {} and (decision.precision, decision.memory_format) == BF16_NCHW


def test_the_real_probe_runs_a_convolution_at_both_precisions(tmp_path: Path) -> None:
    from cifar_lab.autotune.probe import conv_step, measure

    calls = []

    def counting_timer(step) -> float:  # a fake clock: the real steps run, nothing is timed
        grads = step()
        calls.append((step.precision, [tuple(g.shape) for g in grads], {g.dtype for g in grads}))
        return 1.0 if step.precision == "32" else 2.0

    found = measure("bf16-mixed", torch.device("cpu"), counting_timer)
    assert found == {"fp32_s": 1.0, "reduced_s": 2.0} and len(calls) == 8
    assert [c[0] for c in calls] == ["32", "bf16-mixed"] * 4
    assert calls[0][1] == [(4, 64, 32, 32), (64, 64, 3, 3)] and all(c[2] == {torch.float32} for c in calls)
    assert conv_step("bf16-mixed", torch.device("cpu")).precision == "bf16-mixed"


def test_equal_candidates_stop_at_the_budget_undecided_with_the_usual_pair(tmp_path: Path, caplog) -> None:
    fake = FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.1, FP32_CL: 0.1, FP32_NCHW: 0.1})
    with caplog.at_level(logging.INFO, logger="cifar_lab.autotune"):
        decision = _decide(_cfg(tmp_path), fake)  # a run of unknown length: the budget is budget_s (5 s)
    assert (decision.precision, decision.memory_format) == BF16_CL and decision.decided is False
    assert decision.rounds == 13 and decision.measuring_s == pytest.approx(5.2)  # 0.4 s a round, 5 s budget
    undecided = [r.message for r in caplog.records if "undecided" in r.message]
    assert len(undecided) == 1 and "using the usual bf16-mixed channels_last" in undecided[0]
    assert decision.label == "measured, undecided: the usual pair"
    assert decision.record()["decided"] is False


def test_the_budget_is_a_share_of_a_long_run_up_to_its_cap(tmp_path: Path) -> None:
    equal = {p: 0.1 for p in (BF16_CL, BF16_NCHW, FP32_CL, FP32_NCHW)}
    # 30 epochs of 50,000 images at batch 128: 11,730 steps of 0.1 s; 2% of that is 23.5 s
    decision = _decide(_cfg(tmp_path, "trainer.max_epochs=30", "data.batch_size=128"), FakeDevice(equal),
                       train_images=50_000)
    assert decision.budget_s == pytest.approx(0.02 * 11_730 * 0.1) and decision.rounds == 59
    # the short run's undecided entry is not the last word for the long run, which may decide
    short = _cfg(tmp_path, "trainer.max_epochs=1", "data.batch_size=128", "model.fc_units=40")
    assert _decide(short, FakeDevice(equal), train_images=1000).budget_s == pytest.approx(5.0)
    again = _decide(_cfg(tmp_path, "trainer.max_epochs=30", "data.batch_size=128", "model.fc_units=40"),
                    FakeDevice(equal), train_images=50_000)
    assert again.source == "measured" and again.reason == "undecided within 5 s; this run allows 23 s"
    capped = _decide(_cfg(tmp_path, "trainer.max_epochs=1000", "model.fc_units=24"), FakeDevice(equal),
                     train_images=50_000)
    assert capped.budget_s == pytest.approx(120.0)


def test_a_second_run_with_the_same_setup_hits_the_cache(tmp_path: Path) -> None:
    first = FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4})
    measured = _decide(_cfg(tmp_path), first)
    again = FakeDevice({})
    decision = _decide(_cfg(tmp_path), again)
    assert decision.source == "cache" and again.built == []
    assert (decision.precision, decision.memory_format) == BF16_CL
    assert (decision.margin, decision.rounds, decision.measured_at) == (measured.margin, measured.rounds,
                                                                        measured.measured_at)
    assert decision.label.startswith("cache: 100% ahead of the next pair, measured ")
    # another network is another setup: measured, with nothing to say why
    other = FakeDevice(first.seconds)
    decision = _decide(_cfg(tmp_path, "model.fc_units=40"), other)
    assert decision.source == "measured" and other.built and decision.reason == ""


@pytest.mark.parametrize("change, reason", [
    ("torch", "torch {torch} -> 9.9.9"),
    ("threads", "threads {threads} -> 7"),
    ("batch", "batch size 128 -> 64"),
])
def test_a_changed_torch_version_thread_count_or_batch_size_measures_again(tmp_path: Path, monkeypatch, change,
                                                                           reason) -> None:
    seconds = {BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4}
    _decide(_cfg(tmp_path, "data.batch_size=128"), FakeDevice(seconds))
    expected = reason.format(torch=torch.__version__, threads=torch.get_num_threads())
    batch = "data.batch_size=128"
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    else:
        batch = "data.batch_size=64"
    fake = FakeDevice(seconds)
    decision = _decide(_cfg(tmp_path, batch), fake)
    assert decision.source == "measured" and fake.built and decision.reason == expected
    assert decision.label.startswith(f"re-measured ({expected}): ")
    monkeypatch.undo()
    monkeypatch.setenv("CIFAR_LAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune_device, "_native_bf16_cpu", lambda: True)
    assert _decide(_cfg(tmp_path, "data.batch_size=128"), FakeDevice({})).source == "cache"  # the first kept


def _trainer(step_compute_s: float, batch: int, size: int = 32, **module) -> SimpleNamespace:
    """What check_run reads of a finished run: its RunEstimate's plan of the first steps."""
    estimate = RunEstimate()
    estimate.plan = Plan(step_compute_s=step_compute_s, step_rest_s=0.01, measured_size=size, batch_images=batch,
                         native_size=32, batches=20, epoch_sizes={0: size}, val_images={}, test_images=0,
                         test_views=1)
    return SimpleNamespace(is_global_zero=True, world_size=1, callbacks=[estimate],
                           lightning_module=SimpleNamespace(device=torch.device("cpu"), net=torch.nn.Linear(1, 1),
                                                            teacher=module.get("teacher")),
                           datamodule=SimpleNamespace(pipeline="batched", num_workers=0))


def test_a_wrong_cached_entry_is_measured_again_after_a_run_whose_steps_contradict_it(tmp_path: Path,
                                                                                      caplog) -> None:
    # a measurement that went wrong (a fluke): bf16 channels_last promised at 0.01 s a step
    planted = _decide(_cfg(tmp_path), FakeDevice({BF16_CL: 0.01, BF16_NCHW: 0.05, FP32_CL: 0.08, FP32_NCHW: 0.09}))
    cached = _decide(_cfg(tmp_path), FakeDevice({}))
    assert cached.source == "cache" and (cached.precision, cached.memory_format) == BF16_CL
    # the run's forward and backward took 0.04 s a step: 4x the promised whole step
    with caplog.at_level(logging.WARNING, logger="cifar_lab.autotune"):
        check = autotune.check_run(cached, _trainer(0.04, planted.batch_size))
    assert check["stale"] is True and check["ratio"] == pytest.approx(4.0)
    assert any("marked stale" in r.message for r in caplog.records)
    assert cached.record()["check"]["stale"] is True  # metrics.json holds it
    truth = FakeDevice({BF16_CL: 0.04, BF16_NCHW: 0.03, FP32_CL: 0.08, FP32_NCHW: 0.09})
    again = _decide(_cfg(tmp_path), truth)
    assert again.source == "measured" and truth.built and (again.precision, again.memory_format) == BF16_NCHW
    assert again.reason.startswith("stale: a run's forward and backward took 4.00x the whole step")
    assert again.label.startswith("re-measured (stale: ")
    assert _decide(_cfg(tmp_path), FakeDevice({})).source == "cache"  # the new measurement is trusted again


def test_a_run_that_keeps_the_promise_leaves_the_entry_alone(tmp_path: Path) -> None:
    _decide(_cfg(tmp_path), FakeDevice({BF16_CL: 0.04, BF16_NCHW: 0.05, FP32_CL: 0.08, FP32_NCHW: 0.09}))
    cached = _decide(_cfg(tmp_path), FakeDevice({}))
    # forward and backward at 1.2x the whole step: within stale_above (0.25)
    assert autotune.check_run(cached, _trainer(0.048, cached.batch_size))["stale"] is False
    assert _decide(_cfg(tmp_path), FakeDevice({})).source == "cache"


@pytest.mark.parametrize("trainer_change, reason", [
    ({"size": 24}, "steps at 24 px, measured at 32 px"),
    ({"teacher": torch.nn.Linear(1, 1)}, "distillation adds a teacher's forward pass"),
])
def test_steps_that_cannot_be_compared_like_with_like_are_not_held_against_the_promise(
        tmp_path: Path, trainer_change, reason) -> None:
    _decide(_cfg(tmp_path), FakeDevice({BF16_CL: 0.01, BF16_NCHW: 0.05, FP32_CL: 0.08, FP32_NCHW: 0.09}))
    cached = _decide(_cfg(tmp_path), FakeDevice({}))
    assert autotune.check_run(cached, _trainer(1.0, cached.batch_size, **trainer_change)) == {"skipped": reason}
    assert _decide(_cfg(tmp_path), FakeDevice({})).source == "cache"


def test_explicit_values_are_never_measured(tmp_path: Path) -> None:
    fake = FakeDevice({})
    decision = _decide(_cfg(tmp_path, "trainer.precision=32", "module.memory_format=contiguous"), fake)
    assert (decision.precision, decision.memory_format, decision.source) == ("32", "contiguous", "explicit")
    assert fake.built == [] and decision.label == "explicit"
    assert autotune.check_run(decision, _trainer(9.0, 128)) is None  # nothing promised, nothing checked
    # one explicit, one auto: only the auto one varies
    fake = FakeDevice({FP32_CL: 0.2, FP32_NCHW: 0.1})
    decision = _decide(_cfg(tmp_path, "trainer.precision=32"), fake)
    assert sorted(fake.built) == [FP32_CL, FP32_NCHW]
    assert (decision.precision, decision.memory_format) == FP32_NCHW


def test_a_candidate_with_a_non_finite_loss_is_dropped_and_an_unsupported_one_noted(tmp_path: Path) -> None:
    fake = FakeDevice({BF16_CL: 0.05, BF16_NCHW: 0.3, FP32_CL: 0.2, FP32_NCHW: 0.25}, losses={BF16_CL: float("nan")})
    build = fake.step_factory

    def factory(cfg, precision, memory_format, device, batch_size):
        if (precision, memory_format) == BF16_NCHW:
            raise RuntimeError("bf16 convolution is not implemented here")
        return build(cfg, precision, memory_format, device, batch_size)

    decision = autotune.decide(_cfg(tmp_path), timer=fake.timer, step_factory=factory,
                               probe_steps=fake.probe_steps)
    assert (decision.precision, decision.memory_format) == FP32_CL
    notes = {(c.precision, c.memory_format): (c.images_per_s, c.note) for c in decision.table}
    assert notes[BF16_CL][0] is None and "not finite" in notes[BF16_CL][1] and fake.steps[BF16_CL] == 1
    assert notes[BF16_NCHW][1].startswith("unsupported (RuntimeError: bf16 convolution")


def test_ddp_ranks_agree(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake = FakeDevice({BF16_CL: 0.4, BF16_NCHW: 0.3, FP32_CL: 0.1, FP32_NCHW: 0.2})
    zero = _decide(_cfg(tmp_path), fake, run_dir, rank=0)
    never = FakeDevice({})
    other_cfg = _cfg(tmp_path)
    one = _decide(other_cfg, never, run_dir, rank=1)
    assert never.built == []  # rank 1 measures nothing
    assert (one.precision, one.memory_format, one.source) == (zero.precision, zero.memory_format, "rank 0")
    assert other_cfg.trainer.precision == "32" and other_cfg.module.memory_format == "channels_last"


def test_measuring_leaves_the_runs_random_stream_alone(tmp_path: Path) -> None:
    fake = FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4})

    def drawing_factory(*args):  # building and stepping a network draws random numbers, as a real one does
        torch.rand(5)
        step = fake.step_factory(*args)
        return lambda: (torch.rand(5), step())[1]

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autotune.decide(_cfg(tmp_path), timer=fake.timer, step_factory=drawing_factory, probe_steps=fake.probe_steps)
    assert fake.built and torch.equal(torch.rand(3), expected)


def test_a_resume_keeps_the_checkpoints_choice(tmp_path: Path) -> None:
    saved = {"trainer": {"precision": "bf16-mixed"}, "module": {"memory_format": "contiguous"}}
    fake = FakeDevice({})
    decision = autotune.decide(_cfg(tmp_path), None, saved, timer=fake.timer, step_factory=fake.step_factory)
    assert (decision.precision, decision.memory_format, decision.source) == ("bf16-mixed", "contiguous", "checkpoint")
    assert fake.built == []


@pytest.mark.slow
def test_a_run_records_the_choice_in_metrics_and_tensorboard(tmp_path: Path) -> None:
    cfg = compose_cfg([*AUTO, "model.fc_units=32", "data.batch_size=32", "debug=fast_dev_run", "logger=tensorboard",
                       "autotune.budget_s=2"], tmp_path / "run")
    train(cfg)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    recorded = summary["autotune"]
    assert summary["precision"] in ("32", "bf16-mixed") and summary["memory_format"] in ("channels_last", "contiguous")
    assert recorded["source"] == "measured" and len(recorded["table"]) == 4 and recorded["rounds"] >= 1
    assert recorded["decided"] in (True, False) and recorded["measuring_s"] > 0 and recorded["batch_size"] == 32
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any("autotune" in tag for tag in events.Tags()["tensors"])


@pytest.mark.slow
def test_a_run_marks_a_promise_its_steps_do_not_keep_stale(tmp_path: Path, capsys) -> None:
    overrides = [*AUTO, "trainer.max_epochs=1", "data.batch_size=20", "logger=none", "test=false"]
    # the cache promises 10,000x the speed of any real step for every pair
    impossible = FakeDevice({BF16_CL: 1e-6, BF16_NCHW: 2e-6, FP32_CL: 3e-6, FP32_NCHW: 4e-6})
    _decide(compose_cfg(overrides, tmp_path / "first"), impossible)
    train(compose_cfg(overrides, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "memory format channels_last, compile false (cache: " in out  # the header: where it came from
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["autotune"]
    assert recorded["source"] == "cache" and recorded["check"]["stale"] is True and recorded["check"]["ratio"] > 100
    entries = [e for e in cache.read().values() if e["kind"] == "pair"]
    assert len(entries) == 1 and entries[0]["stale"].startswith("a run's forward and backward took")
    again = FakeDevice({BF16_CL: 0.2, BF16_NCHW: 0.1, FP32_CL: 0.3, FP32_NCHW: 0.4})
    assert _decide(compose_cfg(overrides, tmp_path / "next"), again).reason.startswith("stale: ")


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
def test_compile_is_chosen_only_when_the_run_pays_for_it(tmp_path: Path, epochs, train_images, compiled) -> None:
    cfg = _compile_cfg(tmp_path, epochs)
    fake = FakeCompiler(eager_s=0.10, compiled_s=0.05, compile_s=30.0)
    decision = autotune.decide(cfg, None, timer=fake.timer, step_factory=fake.step_factory,
                               train_images=train_images)
    assert decision.compile is compiled and cfg.module.compile is compiled
    assert decision.compile_timing["compile_s"] == pytest.approx(30.0)
    assert decision.record()["compile"] is compiled


def test_a_slower_compiled_step_is_never_chosen(tmp_path: Path) -> None:
    fake = FakeCompiler(eager_s=0.05, compiled_s=0.06, compile_s=1.0)
    decision = autotune.decide(_compile_cfg(tmp_path, 1000), None, timer=fake.timer,
                               step_factory=fake.step_factory, train_images=10_000)
    assert decision.compile is False and decision.compile_timing["saved_s"] < 0


def test_the_compile_timing_is_cached_and_reused_for_a_run_of_another_length(tmp_path: Path) -> None:
    first = FakeCompiler(eager_s=0.10, compiled_s=0.05, compile_s=30.0)
    short = autotune.decide(_compile_cfg(tmp_path, 1), None, timer=first.timer, step_factory=first.step_factory,
                            train_images=1000)
    assert short.compile is False and first.built == [False, True]
    never = FakeCompiler(eager_s=9.0, compiled_s=9.0, compile_s=9.0)  # would decide otherwise if it were asked
    long = autotune.decide(_compile_cfg(tmp_path, 100), None, timer=never.timer, step_factory=never.step_factory,
                           train_images=1000)
    assert long.compile is True and never.built == []  # the same timing, a longer run


@pytest.mark.slow
def test_a_run_records_the_compile_decision_in_metrics(tmp_path: Path) -> None:
    cfg = compose_cfg([*SYNTH, "module.compile=auto", "trainer.max_epochs=1", "logger=none",
                       "data.source.train_size=200", "data.source.test_size=50", "data.val_size=50"],
                      tmp_path / "run")
    # a cached timing where compiling never pays back in one short epoch: nothing is compiled here
    pair = autotune.Decision(str(cfg.trainer.precision), str(cfg.module.memory_format), "explicit")
    cache.store(autotune.compile_key(cfg, pair, int(cfg.data.batch_size)),
                {"kind": "compile", "model": "simple_cnn", "timing": {"eager_s": 0.02, "compiled_s": 0.01,
                                                                      "compile_s": 60.0}})
    train(cfg)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["autotune"]
    assert recorded["compile"] is False and recorded["compile_timing"]["compile_s"] == 60.0
    assert recorded["compile_timing"]["steps"] == -(-150 // int(cfg.data.batch_size))  # 1 epoch of 150 images


# ----------------------------------------------------------------------------- python -m cifar_lab.autotune
def _two_models(tmp_path: Path) -> None:
    _decide(_cfg(tmp_path), FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4}))
    _decide(_cfg(tmp_path, "model=attention_net"), FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.1, FP32_CL: 0.1,
                                                               FP32_NCHW: 0.1}))


def _command(capsys, *argv: str) -> tuple[int, str, str]:
    from cifar_lab.autotune.command import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_lists_the_cached_decisions_with_figures_and_margins(tmp_path: Path, capsys) -> None:
    _two_models(tmp_path)
    code, out, _ = _command(capsys, "show")
    rows = [line for line in out.splitlines() if line.startswith("| simple_cnn") or line.startswith("| attention")]
    assert code == 0 and len(rows) == 2
    simple = next(r for r in rows if r.startswith("| simple_cnn")).split(" | ")
    assert "bf16-mixed channels_last" in simple and "100%" in simple and "decided" in simple[-1]
    assert f"{torch.get_num_threads()}" in simple and torch.__version__ in simple
    assert "undecided: the usual pair" in next(r for r in rows if r.startswith("| attention_net"))
    code, out, _ = _command(capsys, "show", "attention_net")
    assert code == 0 and "attention_net" in out and "| simple_cnn" not in out


def test_clear_forgets_one_model_or_all(tmp_path: Path, capsys) -> None:
    _two_models(tmp_path)
    code, out, _ = _command(capsys, "clear", "simple_cnn")
    assert code == 0 and out.startswith("cleared 1 cached decision of simple_cnn")
    kinds = [(e["kind"], e.get("model")) for e in cache.read().values()]
    assert sorted(kinds) == [("pair", "attention_net"), ("probe", None)]  # the machine's probe outlives a model
    fake = FakeDevice({BF16_CL: 0.1, BF16_NCHW: 0.2, FP32_CL: 0.3, FP32_NCHW: 0.4})
    assert _decide(_cfg(tmp_path), fake).source == "measured" and fake.built  # cleared: measured again
    code, out, _ = _command(capsys, "clear")
    assert code == 0 and out.startswith("cleared 2 cached decisions from") and cache.read() == {}
    assert out.rstrip().endswith(", and 1 precision probe")
    code, out, _ = _command(capsys, "show")
    assert code == 0 and out.startswith("no cached decisions in")


def test_the_command_refuses_bad_arguments_with_one_clear_message(tmp_path: Path, capsys) -> None:
    _two_models(tmp_path)
    before = cache.read()
    code, _, err = _command(capsys, "clear", "resnet_se")
    assert code == 2 and err.startswith("Error: no cached decision for model 'resnet_se'")
    assert "(cached: attention_net, simple_cnn)" in err and cache.read() == before  # nothing cleared
    with pytest.raises(SystemExit) as exit_:
        _command(capsys, "forget")
    assert exit_.value.code == 2 and "invalid choice: 'forget'" in capsys.readouterr().err
    cache.cache_path().write_text("{not json")
    code, _, err = _command(capsys, "show")
    assert code == 2 and "is not a readable autotune cache" in err and "clear" in err
    code, out, _ = _command(capsys, "clear")  # clearing all replaces an unreadable file
    assert code == 0 and cache.read_file(cache.cache_path()) == {"version": cache.VERSION, "entries": {}}


@pytest.mark.slow
def test_the_command_runs_as_python_dash_m(tmp_path: Path) -> None:
    """The entry point itself, in a fresh interpreter: it loads no torch and reports the cache it reads."""
    from conftest import run_command
    import os
    import sys

    _two_models(tmp_path)
    env = {**os.environ, "CIFAR_LAB_CACHE_DIR": str(cache.cache_path().parent)}
    shown = run_command([sys.executable, "-m", "cifar_lab.autotune", "show", "simple_cnn"], tmp_path, env,
                        timeout=120, fresh=True)
    assert shown.returncode == 0 and "| simple_cnn" in shown.stdout and "Traceback" not in shown.stderr, shown.stderr
    refused = run_command([sys.executable, "-m", "cifar_lab.autotune", "clear", "resnet_se"], tmp_path, env,
                          timeout=120, fresh=True)
    assert refused.returncode == 2 and refused.stderr.startswith("Error: no cached decision for model 'resnet_se'")
