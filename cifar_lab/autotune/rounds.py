"""Timing candidates in interleaved rounds until the fastest is ahead by more than the noise.

Each round runs one step of every candidate still in the race (A B C A B C ...), so a slow
second or a burst of load on the machine hits all of them alike, and compares candidates round
by round (paired). Definitions:

* **settled**: a candidate's steps count from its last step that was more than ``settle``
  (10%) faster than every step before it; until then its time was still falling (warm-up).
  The warm-up is measured, not assumed, and a slow start of any length is left out afterwards.
* **margin** of candidate X behind the leader L (the settled candidate with the fastest median
  step): the median over rounds where both are settled of ln(X's step / L's step).
* **spread**: twice the median distance of those per-round log ratios from their median (about
  the width of the middle half of the rounds; one disturbed round barely moves it).
* X **stops** once, after ``min_rounds`` paired rounds, its margin exceeds the spread; or early,
  when even the fastest of its first 2 or more steps (warm-up included) took over ``give_up``
  times the leader's median step (one slow round alone never stops a candidate); or right after
  its first step, when that took over ``give_up_first`` times the leader's first step in the same
  round, warm-up against warm-up, the leader having run before it in that round (so any one-time
  start-up cost fell on the leader): a pathological candidate costs one step. A non-finite
  loss drops a candidate; one whose step raises (a precision this device lacks) is unsupported.
* **decided**: the leader has ``min_rounds`` settled rounds and every other candidate stopped.
  Otherwise rounds go on until their time reaches the budget (or ``max_rounds``): undecided.

Pure Python (no torch): the steps and the clock are given, so tests run it on a fake clock.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

StepTimer = Callable[[Callable[[], Any]], float]  # runs a step, returns its seconds
UNSUPPORTED = (RuntimeError, ValueError, TypeError, NotImplementedError)


@dataclass(frozen=True)
class Rules:
    """How long and how carefully to measure (the config's ``autotune`` node)."""

    budget_s: float = 5.0
    budget_fraction: float = 0.02
    budget_max_s: float = 120.0
    min_rounds: int = 4
    max_rounds: int = 100
    settle: float = 0.1
    give_up: float = 2.5
    give_up_first: float = 4.0

    def budget(self, run_s: float | None) -> float:
        """budget_s, or budget_fraction of the run's expected time when larger, up to budget_max_s."""
        if run_s is None:
            return self.budget_s
        return max(self.budget_s, min(self.budget_max_s, self.budget_fraction * run_s))


@dataclass
class Trial:
    """One candidate in the race: its step and the time of each of its rounds."""

    name: Hashable
    step: Callable[[], float] | None  # returns the loss; None: could not be built (``note`` says why)
    note: str = ""
    times: dict[int, float] = field(default_factory=dict)  # round -> seconds
    start: int | None = None  # the first settled round
    running: bool = True

    def __post_init__(self) -> None:
        self.running = self.step is not None

    def record(self, round_: int, seconds: float, settle: float) -> None:
        fastest_before = min(self.times.values(), default=math.inf)
        self.times[round_] = seconds
        if self.start is None or seconds < (1 - settle) * fastest_before:
            self.start = round_  # still falling: the earlier steps were warm-up

    def counted(self) -> dict[int, float]:
        return {r: t for r, t in self.times.items() if self.start is not None and r >= self.start}

    def median(self) -> float | None:
        counted = self.counted()
        return statistics.median(counted.values()) if counted else None

    @property
    def valid(self) -> bool:
        """Timed and not dropped (a non-finite loss or a failed step)."""
        return self.step is not None and bool(self.times) and not self.note.startswith(("loss", "unsupported"))


@dataclass
class Comparison:
    """X against the leader over their paired settled rounds (log ratios)."""

    rounds: int
    margin: float  # median log ratio, > 0: X is slower
    spread: float

    @staticmethod
    def of(trial: Trial, leader: Trial) -> "Comparison | None":
        mine, theirs = trial.counted(), leader.counted()
        ratios = [math.log(mine[r] / theirs[r]) for r in sorted(mine) if r in theirs and theirs[r] > 0 and mine[r] > 0]
        if not ratios:
            return None
        middle = statistics.median(ratios)
        return Comparison(len(ratios), middle, 2 * statistics.median(abs(x - middle) for x in ratios))


@dataclass
class Race:
    """The outcome: the leader, whether it is decided, and how long it took."""

    trials: list[Trial]
    leader: Trial | None
    decided: bool
    rounds: int
    spent_s: float
    budget_s: float

    def comparisons(self, against: Trial | None = None) -> dict[Hashable, Comparison]:
        """Every other timed candidate against ``against`` (default: the leader)."""
        against = against or self.leader
        if against is None:
            return {}
        found = {t.name: Comparison.of(t, against) for t in self.trials if t is not against and t.valid}
        return {name: c for name, c in found.items() if c is not None}


def run_race(trials: list[Trial], timer: StepTimer, rules: Rules,
             run_steps: int | None = None) -> Race:
    """Interleaved rounds until decided or the budget is spent. ``run_steps``: the run's training steps
    (the budget's share of it), None when unknown."""
    spent, rounds, budget = 0.0, 0, rules.budget(None)
    leader: Trial | None = None
    for round_ in range(rules.max_rounds):
        rounds = round_ + 1
        for trial in [t for t in trials if t.running]:
            spent += _timed_step(trial, round_, timer, rules)
        leader = _leader(trials)
        if leader is not None:
            _stop_the_slower(trials, leader, rules)
            if len(leader.counted()) >= rules.min_rounds and not any(t.running for t in trials if t is not leader):
                return Race(trials, leader, True, rounds, spent, budget)
        fastest = leader.median() if leader else min((min(t.times.values()) for t in trials if t.times), default=None)
        budget = rules.budget(run_steps * fastest if run_steps and fastest else None)
        if spent >= budget or not any(t.running for t in trials):
            break
    return Race(trials, leader, False, rounds, spent, budget)


def _timed_step(trial: Trial, round_: int, timer: StepTimer, rules: Rules) -> float:
    losses: list[float] = []
    assert trial.step is not None
    step = trial.step
    try:
        seconds = timer(lambda: losses.append(step()))
    except UNSUPPORTED as err:  # e.g. a kernel this device lacks for the precision
        trial.note, trial.running = f"unsupported ({type(err).__name__}: {str(err).splitlines()[0][:80]})", False
        return 0.0
    if not all(math.isfinite(x) for x in losses):
        trial.note, trial.running = "loss not finite: dropped", False
    else:
        trial.record(round_, seconds, rules.settle)
    return seconds


def _leader(trials: list[Trial]) -> Trial | None:
    settled = [t for t in trials if t.valid and t.counted() and (t.running or not t.note)]
    return min(settled, key=lambda t: t.median() or math.inf) if settled else None


def _stop_the_slower(trials: list[Trial], leader: Trial, rules: Rules) -> None:
    for trial in trials:
        if trial is leader or not trial.running:
            continue
        first = _first_step_behind(trials, trial, leader)
        if first is not None and first > rules.give_up_first:
            trial.running, trial.note = False, f"stopped after its first step: {first:.1f}x the leader's first step"
            continue
        leading = leader.median()
        fastest = min(trial.times.values(), default=math.inf)
        if len(trial.times) >= 2 and leading and fastest > rules.give_up * leading:
            trial.running, trial.note = False, f"stopped early: its fastest step {fastest / leading:.1f}x the leader's"
            continue
        found = Comparison.of(trial, leader)
        if found is not None and found.rounds >= rules.min_rounds and found.margin > found.spread:
            trial.running = False
            trial.note = (f"stopped: {100 * math.expm1(found.margin):.0f}% slower (spread "
                          f"{100 * math.expm1(found.spread):.0f}%)")


def _first_step_behind(trials: list[Trial], trial: Trial, leader: Trial) -> float | None:
    """``trial``'s lone first step over the leader's first step in the same round, where the leader ran
    before it in that round; None otherwise."""
    if len(trial.times) != 1 or trials.index(leader) > trials.index(trial):
        return None
    (round_, seconds), = trial.times.items()
    theirs = leader.times.get(round_)
    if theirs is None or theirs <= 0 or min(leader.times) != round_:
        return None
    return seconds / theirs
