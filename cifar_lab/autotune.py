"""Measured device defaults: the fastest precision and memory format for this network here.

``trainer.precision=auto`` and ``module.memory_format=auto`` (the defaults) are decided by
:func:`decide` before the Trainer is built: it times a few real training steps (forward,
backward, optimizer step, warm-up excluded) of the run's own network, optimizer and batch
size on the run's device for each candidate and keeps the fastest:

* precision: ``32`` and ``bf16-mixed`` on a CPU; ``bf16-mixed`` (``16-mixed`` where the GPU has
  no bf16) and ``32`` on a GPU;
* memory format: ``channels_last`` and ``contiguous`` (NCHW).

Why measure: the best pair depends on the network and the processor. On a 2-core AMD EPYC
(Zen 4, AVX512-BF16, no AMX), torch 2.14.1, training images/s for fp32 NCHW / fp32
channels_last / bf16 NCHW / bf16 channels_last were 166 / 234 / 296 / 434 for speedrun_net
(batch 1024) but 25 / 28 / 59 / 53 for attention_net (batch 128); a rule read from CPU
flags picked 0.42-0.54x of the best there.

The cost is bounded: candidates run in order of their usual speed, and one whose warm-up
step takes over ``give_up`` times the best step so far, or whose first timed step does, is
stopped there. A candidate whose loss is not finite is dropped (a fast but unstable
precision is never chosen silently). The decision is cached per (device, torch version,
network config, optimizer, batch size, image size, threads) in
``$CIFAR_LAB_CACHE_DIR`` (default ``~/.cache/cifar_lab``)/``autotune.json``, so the next run
with the same setup decides at once; an explicit value always wins and is never measured.
A resumed run keeps the values its checkpoint was trained with.

``module.compile=auto`` adds compilation (``torch.compile``, inductor) to the decision: the
chosen pair is timed compiled too, its first step's extra time taken as the compile cost, and
the network is compiled only when the steps the run will take (epochs x batches of its
training set) save more than that cost, so one cached measurement decides a 4-minute run and a
10-hour run differently. Under DDP, rank 0 decides
and leaves the decision in the run directory (``.autotune.json``), where the other ranks
(started by rank 0's Trainer, so after it decided) read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_lab.module import MEMORY_FORMATS

log = logging.getLogger(__name__)

__all__ = ["AUTO", "Candidate", "Decision", "decide", "measure", "cache_path", "format_table"]

AUTO = "auto"
CACHE_ENV = "CIFAR_LAB_CACHE_DIR"
RANK_FILE = ".autotune.json"  # rank 0's decision, for the other DDP ranks


@dataclass
class Candidate:
    """One precision x memory format pair and what its timed steps gave."""

    precision: str
    memory_format: str
    images_per_s: float | None = None
    note: str = ""


@dataclass
class Decision:
    """The chosen precision and memory format, where they came from, and the measured table."""

    precision: str
    memory_format: str
    source: str  # measured | cache | explicit | checkpoint | rank 0
    table: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0
    compile: bool | None = None  # None: module.compile was not auto
    compile_timing: dict[str, Any] = field(default_factory=dict)  # eager_s, compiled_s, compile_s, steps, saved_s

    def record(self) -> dict[str, Any]:
        return {"precision": self.precision, "memory_format": self.memory_format, "source": self.source,
                "seconds": round(self.seconds, 2), "table": [asdict(c) for c in self.table],
                "compile": self.compile, "compile_timing": self.compile_timing}

    @staticmethod
    def from_record(record: dict[str, Any], source: str) -> "Decision":
        return Decision(str(record["precision"]), str(record["memory_format"]), source,
                        [Candidate(**c) for c in record.get("table", [])], compile=record.get("compile"),
                        compile_timing=dict(record.get("compile_timing") or {}))


# ----------------------------------------------------------------------------- candidates
def _device(cfg: DictConfig) -> torch.device:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def candidate_pairs(device: torch.device, precision: str, memory_format: str) -> list[tuple[str, str]]:
    """The pairs to time, the usually fastest first (so slow ones are stopped early)."""
    if precision != AUTO:
        precisions = [precision]
    elif device.type == "cuda":
        precisions = ["bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", "32"]
    else:
        precisions = ["bf16-mixed", "32"]
    formats = [memory_format] if memory_format != AUTO else ["channels_last", "contiguous"]
    return [(p, f) for p in precisions for f in formats]


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context a Lightning precision string means (none for full precision)."""
    precision = str(precision)
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _image_size(cfg: DictConfig) -> int:
    return int(OmegaConf.select(cfg, "data.source.image_size", default=32) or 32)


# ----------------------------------------------------------------------------- measuring
StepTimer = Callable[[Callable[[], float]], float]


def _wall_timer(step: Callable[[], float]) -> float:
    """Run one step; its duration in seconds. (Tests substitute a fake clock.)"""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _step_fn(cfg: DictConfig, precision: str, memory_format: str, device: torch.device, batch_size: int,
             compile: bool = False) -> Callable[[], float]:
    """One real training step of a fresh copy of the run's network (compiled when asked); returns the loss."""
    net = instantiate(cfg.model, _convert_="all").to(device).train()
    net = net.to(memory_format=MEMORY_FORMATS[memory_format])
    if compile:
        net.compile(mode=OmegaConf.select(cfg, "module.compile_mode", default=None))
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    size = _image_size(cfg)
    num_classes = int(OmegaConf.select(cfg, "data.num_classes", default=10))
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def step() -> float:
        with autocast_for(precision, device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return float(loss.detach())

    return step


def measure(cfg: DictConfig, pairs: list[tuple[str, str]], device: torch.device, batch_size: int,
            warmup: int = 1, steps: int = 2, give_up: float = 1.5, timer: StepTimer = _wall_timer,
            step_factory: Callable[..., Callable[[], float]] = _step_fn) -> list[Candidate]:
    """Time each pair; a candidate slower than ``give_up`` x the best so far is stopped early."""
    table: list[Candidate] = []
    best: float | None = None  # seconds per step of the fastest candidate so far
    for precision, memory_format in pairs:
        candidate = Candidate(precision, memory_format)
        table.append(candidate)
        try:
            step = step_factory(cfg, precision, memory_format, device, batch_size)
        except (RuntimeError, ValueError, TypeError) as err:  # e.g. a precision this device lacks
            candidate.note = f"unsupported ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
            continue
        losses: list[float] = []

        def timed_step() -> None:
            losses.append(step())

        times: list[float] = []
        for i in range(warmup + steps):
            seconds = timer(timed_step)
            if not all(map(_finite, losses)):
                candidate.note = "loss not finite: dropped"
                break
            if i >= warmup:
                times.append(seconds)
            # clearly slower than the best so far: stop here (warm-up steps get more slack)
            limit = give_up * (2.0 if i < warmup else 1.0)
            if best is not None and seconds > limit * best:
                candidate.note = "stopped early: clearly slower"
                break
        if candidate.note.startswith("loss"):
            continue
        if times:
            median = statistics.median(times)
            candidate.images_per_s = batch_size / median
            if best is None or median < best:
                best = median
        elif not candidate.note:
            candidate.note = "not timed"
    return table


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _fastest(table: list[Candidate]) -> Candidate | None:
    timed = [c for c in table if c.images_per_s is not None and not c.note.startswith("loss")]
    return max(timed, key=lambda c: c.images_per_s) if timed else None


# ----------------------------------------------------------------------------- cache
def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cifar_lab")
    return Path(root) / "autotune.json"


def cache_key(cfg: DictConfig, device: torch.device, batch_size: int, pairs: list[tuple[str, str]]) -> str:
    from cifar_lab.host import cpu_name

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    fields = {
        "device": name,
        "torch": torch.__version__,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "batch_size": batch_size,
        "image_size": _image_size(cfg),
        "threads": torch.get_num_threads(),
        "candidates": pairs,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically; a cache that cannot be written is only a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write %s (%s); the measurement will be repeated next time", path, err)
        with contextlib.suppress(Exception):
            Path(tmp).unlink(missing_ok=True)  # type: ignore[possibly-undefined]


# ----------------------------------------------------------------------------- deciding
def _saved_choice(resume_config: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if not resume_config:
        return None, None
    precision = (resume_config.get("trainer") or {}).get("precision")
    memory_format = (resume_config.get("module") or {}).get("memory_format")
    return (str(precision) if precision not in (None, AUTO) else None,
            str(memory_format) if memory_format not in (None, AUTO) else None)


def decide(cfg: DictConfig, run_dir: Path | None = None, resume_config: dict[str, Any] | None = None,
           rank: int = 0, timer: StepTimer = _wall_timer,
           step_factory: Callable[..., Callable[[], float]] = _step_fn, train_images: int | None = None) -> Decision:
    """Resolve ``auto`` in ``trainer.precision``, ``module.memory_format`` and ``module.compile``, writing the
    choice into ``cfg``. ``train_images`` (the training set's size) gives the run's length for the compile
    decision."""
    start = time.perf_counter()
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=AUTO))
    memory_format = str(OmegaConf.select(cfg, "module.memory_format", default=AUTO))
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
        decision = _measured_or_cached(cfg, precision, memory_format, timer, step_factory)
    if str(OmegaConf.select(cfg, "module.compile", default=False)) == AUTO and decision.compile is None:
        if rank != 0 and decision.source == "rank 0":
            decision.compile = False
        else:
            _decide_compile(cfg, decision, expected_steps(cfg, train_images), timer, step_factory)
    decision.seconds = time.perf_counter() - start
    with open_dict(cfg):
        cfg.trainer.precision = decision.precision
        cfg.module.memory_format = decision.memory_format
        if decision.compile is not None:
            cfg.module.compile = decision.compile
    if rank == 0 and run_dir is not None and decision.source in ("measured", "cache"):
        _write_json(Path(run_dir) / RANK_FILE, decision.record())
    return decision


def _from_rank_zero(run_dir: Path | None, wait_s: float = 120.0) -> Decision:
    path = Path(run_dir or ".") / RANK_FILE
    deadline = time.monotonic() + wait_s
    while True:
        record = _read_json(path)
        if record:
            return Decision.from_record(record, "rank 0")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 left no autotune decision in {path} within {wait_s:.0f} s")
        time.sleep(0.2)


def _measured_or_cached(cfg: DictConfig, precision: str, memory_format: str, timer: StepTimer,
                        step_factory: Callable[..., Callable[[], float]]) -> Decision:
    device = _device(cfg)
    batch_size = int(OmegaConf.select(cfg, "data.batch_size", default=128))
    pairs = candidate_pairs(device, precision, memory_format)
    key = cache_key(cfg, device, batch_size, pairs)
    path = cache_path()
    cached = _read_json(path).get(key)
    if cached:
        return Decision.from_record(cached, "cache")
    settings = OmegaConf.select(cfg, "autotune", default=None) or {}
    with _isolated_rng(device):
        table = measure(cfg, pairs, device, batch_size, warmup=int(settings.get("warmup", 1)),
                        steps=int(settings.get("steps", 2)), give_up=float(settings.get("give_up", 1.5)),
                        timer=timer, step_factory=step_factory)
    best = _fastest(table)
    if best is None:
        fallback = pairs[-1]
        log.warning("autotune: no candidate finished its timed steps; using %s %s", *fallback)
        return Decision(fallback[0], fallback[1], "measured", table)
    decision = Decision(best.precision, best.memory_format, "measured", table)
    everything = _read_json(path)
    everything[key] = decision.record()
    _write_json(path, everything)
    return decision


def expected_steps(cfg: DictConfig, train_images: int | None) -> int | None:
    """Training steps the run will take (epochs x batches, or max_steps); None when unknown."""
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    batch = int(OmegaConf.select(cfg, "data.batch_size", default=128))
    if not isinstance(epochs, int) or epochs < 0 or not train_images:
        return None
    return epochs * -(-int(train_images) // batch)


def compile_timing(cfg: DictConfig, decision: Decision, timer: StepTimer,
                   step_factory: Callable[..., Callable[[], float]], steps: int = 3) -> dict[str, float]:
    """The chosen pair's step, eager and compiled, and the compile cost (the compiled first step's extra time)."""
    device = _device(cfg)
    batch_size = int(OmegaConf.select(cfg, "data.batch_size", default=128))
    timing: dict[str, float] = {}
    for name, compiled in (("eager_s", False), ("compiled_s", True)):
        step = step_factory(cfg, decision.precision, decision.memory_format, device, batch_size, compile=compiled)
        first = timer(step)
        times = [timer(step) for _ in range(steps)]
        timing[name] = statistics.median(times)
        if compiled:
            timing["compile_s"] = max(0.0, first - timing[name])
    return timing


def _decide_compile(cfg: DictConfig, decision: Decision, steps: int | None, timer: StepTimer,
                    step_factory: Callable[..., Callable[[], float]]) -> None:
    """Compile when the run's steps save more than compiling costs (timing measured once, cached)."""
    device = _device(cfg)
    batch_size = int(OmegaConf.select(cfg, "data.batch_size", default=128))
    key = cache_key(cfg, device, batch_size, [(decision.precision, decision.memory_format, "compile")])
    path = cache_path()
    timing = _read_json(path).get(key)
    if not timing:
        try:
            with _isolated_rng(device):
                timing = compile_timing(cfg, decision, timer, step_factory)
        except Exception as err:  # noqa: BLE001 - a network or platform the compiler cannot handle
            log.warning("autotune: compiling failed (%s: %s); training without compilation", type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
            decision.compile, decision.compile_timing = False, {"error": type(err).__name__}
            return
        everything = _read_json(path)
        everything[key] = timing
        _write_json(path, everything)
    saved_per_step = timing["eager_s"] - timing["compiled_s"]
    # an unknown length counts as long: compile whenever a step is faster
    saved = saved_per_step * steps - timing["compile_s"] if steps is not None else saved_per_step
    decision.compile = saved > 0
    decision.compile_timing = {**timing, "steps": steps, "saved_s": round(saved, 2) if steps is not None else None}


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """The timed steps draw random numbers; the run's own stream must not notice."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def format_table(decision: Decision) -> str:
    """The measured table as Markdown (for the log and TensorBoard)."""
    lines = [f"autotune ({decision.source}, {decision.seconds:.1f} s): precision={decision.precision}, "
             f"memory_format={decision.memory_format}"]
    if decision.compile is not None:
        t = decision.compile_timing
        detail = (f" (step {1000 * t['eager_s']:.0f} ms eager, {1000 * t['compiled_s']:.0f} ms compiled, compiling "
                  f"{t['compile_s']:.0f} s, {t.get('steps')} steps)") if "eager_s" in t else ""
        lines[0] += f", compile={str(decision.compile).lower()}{detail}"
    if decision.table:
        lines += ["", "| precision | memory format | images/s | note |", "|---|---|---:|---|"]
        for c in decision.table:
            speed = f"{c.images_per_s:,.0f}" if c.images_per_s is not None else "-"
            chosen = " (chosen)" if (c.precision, c.memory_format) == (decision.precision, decision.memory_format) else ""
            lines.append(f"| {c.precision} | {c.memory_format} | {speed} | {c.note}{chosen} |")
    return "\n".join(lines)


def log_to_tensorboard(loggers: list, decision: Decision) -> None:
    """The table as a text entry in each TensorBoard logger of the run."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("autotune", format_table(decision), 0)

