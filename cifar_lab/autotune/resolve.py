"""``decide``: resolve ``auto`` precision, memory format and compilation for one run, from the cache or
measured (interleaved rounds, :mod:`cifar_lab.autotune.rounds`), and write the choice into the config."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab.autotune import cache
from cifar_lab.autotune.decision import AUTO, Candidate, Decision, format_table, pair_name, percent
from cifar_lab.autotune.device import (StepFactory, candidate_pairs, conditions, device_of, image_size,
                                       isolated_rng, step_fn)
from cifar_lab.autotune.probe import ProbeSteps, conv_step, probed
from cifar_lab.autotune.rounds import Race, Rules, StepTimer, Trial, UNSUPPORTED, run_race

log = logging.getLogger("cifar_lab.autotune")

RANK_FILE = ".autotune.json"  # rank 0's decision, for the other DDP ranks


def wall_timer(step: Any) -> float:
    """Run one step; its duration in seconds. (Tests substitute a fake clock.)"""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def decide(cfg: DictConfig, run_dir: Path | None = None, resume_config: dict[str, Any] | None = None,
           rank: int = 0, timer: StepTimer = wall_timer, step_factory: StepFactory = step_fn,
           train_images: int | None = None, probe_steps: ProbeSteps = conv_step) -> Decision:
    """Resolve ``auto`` in ``trainer.precision``, ``module.memory_format`` and ``module.compile``, writing the
    choice into ``cfg``. ``train_images`` (the training set's size) gives the run's length: the measuring
    budget's share of it, and whether compiling pays. ``timer`` times every step, the precision probe's
    (``probe_steps``, :mod:`cifar_lab.autotune.probe`) included."""
    start = time.perf_counter()
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=AUTO))
    memory_format = str(OmegaConf.select(cfg, "module.memory_format", default=AUTO))
    batch_size = int(cfg.data.batch_size)
    steps = expected_steps(cfg, batch_size, train_images)
    saved_precision, saved_format = _saved_choice(resume_config)
    if precision == AUTO and saved_precision:
        precision = saved_precision
    if memory_format == AUTO and saved_format:
        memory_format = saved_format
    if AUTO not in (precision, memory_format):
        source = "checkpoint" if resume_config and (saved_precision or saved_format) else "explicit"
        decision = Decision(precision, memory_format, source)
    elif rank != 0:
        decision = _from_rank_zero(run_dir)
    else:
        decision = _measured_or_cached(cfg, precision, memory_format, batch_size, steps, timer, step_factory,
                                       probe_steps)
    decision.stale_above = float(OmegaConf.select(cfg, "autotune.stale_above", default=0.25))
    if str(OmegaConf.select(cfg, "module.compile", default=False)) == AUTO and decision.compile is None:
        if rank != 0 and decision.source == "rank 0":
            decision.compile = False
        else:
            _decide_compile(cfg, decision, batch_size, steps, timer, step_factory)
    decision.seconds = time.perf_counter() - start
    with open_dict(cfg):
        cfg.trainer.precision = decision.precision
        cfg.module.memory_format = decision.memory_format
        if decision.compile is not None:
            cfg.module.compile = decision.compile
    if rank == 0 and run_dir is not None and decision.source in ("measured", "cache"):
        cache.write_json(Path(run_dir) / RANK_FILE, decision.record())
    return decision


def expected_steps(cfg: DictConfig, batch_size: int, train_images: int | None) -> int | None:
    """Training steps the run will take (epochs x batches, or max_steps); None when unknown."""
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if not isinstance(epochs, int) or epochs < 0 or not train_images:
        return None
    return epochs * -(-int(train_images) // batch_size)


def _saved_choice(resume_config: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if not resume_config:
        return None, None
    precision = (resume_config.get("trainer") or {}).get("precision")
    memory_format = (resume_config.get("module") or {}).get("memory_format")
    return (str(precision) if precision not in (None, AUTO) else None,
            str(memory_format) if memory_format not in (None, AUTO) else None)


def _from_rank_zero(run_dir: Path | None, wait_s: float = 120.0) -> Decision:
    path = Path(run_dir or ".") / RANK_FILE
    deadline = time.monotonic() + wait_s
    while True:
        record = cache.read_file(path)
        if record:
            return Decision.from_record(record, "rank 0")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 left no autotune decision in {path} within {wait_s:.0f} s")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- precision and memory format
def model_name(cfg: DictConfig) -> str:
    """The model's config name (``model=<name>``) where Hydra knows it, else its network's module."""
    target = str(cfg.model.get("_target_", "model"))
    with contextlib.suppress(ValueError, ImportError):
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().runtime.choices.get("model")
        if name:
            return str(name)
    parts = target.split(".")
    return parts[-2] if len(parts) > 1 else target


def setup_of(cfg: DictConfig, device: torch.device, pairs: list) -> str:
    """What is measured, apart from what it is measured under: the network, optimizer and candidates."""
    return cache.digest({"device_type": device.type, "model": OmegaConf.to_container(cfg.model, resolve=True),
                         "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True), "candidates": pairs})


def rules_of(cfg: DictConfig) -> Rules:
    settings = OmegaConf.to_container(OmegaConf.select(cfg, "autotune", default=None) or DictConfig({}))
    known = set(Rules.__dataclass_fields__)
    return Rules(**{k: v for k, v in settings.items() if k in known})  # type: ignore[union-attr]


def _measured_or_cached(cfg: DictConfig, precision: str, memory_format: str, batch_size: int, steps: int | None,
                        timer: StepTimer, step_factory: StepFactory, probe_steps: ProbeSteps) -> Decision:
    device = device_of(cfg)
    pairs = candidate_pairs(device, precision, memory_format)
    under = conditions(device, batch_size, image_size(cfg))
    setup = setup_of(cfg, device, pairs)
    key = cache.entry_key(setup, under)
    entries = cache.read()
    rules = rules_of(cfg)
    entry = entries.get(key)
    if entry and not entry.get("stale"):
        cached = Decision.from_record(entry["decision"], "cache")
        cached.reason, cached.cache_key = "", key
        reason = _more_time(cached, rules, steps)
        if not reason:
            return cached
    else:
        reason = cache.why_again(entries, key, setup, under)
    probes = _probes(cfg, precision, pairs, device, timer, probe_steps)
    with isolated_rng(device):
        trials = [_trial(pair, cfg, device, batch_size, step_factory, probes.get(pair[0], {}).get("note", ""))
                  for pair in pairs]
        race = run_race(trials, timer, rules, run_steps=steps)
    decision = _decision(race, pairs, batch_size, under["image_size"], reason)
    decision.probe = probes
    decision.measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    decision.cache_key = key
    _say(decision, race)
    if decision.decided is not None:
        cache.store(key, {"kind": "pair", "model": model_name(cfg), "setup": setup, "under": under,
                          "measured_at": decision.measured_at, "stale": None, "decision": decision.record()})
    return decision


def _more_time(cached: Decision, rules: Rules, steps: int | None) -> str:
    """Why an undecided entry is measured again: this run allows much more measuring time (a short run
    left it undecided, a long one may decide); "" to use it."""
    speeds = [c.images_per_s for c in cached.table if c.images_per_s]
    if cached.decided is not False or not cached.budget_s or not speeds or not cached.batch_size:
        return ""
    budget = rules.budget(steps * cached.batch_size / max(speeds) if steps else None)
    if budget <= 2 * cached.budget_s:
        return ""
    return f"undecided within {cached.budget_s:.0f} s; this run allows {budget:.0f} s"


def _probes(cfg: DictConfig, precision: str, pairs: list[tuple[str, str]], device: torch.device,
            timer: StepTimer, probe_steps: ProbeSteps) -> dict[str, dict[str, Any]]:
    """The precision probe of each reduced precision among automatic candidates (an explicit precision is
    never probed)."""
    if precision != AUTO:
        return {}
    return precision_probes(cfg, [p for p, _ in pairs], device, timer, probe_steps)


def precision_probes(cfg: DictConfig, precisions: Iterable[str], device: torch.device, timer: StepTimer = wall_timer,
                     probe_steps: ProbeSteps = conv_step) -> dict[str, dict[str, Any]]:
    """The precision probe (cached) of each reduced precision among ``precisions``: its figures, and the note
    of one not worth timing here (over ``autotune.probe_slower`` x fp32's time). The bench's ablation asks too."""
    slower = float(OmegaConf.select(cfg, "autotune.probe_slower", default=3.0))
    reduced = dict.fromkeys(p for p in precisions if p != "32")
    return {p: probed(p, device, timer, probe_steps, slower) for p in reduced}


def _trial(pair: tuple[str, str], cfg: DictConfig, device: torch.device, batch_size: int,
           step_factory: StepFactory, not_timed: str = "") -> Trial:
    if not_timed:  # the probe found this precision far slower than fp32 here
        return Trial(pair, None, note=not_timed)
    try:
        return Trial(pair, step_factory(cfg, pair[0], pair[1], device, batch_size))
    except UNSUPPORTED as err:  # e.g. a precision this device lacks
        return Trial(pair, None, note=f"unsupported ({type(err).__name__}: {str(err).splitlines()[0][:80]})")


def _decision(race: Race, pairs: list[tuple[str, str]], batch_size: int, size: int, reason: str) -> Decision:
    """The leader when decided; else the usual pair among those still level with it."""
    leader = race.leader
    if race.decided and leader is not None:
        chosen = leader
    else:
        level = [t for t in race.trials if t.valid and (t.running or t is leader)]
        chosen = level[0] if level else None  # trials are in the usual order
    table = []
    against = race.comparisons(chosen) if chosen is not None else {}
    for trial in race.trials:
        median = trial.median()
        behind = against.get(trial.name)
        table.append(Candidate(trial.name[0], trial.name[1], batch_size / median if median else None, trial.note,
                               steps=len(trial.times), counted=len(trial.counted()),
                               behind=math.expm1(behind.margin) if behind else None))
    nearest = min(against.values(), key=lambda c: c.margin, default=None)
    if chosen is None:
        # the last candidate the probe did not rule out
        fallback = next((t.name for t in reversed(race.trials) if not t.note.startswith("not timed")), pairs[-1])
        log.warning("autotune: no candidate finished a step (%s); using %s", "; ".join(
            f"{pair_name(*t.name)}: {t.note}" for t in race.trials), pair_name(*fallback))
        return Decision(fallback[0], fallback[1], "measured", table, decided=None, rounds=race.rounds,
                        measuring_s=race.spent_s, batch_size=batch_size, image_size=size, reason=reason)
    return Decision(chosen.name[0], chosen.name[1], "measured", table, decided=race.decided,
                    margin=math.expm1(nearest.margin) if nearest else None,
                    spread=math.expm1(nearest.spread) if nearest else None, rounds=race.rounds,
                    measuring_s=race.spent_s, budget_s=race.budget_s, batch_size=batch_size, image_size=size,
                    reason=reason)


def _say(decision: Decision, race: Race) -> None:
    """One line where a measurement was undecided."""
    if decision.decided is not False:
        return
    level = [t for t in race.trials if t.valid and (t.running or t is race.leader)]
    leader = race.leader
    close = ", ".join(pair_name(*t.name) for t in level) or "no candidate settled"
    figures = f"; the nearest {percent(decision.margin)} apart, spread {percent(decision.spread)}" \
        if decision.margin is not None and leader is not None else ""
    log.info("autotune undecided: %s level after %d rounds (%.1f s, budget %.0f s)%s; using the usual %s", close,
             race.rounds, race.spent_s, race.budget_s, figures, pair_name(decision.precision, decision.memory_format))


# ----------------------------------------------------------------------------- compile
def compile_timing(cfg: DictConfig, decision: Decision, batch_size: int, timer: StepTimer,
                   step_factory: StepFactory, steps: int = 3) -> dict[str, float]:
    """The chosen pair's step, eager and compiled, and the compile cost (the compiled first step's extra time)."""
    device = device_of(cfg)
    timing: dict[str, float] = {}
    for name, compiled in (("eager_s", False), ("compiled_s", True)):
        step = step_factory(cfg, decision.precision, decision.memory_format, device, batch_size, compile=compiled)
        first = timer(step)
        times = [timer(step) for _ in range(steps)]
        timing[name] = statistics.median(times)
        if compiled:
            timing["compile_s"] = max(0.0, first - timing[name])
    return timing


def compile_key(cfg: DictConfig, decision: Decision, batch_size: int) -> str:
    device = device_of(cfg)
    setup = setup_of(cfg, device, [(decision.precision, decision.memory_format, "compile")])
    return cache.entry_key(setup, conditions(device, batch_size, image_size(cfg)))


def _decide_compile(cfg: DictConfig, decision: Decision, batch_size: int, steps: int | None, timer: StepTimer,
                    step_factory: StepFactory) -> None:
    """Compile when the run's steps save more than compiling costs (timing measured once, cached)."""
    device = device_of(cfg)
    key = compile_key(cfg, decision, batch_size)
    timing = (cache.read().get(key) or {}).get("timing")
    if not timing:
        try:
            with isolated_rng(device):
                timing = compile_timing(cfg, decision, batch_size, timer, step_factory)
        except Exception as err:  # noqa: BLE001 - a network or platform the compiler cannot handle
            log.warning("autotune: compiling failed (%s: %s); training without compilation", type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
            decision.compile, decision.compile_timing = False, {"error": type(err).__name__}
            return
        cache.store(key, {"kind": "compile", "model": model_name(cfg), "under": conditions(
            device, batch_size, image_size(cfg)), "pair": [decision.precision, decision.memory_format],
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timing": timing})
    saved_per_step = timing["eager_s"] - timing["compiled_s"]
    # an unknown length counts as long: compile whenever a step is faster
    saved = saved_per_step * steps - timing["compile_s"] if steps is not None else saved_per_step
    decision.compile = saved > 0
    decision.compile_timing = {**timing, "steps": steps, "saved_s": round(saved, 2) if steps is not None else None}


def log_to_tensorboard(loggers: list, decision: Decision) -> None:
    """The table as a text entry in each TensorBoard logger of the run."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("autotune", format_table(decision), 0)
