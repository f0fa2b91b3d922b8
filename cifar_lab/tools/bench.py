"""Throughput benchmark: the usual per-image PIL pipeline against cifar-lab's defaults.

    python -m cifar_lab.bench                      # full run (tens of minutes on a 2-core CPU)
    python -m cifar_lab.bench --quick              # about a minute
    python -m cifar_lab.bench --data-root /tmp/cifar10 --out bench.json

Three measurements, each taken side by side in one process with interleaved repeats
(A B, B A, A B, ...) so that load changes on a shared machine hit both sides alike;
medians are reported next to every single value:

1. ``data``: augmented, normalised training batches per second. The reference is a
   torchvision dataset of PIL images (``CIFAR10`` on the python batches, ``ImageFolder``
   on an image tree, or PIL images made from tensors for generated data) with
   ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
   ``Normalize()`` in a ``DataLoader`` with 2 workers. cifar-lab's side is the configured
   ``CIFARDataModule``: whole-batch loader plus ``on_after_batch_transfer``. Also the
   peak resident memory of cifar-lab's data path relative to the uint8 images it holds.
2. ``train``: images per second of whole training steps (data, forward, backward,
   optimizer) per model: the reference feeds float32 NCHW batches from the PIL loader
   into the plain network; cifar-lab's side uses the batched path and the configured
   precision, ``channels_last`` and ``compile``. With ``--ablation`` (on in the full
   run) the batched path is also timed for every precision x memory-format pair.
3. ``overhead``: ``Trainer.fit`` of the real ``ClassifierModule`` and ``CIFARDataModule``
   (no logger, checkpoints or progress bar) against a hand-written loop over the same
   model, data and precision; the ratio of their median step times.

Data: the CIFAR-10 copy in ``--data-root`` (default: the data config's root, i.e.
``$CIFAR_LAB_DATA`` or ``data/``) in the python-batches layout or as an image folder
(``train/<class>/``), else generated images. The JSON holds the machine (CPU, cores,
bf16 support, GPU, versions, load average), every setting and every timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cifar_lab.host import cpu_flags, cpu_name, keep_freed_memory

from cifar_lab.config import CONF_DIR  # noqa: E402
MODELS = ("simple_cnn", "resnet_se", "attention_net")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Sizes of one benchmark run; ``--quick`` and the full run differ only here."""

    quick: bool = False
    batch_size: int = 128
    workers: int = 2
    # Many short interleaved repeats: on a shared machine the load changes within seconds,
    # and medians over short alternating blocks follow it far better than a few long ones.
    repeats: int = 8  # interleaved repeats per comparison
    data_batches: int = 40  # timed batches per data repeat
    data_warmup: int = 4
    train_steps: int = 2  # timed training steps per repeat
    train_warmup: int = 2  # untimed steps before a runner's first repeat
    heavy_batch_size: int = 128  # batch size of resnet_se and attention_net
    overhead_steps: int = 60
    overhead_warmup: int = 5
    overhead_repeats: int = 3
    generated_train: int = 20000
    generated_test: int = 2000
    memory_batches: int = 100
    ablation: bool = True
    models: tuple[str, ...] = MODELS

    @classmethod
    def for_run(cls, args: argparse.Namespace) -> "Settings":
        s = cls()
        if args.quick:
            s = cls(quick=True, repeats=2, data_batches=12, data_warmup=3, train_steps=1, train_warmup=1,
                    heavy_batch_size=8, overhead_steps=16, overhead_warmup=3, overhead_repeats=1,
                    generated_train=6000, generated_test=500, memory_batches=20, ablation=False)
        if args.steps is not None:  # a tiny run for tests: every count scaled down
            n = max(1, args.steps)
            s.train_steps = n
            s.train_warmup = 1
            s.data_batches = max(2, n)
            s.data_warmup = 1
            s.overhead_steps = max(3, n + 2)
            s.overhead_warmup = 1
            s.memory_batches = max(2, n)
        if args.repeats is not None:
            s.repeats = s.overhead_repeats = max(1, args.repeats)
        if args.batch_size is not None:
            s.batch_size = args.batch_size
            s.heavy_batch_size = min(s.heavy_batch_size, args.batch_size)
        if args.heavy_batch_size is not None:
            s.heavy_batch_size = args.heavy_batch_size
        if args.generated_size is not None:
            s.generated_train = args.generated_size
            s.generated_test = max(100, args.generated_size // 10)
        if args.ablation is not None:
            s.ablation = args.ablation
        if args.models:
            s.models = tuple(args.models)
        s.workers = args.workers
        return s


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import lightning
    import torchvision

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info["env"] = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "GOMP_SPINCOUNT", "CIFAR_LAB_DATA") if k in os.environ}
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ----------------------------------------------------------------------------- data sources


def detect_data(root: Path) -> str:
    """``batches`` (cifar-10-batches-py/), ``folder`` (train/<class>/, test/<class>/) or ``generated``."""
    if all((root / "cifar-10-batches-py" / name).is_file() for name in CIFAR10_FILES):
        return "batches"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    return "generated"


def default_data_root() -> Path:
    """What ``paths.data_dir`` resolves to: ``$CIFAR_LAB_DATA`` or ``data``."""
    return Path(os.environ.get("CIFAR_LAB_DATA", "data"))


class PILImages(Dataset):
    """HWC uint8 images served as PIL images, exactly as ``torchvision.datasets.CIFAR10`` does."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.data = images_hwc
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import PIL.Image

        return self.transform(PIL.Image.fromarray(self.data[index])), self.targets[index]


def reference_transform() -> Callable:
    """The per-image training transform of the reports (torchvision v1 API)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def reference_dataset(kind: str, root: Path, generated: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Dataset, str]:
    """The reports' training dataset and a description of what it is."""
    transform = reference_transform()
    if kind == "batches":
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(root), train=True, download=False, transform=transform), "torchvision CIFAR10"
        except RuntimeError:
            # torchvision insists on the official md5 sums; a re-encoded copy is read here
            # and served by the same __getitem__ (Image.fromarray + transform)
            from cifar_lab.data.archive import CifarArchive

            splits = CifarArchive(root, download=False).load()
            images = splits.train_x.permute(0, 2, 3, 1).contiguous().numpy()
            return PILImages(images, splits.train_y.numpy(), transform), "PIL images from the batch files (CIFAR10.__getitem__)"
    if kind == "folder":
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(root / "train"), transform=transform), "torchvision ImageFolder (JPEG decode per image)"
    assert generated is not None
    images, labels = generated
    return PILImages(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(), transform), "PIL images from generated tensors"


def data_overrides(kind: str, root: Path, settings: Settings) -> list[str]:
    if kind == "batches":
        return ["data=cifar10", f"data.root={root}", "data.source.download=false"]
    if kind == "folder":
        return ["data=imagefolder", f"data.root={root}"]
    return ["data=synthetic", f"data.source.train_size={settings.generated_train}",
            f"data.source.test_size={settings.generated_test}", f"data.val_size={settings.generated_train // 10}"]


def compose(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides``, without a Hydra run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import cifar_lab  # noqa: F401  (registers the resolvers)

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["logger=none", "callbacks=none", *overrides],
                            return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):  # what a Hydra run would set; the benchmark writes no run files
        cfg.hydra.runtime.output_dir = str(Path(tempfile.gettempdir()) / "cifar_lab_bench")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# ----------------------------------------------------------------------------- helpers


class _TrainingStub:
    """What ``CIFARDataModule.on_after_batch_transfer`` reads from a Trainer while training."""

    training = True
    sanity_checking = False
    current_epoch = 0
    global_rank = 0
    world_size = 1


_LOADED: dict[str, Any] = {}  # source description -> ImageSplits, so repeats skip decoding


def build_datamodule(cfg, cached: bool = True):
    """The configured datamodule; with ``cached`` its source loads from disk only once per run."""
    from cifar_lab import builders

    dm = builders.build_datamodule(cfg)
    if cached:
        source = dm.source
        key = source.describe()
        load = source.load

        def load_once():
            if key not in _LOADED:
                _LOADED[key] = load()
            return _LOADED[key]

        source.load = load_once
    return dm


def lab_datamodule(cfg, batch_size: int, cached: bool = True):
    """A set-up datamodule that augments as in training (a stand-in for the Trainer)."""
    with _open(cfg):
        cfg.data.batch_size = batch_size
    dm = build_datamodule(cfg, cached)
    dm.setup("fit")
    dm.trainer = _TrainingStub()
    return dm


@contextlib.contextmanager
def _open(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        yield


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lab_batches(dm, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """cifar-lab's training batches as Lightning delivers them: loader, transfer, hook."""
    while True:
        for batch in dm.train_dataloader():
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            yield dm.on_after_batch_transfer(batch, 0)


def reference_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=True)


def reference_batches(dataset: Dataset, batch_size: int, workers: int, device: torch.device):
    loader = reference_loader(dataset, batch_size, workers, device)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _autocast(precision: str, device: torch.device):
    precision = str(precision)
    if precision.startswith("bf16") and "mixed" in precision or precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _interleaved(repeats: int, runners: dict[str, Callable[[], float]], log: Callable[[str], None]) -> dict[str, list[float]]:
    """Runs each runner once per repeat, reversing the order every other repeat."""
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            value = runners[name]()
            out[name].append(value)
            log(f"    {name:<28s} repeat {r + 1}/{repeats}: {value:10.1f} images/s")
    return out


# ----------------------------------------------------------------------------- 1. data only


def time_batches(batches: Iterator, warmup: int, count: int, batch_size: int, device: torch.device) -> float:
    """Images/s over ``count`` batches after ``warmup`` untimed ones (worker start-up excluded)."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    start = time.perf_counter()
    for _ in range(count):
        x, _y = next(batches)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


def bench_data(ref_dataset: Dataset, cfg, settings: Settings, device: torch.device, log) -> dict[str, Any]:
    bs = settings.batch_size
    dm = lab_datamodule(cfg, bs)

    def reference() -> float:
        it = reference_batches(ref_dataset, bs, settings.workers, device)
        try:
            return time_batches(it, settings.data_warmup, settings.data_batches, bs, device)
        finally:
            it.close()  # shuts the workers down before the other side runs

    def lab() -> float:
        it = lab_batches(dm, device)
        try:
            return time_batches(it, settings.data_warmup, settings.data_batches, bs, device)
        finally:
            it.close()

    runs = _interleaved(settings.repeats, {"reference": reference, "cifar_lab": lab}, log)
    x, _ = next(lab_batches(dm, device))
    return {
        "batch_size": bs,
        "reference": {"images_per_s": runs["reference"], "median": _median(runs["reference"]),
                      "workers": settings.workers},
        "cifar_lab": {"images_per_s": runs["cifar_lab"], "median": _median(runs["cifar_lab"]),
                      "output": f"{x.dtype} {'channels_last' if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else 'NCHW'}",
                      "augment": [type(op).__name__ for op in dm.train_augment.ops.values()]},
        "speedup": _median(runs["cifar_lab"]) / _median(runs["reference"]),
    }


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_memory(cfg, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Peak resident memory of cifar-lab's data path (setup + training batches) over the
    bytes of the uint8 images it keeps, read from /proc/self/status (VmHWM, reset first)."""
    gc.collect()
    base = _status_kb("VmRSS")
    if base is None or not _reset_peak_rss():
        return {"available": False}
    dm = lab_datamodule(cfg, settings.batch_size, cached=False)
    it = lab_batches(dm, device)
    for _ in range(settings.memory_batches):
        next(it)
    it.close()
    peak = _status_kb("VmHWM") or 0
    # whole storages, counted once: splits may be views of one buffer
    held = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x, _y in dm.splits.values()}
    dataset_bytes = sum(held.values())
    result = {
        "available": True,
        "dataset_uint8_mb": dataset_bytes / 2**20,
        "peak_rss_increase_mb": (peak - base) / 1024,
        "peak_ratio": (peak - base) * 1024 / dataset_bytes,
        "val_size": int(cfg.data.val_size),
        "batches": settings.memory_batches,
    }
    del dm
    gc.collect()
    return result


# ----------------------------------------------------------------------------- 2. training


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    from hydra.utils import instantiate

    return instantiate(cfg.optimizer)(params=params)


def _train_step_fn(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, precision: str,
                   device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(precision, device):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class _Warmup:
    """Warm-up steps (allocations, oneDNN primitives, compilation) for a runner's first repeat only."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def take(self) -> int:
        steps, self.steps = self.steps, 0
        return steps


def time_steps(batches: Iterator, step: Callable, warmup: int, count: int, batch_size: int, device) -> float:
    """Images/s of ``count`` training steps; the first batch of a fresh iterator (worker
    start-up) and ``warmup`` steps are not timed."""
    pending = next(batches)
    for _ in range(warmup):
        step(*pending)
        pending = next(batches)
    _sync(device)
    start = time.perf_counter()
    for i in range(count):
        step(*pending)
        if i + 1 < count:
            pending = next(batches)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


@dataclass
class LabVariant:
    """One way to run cifar-lab's batched path: precision, memory format, compile."""

    precision: str
    channels_last: bool
    compile: bool = False
    threads: int | None = None

    @property
    def name(self) -> str:
        name = f"{self.precision} {'channels_last' if self.channels_last else 'NCHW'}"
        if self.compile:
            name += " compile"
        if self.threads:
            name += f" {self.threads} thread{'s' if self.threads > 1 else ''}"
        return name


def _lab_runner(cfg, variant: LabVariant, bs: int, settings: Settings, device: torch.device) -> Callable[[], float]:
    from cifar_lab import builders

    with _open(cfg):
        cfg.module.memory_format = "channels_last" if variant.channels_last else "contiguous"
        cfg.module.compile = variant.compile
    dm = lab_datamodule(cfg, bs)
    module = builders.build_module(cfg).to(device).train()
    dm.channels_last = module.channels_last  # what the module's setup() does in a Trainer
    step = _train_step_fn(module, _optimizer(cfg, module.net.parameters()), variant.precision, device)
    warmup = _Warmup(settings.train_warmup)

    def run() -> float:
        threads = torch.get_num_threads()
        if variant.threads:
            torch.set_num_threads(variant.threads)
        it = lab_batches(dm, device)
        try:
            return time_steps(it, step, warmup.take(), settings.train_steps, bs, device)
        finally:
            it.close()
            torch.set_num_threads(threads)

    return run


def bench_train(model: str, ref_dataset: Dataset, base_overrides: list[str], settings: Settings,
                device: torch.device, log) -> dict[str, Any]:
    from hydra.utils import instantiate

    bs = settings.batch_size if model == "simple_cnn" else settings.heavy_batch_size
    cfg = compose([*base_overrides, f"model={model}"])
    default = LabVariant(str(cfg.trainer.precision), cfg.module.memory_format == "channels_last", bool(cfg.module.compile))

    torch.manual_seed(0)
    net = instantiate(cfg.model, _convert_="all").to(device).train()
    ref_step = _train_step_fn(net, _optimizer(cfg, net.parameters()), "32", device)
    ref_warmup = _Warmup(settings.train_warmup)

    def reference() -> float:
        it = reference_batches(ref_dataset, bs, settings.workers, device)
        try:
            return time_steps(it, ref_step, ref_warmup.take(), settings.train_steps, bs, device)
        finally:
            it.close()

    runners: dict[str, Callable[[], float]] = {"reference": reference, "cifar_lab": _lab_runner(cfg, default, bs, settings, device)}
    runs = _interleaved(settings.repeats, runners, log)
    result: dict[str, Any] = {
        "batch_size": bs,
        "reference": {"images_per_s": runs["reference"], "median": _median(runs["reference"]),
                      "settings": "PIL DataLoader (2 workers), float32, NCHW"},
        "cifar_lab": {"images_per_s": runs["cifar_lab"], "median": _median(runs["cifar_lab"]),
                      "settings": default.name},
        "speedup": _median(runs["cifar_lab"]) / _median(runs["reference"]),
    }
    if settings.ablation:
        variants = [LabVariant(p, cl) for p in ("32", "bf16-mixed") for cl in (False, True)]
        if model == "simple_cnn":
            best_threads = 1 if (os.cpu_count() or 1) > 1 else None
            if best_threads:
                variants.append(LabVariant(default.precision, default.channels_last, threads=best_threads))
        ab_runners = {v.name: _lab_runner(compose([*base_overrides, f"model={model}"]), v, bs, settings, device)
                      for v in variants}
        log(f"  ablation ({model}, batched path)")
        ab = _interleaved(max(1, settings.repeats // 2), ab_runners, log)
        result["ablation"] = {name: {"images_per_s": v, "median": _median(v)} for name, v in ab.items()}
    return result


# ----------------------------------------------------------------------------- 3. Lightning overhead


def _paired_fit(cfg, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Step times of ``Trainer.fit`` and of a hand-written step, interleaved step by step.

    After every Lightning step a callback runs one hand-written step (its own module,
    optimizer and datamodule, same config) and times it; a Lightning step is the time
    from the end of that hand-written step to the end of the next Lightning step (batch
    fetch, hooks, training_step with its metrics and logging, backward, optimizer). Each
    pair shares the machine's load, which separate runs on a shared machine do not.
    """
    import lightning as L

    from cifar_lab import builders

    lightning_times: list[float] = []
    plain_times: list[float] = []
    plain_dm = lab_datamodule(cfg, int(cfg.data.batch_size))
    plain_module = builders.build_module(cfg).to(device).train()
    plain_step = _train_step_fn(plain_module, _optimizer(cfg, plain_module.net.parameters()),
                                str(cfg.trainer.precision), device)
    plain_batches = lab_batches(plain_dm, device)

    class PairedSteps(L.Callback):
        mark = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            now = time.perf_counter()
            lightning_times.append(now - self.mark)
            with torch.enable_grad():
                plain_step(*next(plain_batches))  # batch fetch + augmentation + step, as in a loop
            _sync(device)
            self.mark = time.perf_counter()
            plain_times.append(self.mark - now)

    dm = build_datamodule(cfg)
    module = builders.build_module(cfg)
    t = cfg.trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            default_root_dir=tmp, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision=t.precision, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, callbacks=[PairedSteps()], log_every_n_steps=t.log_every_n_steps,
            use_distributed_sampler=False, gradient_clip_val=t.gradient_clip_val,
            accumulate_grad_batches=t.accumulate_grad_batches, benchmark=t.benchmark, deterministic=t.deterministic,
        )
        trainer.fit(module, datamodule=dm)
    plain_batches.close()
    return {"lightning": lightning_times[warmup:], "plain": plain_times[warmup:]}


def bench_overhead(base_overrides: list[str], settings: Settings, device: torch.device, log,
                   model: str = "simple_cnn") -> dict[str, Any]:
    """Lightning's per-step cost over a hand-written loop, for ``model`` and for a tiny
    network (where almost all of a step is overhead, so it shows in milliseconds)."""
    out: dict[str, Any] = {"model_name": model, "batch_size": settings.batch_size, "steps": settings.overhead_steps,
                           "method": "paired: one hand-written step after every Lightning step, medians"}
    tiny = [f"model={model}", "model.filters=[4,4]", "model.fc_units=8"] if model == "simple_cnn" else None
    for label, extra in (("model", [f"model={model}"]), ("tiny", tiny)):
        if extra is None:
            continue
        cfg = compose([*base_overrides, *extra])
        with _open(cfg):
            cfg.data.batch_size = settings.batch_size
        times: dict[str, list[float]] = {"lightning": [], "plain": []}
        for r in range(settings.overhead_repeats):
            res = _paired_fit(cfg, settings.overhead_steps, settings.overhead_warmup, device)
            for k in times:
                times[k].extend(res[k])
            log(f"    {label:<6s} repeat {r + 1}/{settings.overhead_repeats}: median step "
                f"{1000 * _median(res['lightning']):7.2f} ms Lightning, {1000 * _median(res['plain']):7.2f} ms plain")
        lm, pm = _median(times["lightning"]), _median(times["plain"])
        diffs = [a - b for a, b in zip(times["lightning"], times["plain"])]
        out[label] = {"lightning_median_step_ms": 1000 * lm, "plain_median_step_ms": 1000 * pm,
                      "median_paired_difference_ms": 1000 * _median(diffs),
                      "ratio": lm / pm, "precision": str(cfg.trainer.precision), "steps_timed": len(diffs)}
        out["precision"] = str(cfg.trainer.precision)
    out["ratio"] = out["model"]["ratio"]
    if "tiny" in out:
        # the tiny network's absolute per-step overhead added to the real model's step
        add = out["tiny"]["median_paired_difference_ms"]
        out["ratio_from_tiny_overhead"] = (out["model"]["plain_median_step_ms"] + add) / out["model"]["plain_median_step_ms"]
    return out


# ----------------------------------------------------------------------------- report


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def format_table(res: dict[str, Any]) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']}, "
                 f"threads {m['torch_threads']}, env {m.get('env') or {}}, "
                 f"load {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    lines.append(f"data: {res['data_source']} (reference: {res.get('reference_dataset')}); "
                 f"host memory reuse (train/overhead): {'on' if res.get('reuse_host_memory') else 'off'}")
    rows = [("measure", "reference", "cifar-lab", "speedup", "cifar-lab settings")]
    d = res.get("data")
    if d:
        rows.append((f"data only, img/s (batch {d['batch_size']})", _fmt(d["reference"]["median"]),
                     _fmt(d["cifar_lab"]["median"]), f"{d['speedup']:.1f}x", d["cifar_lab"]["output"]))
    for model, t in res["train"].items():
        rows.append((f"train {model}, img/s (batch {t['batch_size']})", _fmt(t["reference"]["median"]),
                     _fmt(t["cifar_lab"]["median"]), f"{t['speedup']:.2f}x", t["cifar_lab"]["settings"]))
    o = res.get("overhead")
    if o:
        m_ = o["model"]
        rows.append((f"step ms, hand loop vs Lightning ({o['model_name']}, batch {o['batch_size']})",
                     f"{m_['plain_median_step_ms']:.1f}", f"{m_['lightning_median_step_ms']:.1f}",
                     f"{m_['ratio']:.3f} ratio", o["precision"]))
        if "tiny" in o:
            t_ = o["tiny"]
            rows.append(("step ms, same with a tiny network", f"{t_['plain_median_step_ms']:.2f}",
                         f"{t_['lightning_median_step_ms']:.2f}", f"+{t_['median_paired_difference_ms']:.2f} ms",
                         f"-> ratio {o['ratio_from_tiny_overhead']:.3f} for {o['model_name']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j in (0, 4) else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    mem = res.get("memory") or {}
    if mem.get("available"):
        lines.append(f"data path peak RSS increase: {mem['peak_rss_increase_mb']:.0f} MB = {mem['peak_ratio']:.2f}x the "
                     f"{mem['dataset_uint8_mb']:.0f} MB of uint8 images held (val_size={mem['val_size']})")
    for model, t in res["train"].items():
        if "ablation" in t:
            parts = ", ".join(f"{k}: {_fmt(v['median'])}" for k, v in t["ablation"].items())
            lines.append(f"ablation {model} (img/s, batched path): {parts}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_lab.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts; finishes in about a minute on a 2-core CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: bench_results.json)")
    p.add_argument("--data-root", type=Path, default=None, help="folder with cifar-10-batches-py/ or train/<class>/ "
                   "(default: $CIFAR_LAB_DATA or data/); generated images when neither is there")
    p.add_argument("--generated", action="store_true", help="use generated images even when data is found")
    p.add_argument("--generated-size", type=int, default=None, help="number of generated training images")
    p.add_argument("--steps", type=int, default=None, help="scale every count down to about N (for tests)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per comparison")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--heavy-batch-size", type=int, default=None, help="batch size of resnet_se and attention_net")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    p.add_argument("--omp-wait-policy", choices=("active", "passive"), default=None,
                   help="run with OMP_WAIT_POLICY set (the process restarts itself, as OpenMP reads it at start-up)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None)
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every precision x memory format on the batched path (default: full run only)")
    p.add_argument("--skip", nargs="+", choices=("data", "memory", "train", "overhead"), default=(),
                   help="parts to leave out")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.precision=32")
    return p


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.for_run(args)
    device = _device()
    root = (args.data_root or default_data_root()).expanduser()
    kind = "generated" if args.generated else detect_data(root)
    base = [*data_overrides(kind, root, settings), *args.overrides]
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine_info(), "settings": settings.__dict__ | {"models": list(settings.models)},
                           "data_source": kind if kind == "generated" else f"{kind} in {root}",
                           "overrides": base, "device": str(device)}
    log(f"cifar-lab benchmark ({'quick' if settings.quick else 'full'}) on {res['machine']['cpu']}, "
        f"data: {res['data_source']}, device: {device}")

    generated = None
    if kind == "generated":
        from cifar_lab.data.synthetic import SyntheticSource

        splits = SyntheticSource(num_classes=10, train_size=settings.generated_train,
                                 test_size=settings.generated_test).load()
        generated = (splits.train_x, splits.train_y)

    data_cfg = compose(base)
    if "memory" not in args.skip:
        log("memory: peak RSS of cifar-lab's data path")
        res["memory"] = bench_memory(data_cfg, settings, device)
    # train.py's default (reuse_host_memory), switched on after the memory measurement, whose
    # resident-set figures retained heap pages would hide; the reference shares the process.
    res["reuse_host_memory"] = bool(data_cfg.get("reuse_host_memory", False)) and keep_freed_memory()
    ref_dataset, res["reference_dataset"] = reference_dataset(kind, root, generated)
    with _open(data_cfg):
        data_cfg.data.val_size = 0  # both sides read the whole training set
    if "data" not in args.skip:
        log("data only: augmented, normalised training batches")
        res["data"] = bench_data(ref_dataset, data_cfg, settings, device, log)
    res["train"] = {}
    if "train" not in args.skip:
        for model in settings.models:
            log(f"training: {model}")
            res["train"][model] = bench_train(model, ref_dataset, [*base, "data.val_size=0"], settings, device, log)
    if "overhead" not in args.skip:
        log("Lightning overhead: Trainer.fit vs a hand-written loop")
        res["overhead"] = bench_overhead(base, settings, device, log)

    with contextlib.suppress(OSError):
        res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = time.perf_counter() - started
    res["data_speedup"] = res["data"]["speedup"] if "data" in res else None
    res["train_speedup"] = {m: t["speedup"] for m, t in res["train"].items()}
    res["lightning_overhead"] = res["overhead"]["ratio"] if "overhead" in res else None
    res["memory_peak_ratio"] = (res.get("memory") or {}).get("peak_ratio")
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY", "").lower() != args.omp_wait_policy:
        argv = sys.argv[1:] if argv is None else argv
        env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy.upper()}
        os.execve(sys.executable, [sys.executable, "-m", "cifar_lab.bench", *argv], env)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("cifar_lab").setLevel(logging.WARNING)
    res = run(args)
    out = args.out or Path("bench_results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print()
    print(format_table(res))
    print(f"\nwall time {res['wall_s']:.0f} s; results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
