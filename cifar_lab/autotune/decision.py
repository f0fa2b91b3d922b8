"""What autotune decided, from where, and on what figures (no torch: read by the cache command too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

AUTO = "auto"


@dataclass
class Candidate:
    """One precision x memory format pair and what its steps gave."""

    precision: str
    memory_format: str
    images_per_s: float | None = None  # the batch over the median of its settled steps
    note: str = ""  # unsupported, dropped, stopped early, behind by how much
    steps: int = 0  # steps it ran
    counted: int = 0  # of those, settled steps (the ones that count)
    behind: float | None = None  # slower than the chosen pair by this fraction (paired rounds' median)


@dataclass
class Decision:
    """The chosen precision and memory format, where they came from, and the figures behind them."""

    precision: str
    memory_format: str
    source: str  # measured | cache | explicit | checkpoint | rank 0
    table: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0  # deciding took this long (wall time)
    compile: bool | None = None  # None: module.compile was not auto
    compile_timing: dict[str, Any] = field(default_factory=dict)  # eager_s, compiled_s, compile_s, steps, saved_s
    decided: bool | None = None  # False: undecided at the budget, the usual pair; None: nothing was measured
    margin: float | None = None  # the chosen pair ahead of the nearest other by this fraction
    spread: float | None = None  # that comparison's spread between rounds (same unit)
    rounds: int = 0
    measuring_s: float = 0.0  # the measured steps' own time
    budget_s: float | None = None  # the measuring budget it had
    batch_size: int | None = None  # the promise's batch and image size (the run's check compares like with like)
    image_size: int | None = None
    reason: str = ""  # why it was measured again ("threads 2 -> 1", "stale: ...")
    measured_at: str = ""
    cache_key: str | None = None
    check: dict[str, Any] | None = None  # the run's own check of this promise (cifar_lab.autotune.check)
    probe: dict[str, Any] = field(default_factory=dict)  # reduced precision -> its probe (cifar_lab.autotune.probe)
    stale_above: float = field(default=0.25, repr=False)  # the check's tolerance (autotune.stale_above)

    def record(self) -> dict[str, Any]:
        """Everything but the check's tolerance, rounded (metrics.json, the cache, the other DDP ranks)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("table", "stale_above")}
        out["table"] = [asdict(c) for c in self.table]
        for key in ("seconds", "measuring_s", "budget_s"):
            out[key] = None if out[key] is None else round(out[key], 3)
        for key in ("margin", "spread"):
            out[key] = None if out[key] is None else round(out[key], 4)
        return out

    @staticmethod
    def from_record(record: dict[str, Any], source: str) -> "Decision":
        known = {f.name for f in fields(Decision)} - {"table", "source", "check", "seconds"}
        kept = {k: v for k, v in record.items() if k in known}
        table = [Candidate(**{k: v for k, v in c.items() if k in Candidate.__dataclass_fields__})
                 for c in record.get("table", [])]
        kept["compile_timing"] = dict(kept.get("compile_timing") or {})
        return Decision(source=source, table=table, **kept)

    def chosen(self) -> Candidate | None:
        return next((c for c in self.table if (c.precision, c.memory_format) == (self.precision, self.memory_format)),
                    None)

    @property
    def label(self) -> str:
        """Where the decision came from, for the run's header: measured / cache / re-measured (why)."""
        if self.source not in ("measured", "cache"):
            return self.source
        head = f"re-measured ({self.reason})" if self.source == "measured" and self.reason else self.source
        if self.decided is False:
            return f"{head}, undecided: the usual pair"
        if self.margin is None:
            return head
        where = f"{self.rounds} rounds, {self.measuring_s:.1f} s" if self.source == "measured" \
            else f"measured {self.measured_at[:10]}" if self.measured_at else ""
        return f"{head}: {percent(self.margin)} ahead of the next pair, {where}".rstrip(", ")


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def pair_name(precision: str, memory_format: str) -> str:
    return f"{precision} {memory_format}"


def format_table(decision: Decision) -> str:
    """The decision and its measured table as Markdown (for the log and TensorBoard)."""
    lines = [f"autotune: precision={decision.precision}, memory_format={decision.memory_format} ({decision.label}; "
             f"deciding took {decision.seconds:.1f} s)"]
    if decision.compile is not None:
        t = decision.compile_timing
        detail = (f" (step {1000 * t['eager_s']:.0f} ms eager, {1000 * t['compiled_s']:.0f} ms compiled, compiling "
                  f"{t['compile_s']:.0f} s, {t.get('steps')} steps)") if "eager_s" in t else ""
        lines[0] += f", compile={str(decision.compile).lower()}{detail}"
    for precision, found in decision.probe.items():
        ratio = found.get("ratio")
        figure = f"{ratio:.1f}x fp32's time" if ratio is not None else "did not run"
        lines.append(f"precision probe ({found.get('source')}): a {precision} convolution took {figure}"
                     + ("; its candidates not timed" if found.get("note") else ""))
    if decision.table:
        lines.append(f"{decision.rounds} interleaved rounds, {decision.measuring_s:.1f} s of steps; margin "
                     f"{percent(decision.margin)}, spread between rounds {percent(decision.spread)}"
                     + ("" if decision.decided is not False else "; undecided: the usual pair"))
        lines += ["", "| precision | memory format | images/s | settled steps | behind | note |",
                  "|---|---|---:|---:|---:|---|"]
        for c in decision.table:
            speed = f"{c.images_per_s:,.0f}" if c.images_per_s is not None else "-"
            chosen = " (chosen)" if c is decision.chosen() else ""
            lines.append(f"| {c.precision} | {c.memory_format} | {speed} | {c.counted}/{c.steps} | "
                         f"{percent(c.behind)} | {c.note}{chosen} |")
    return "\n".join(lines)
