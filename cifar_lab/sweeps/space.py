"""The search space: ``hydra.sweeper.params`` in Hydra's override grammar -> Optuna distributions.

``choice(a, b, ...)`` -> categorical (lists and dicts as their override text), ``range(start, stop[, step])``
-> integers (``stop`` excluded, as in Hydra), ``interval(low, high)`` -> uniform float
(``int(interval(low, high))``: integers), ``tag(log, interval(...))`` -> log-uniform. A plain value is
fixed for every trial.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from cifar_lab.errors import ConfigError

__all__ = ["SearchSpace", "parse_space"]


class SearchSpace:
    """Distributions to sample (by key) and overrides every trial gets as they are."""

    def __init__(self, distributions: dict[str, BaseDistribution], fixed: list[str]) -> None:
        self.distributions = distributions
        self.fixed = fixed

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's parameters, sampled by the study's sampler."""
        params: dict[str, Any] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                params[key] = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, IntDistribution):
                params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        return params

    def check_study(self, study: optuna.Study, study_name: str) -> None:
        """Refuse a space whose parameter conflicts with what the study's trials recorded (before any
        trial is asked, so none is left RUNNING)."""
        from optuna.distributions import check_distribution_compatibility

        recorded: dict[str, BaseDistribution] = {}
        for trial in study.get_trials(deepcopy=False):
            recorded.update(trial.distributions)
        for key, dist in self.distributions.items():
            if key not in recorded:
                continue
            try:
                check_distribution_compatibility(recorded[key], dist)
            except ValueError as err:
                raise ConfigError(
                    f"hydra.sweeper.params.{key}: the study {study_name!r} already searched it as {recorded[key]!r}, "
                    f"which {dist!r} cannot continue ({err}); start a new study with hydra.sweeper.study_name=<new "
                    "name> (or a new storage), or keep the recorded search space") from None

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The job's overrides for a trial's ``params``."""
        return [*self.fixed, *(f"{key}={value}" for key, value in params.items())]


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)) and values:
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"hydra.sweeper.params: {override.input_line!r} is not a search space Optuna can sample; "
                      "use choice(...), range(...), interval(...) or tag(log, interval(...))")


def parse_space(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> SearchSpace:
    """``hydra.sweeper.params`` plus the command line's overrides (which win, key by key)."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(lines) + parser.parse_overrides(list(arguments))
    except Exception as err:  # noqa: BLE001 - Hydra's parse errors, one line
        raise ConfigError(f"hydra.sweeper.params: cannot parse: {str(err).splitlines()[0]}") from None
    by_key: dict[str, Override] = {}
    for override in parsed:
        by_key[override.get_key_element()] = override
    distributions, fixed = {}, []
    for key, override in by_key.items():
        if override.is_sweep_override():
            try:
                distributions[key] = _distribution(override)
            except ValueError as err:  # Optuna's own check of the bounds
                raise ConfigError(f"hydra.sweeper.params.{key}: {err}") from None
        else:
            fixed.append(override.input_line)
    return SearchSpace(distributions, fixed)
