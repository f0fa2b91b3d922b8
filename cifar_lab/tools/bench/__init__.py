"""Throughput benchmark: the usual per-image PIL pipeline against cifar-lab's defaults.

    python -m cifar_lab.bench                      # full run (tens of minutes on a 2-core CPU)
    python -m cifar_lab.bench --quick              # small counts, no ablation or speedrun
    python -m cifar_lab.bench --data-root /tmp/cifar10 --out bench.json
    python -m cifar_lab.bench --models speedrun_net simple_cnn attention_net

Four measurements; the comparisons are taken side by side in one process with interleaved
repeats (A B, B A, A B, ...) so that load changes on a shared machine hit both sides alike;
medians are reported next to every single value:

1. ``data``: augmented, normalised training batches per second. The reference is a
   torchvision dataset of PIL images (``CIFAR10`` on the python batches, ``ImageFolder``
   on an image tree, or PIL images made from tensors for generated data) with
   ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
   ``Normalize()`` in a ``DataLoader`` with 2 workers. cifar-lab's side is the configured
   ``CIFARDataModule``: whole-batch loader plus ``on_after_batch_transfer`` (batches in
   ``channels_last`` while ``module.memory_format`` is ``auto``, which is decided per
   network). Also the peak resident memory of cifar-lab's data path relative to the uint8
   images it holds.
2. ``train``: images per second of whole training steps (data, forward, backward,
   optimizer) per model: the reference feeds float32 NCHW batches from the PIL loader
   into the plain network; cifar-lab's side uses the batched path with the precision and
   memory format a training run of that config would use: ``cifar_lab.builders.settle.settle``
   (``auto`` measured, or read from ``$CIFAR_LAB_CACHE_DIR/autotune.json``; explicit values
   kept), whose choice, source, own table and seconds are recorded (``autotune``); and
   the configured ``compile``. (The first run of a setup includes autotune's own
   measurement, about half a minute per model on a 2-core CPU; later runs read the cache.)
   A model is composed as a training run of it would be:
   ``speedrun_net`` as ``experiment=speedrun`` (its optimizer, augmentation, batch 1024),
   the others as ``model=<name>``. With ``--ablation`` (on in the full run) the batched
   path is also timed for every precision x memory format pair autotune chooses from
   (``32`` / ``bf16-mixed`` x ``channels_last`` / NCHW on a CPU; ``bf16-mixed`` or
   ``16-mixed`` and ``32`` on a GPU), the autotuned pair among them on the same code path,
   and ``default_over_best`` is the autotuned pair's median over the best timed pair's
   median (target: at least 0.95). Autotune's rules hold here too: a pair whose precision
   the precision probe finds over ``autotune.probe_slower`` x fp32's time here (emulated
   bf16) is listed but not timed, with the probe's ratio; a pair whose first repeat took over
   ``autotune.give_up_first`` x the fastest's time is timed no further (its one figure kept).
   ``simple_cnn``'s ablation also times the autotuned pair with one thread (not one of the
   pairs, so not in the ratio).
3. ``overhead``: ``Trainer.fit`` of the real ``ClassifierModule`` and ``CIFARDataModule``
   (no logger, checkpoints or progress bar) against a hand-written loop over the same
   model, data, autotuned precision and memory format; the ratio of their median step times,
   and the same for a tiny network in that precision and memory format.
4. ``speedrun`` (``--speedrun``, on in the full run): the achieved GFLOP/s of
   ``speedrun_net``'s training step (``experiment=speedrun``, batch 1024 or
   ``--speedrun-batch-size``, autotuned): 3 x
   the forward FLOPs of one batch as ``FlopCounterMode`` counts them over the median step
   time (batch resident on the device), against the matmul peaks in bf16 and fp32 measured
   in the same run on the same device and threads; ``fraction_of_peak`` is relative to the
   peak of the step's precision (target: at least 0.75 of the bf16 peak). With
   ``speedrun_net`` among the models, the GFLOP/s of its whole step from ``train``
   (data path included) is added.

Data: the CIFAR-10 copy in ``--data-root`` (default: the data config's root, i.e.
``$CIFAR_LAB_DATA`` or ``data/``) in the python-batches layout or as an image folder
(``train/<class>/``), else generated images. The JSON holds the machine (CPU, cores,
bf16 support, GPU, versions, load average), every setting and every timing.

Modules: ``settings`` (the sizes of a run), ``sources`` (where the images come from),
``reference`` (the PIL pipeline), ``lab`` (cifar-lab's config, autotuned choice, datamodule
and batches), ``timing`` (shared timing helpers), ``data``, ``memory``, ``training``,
``overhead`` and ``efficiency`` (the measurements), ``machine`` (what a run was measured on)
and ``report`` (the summary table); this module holds the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cifar_lab.host import keep_freed_memory

# The package's parts, one measurement or concern each. Every name the single-file version
# of this tool had stays reachable as ``cifar_lab.tools.bench.<name>``.
from cifar_lab.tools.bench.data import bench_data, time_batches
from cifar_lab.tools.bench.efficiency import (
    MatmulPeak,
    bench_speedrun,
    forward_flops,
    matmul_peak,
    training_flops,
    with_data_path,
)
from cifar_lab.tools.bench.lab import (
    _LOADED,
    _open,
    _TrainingStub,
    autotuned,
    build_datamodule,
    compose,
    lab_batches,
    lab_datamodule,
    model_overrides,
)
from cifar_lab.tools.bench.machine import machine_info
from cifar_lab.tools.bench.memory import _reset_peak_rss, _status_kb, bench_memory
from cifar_lab.tools.bench.overhead import _paired_fit, bench_overhead
from cifar_lab.tools.bench.reference import (
    MEAN,
    STD,
    PILImages,
    reference_batches,
    reference_dataset,
    reference_loader,
    reference_transform,
)
from cifar_lab.tools.bench.report import _fmt, ablation_cell, format_table
from cifar_lab.tools.bench.settings import MODEL_CHOICES, MODELS, Settings
from cifar_lab.tools.bench.sources import CIFAR10_FILES, data_overrides, default_data_root, detect_data
from cifar_lab.tools.bench.timing import _device, _interleaved, _median, _sync
from cifar_lab.tools.bench.training import (
    LabVariant,
    _autocast,
    _lab_runner,
    _optimizer,
    _train_step_fn,
    _Warmup,
    ablation_variants,
    bench_ablation,
    bench_train,
    default_over_best,
    not_timed,
    time_steps,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_lab.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, no ablation or speedrun (the quickest look; "
                   "its time on each CPU kind: docs/benchmarks.md)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: bench_results.json)")
    p.add_argument("--data-root", type=Path, default=None, help="folder with cifar-10-batches-py/ or train/<class>/ "
                   "(default: $CIFAR_LAB_DATA or data/); generated images when neither is there")
    p.add_argument("--generated", action="store_true", help="use generated images even when data is found")
    p.add_argument("--generated-size", type=int, default=None, help="number of generated training images")
    p.add_argument("--steps", type=int, default=None, help="scale every count down to about N, and the matmul peaks to 256 x 256 (for tests)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per comparison")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--heavy-batch-size", type=int, default=None, help="batch size of resnet_se and attention_net")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    p.add_argument("--omp-wait-policy", choices=("active", "passive"), default=None,
                   help="run with OMP_WAIT_POLICY set (the process restarts itself, as OpenMP reads it at start-up)")
    p.add_argument("--models", nargs="+", choices=MODEL_CHOICES, default=None,
                   help=f"models to train (default: {' '.join(MODELS)}); speedrun_net runs as experiment=speedrun")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every precision x memory format on the batched path, and the autotuned "
                   "pair against the best (default: full run only)")
    p.add_argument("--speedrun", action=argparse.BooleanOptionalAction, default=None,
                   help="GFLOP/s of speedrun_net's training step against the matmul peaks (default: full run only)")
    p.add_argument("--speedrun-batch-size", type=int, default=None,
                   help="batch size of speedrun_net (default 1024 as in experiment=speedrun; 128 with --quick)")
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
    if data_cfg.module.memory_format == "auto":  # decided per network; the data path alone needs one
        with _open(data_cfg):
            data_cfg.module.memory_format = "channels_last"
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
    if settings.speedrun:
        log("speedrun: training-step GFLOP/s against the matmul peaks")
        res["speedrun"] = bench_speedrun(base, settings, device, log, train=res["train"].get("speedrun_net"))

    with contextlib.suppress(OSError):
        res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = time.perf_counter() - started
    res["data_speedup"] = res["data"]["speedup"] if "data" in res else None
    res["train_speedup"] = {m: t["speedup"] for m, t in res["train"].items()}
    res["lightning_overhead"] = res["overhead"]["ratio"] if "overhead" in res else None
    res["memory_peak_ratio"] = (res.get("memory") or {}).get("peak_ratio")
    res["default_over_best"] = {m: t["default_over_best"]["ratio"] for m, t in res["train"].items()
                                if "default_over_best" in t}
    res["speedrun_fraction_of_peak"] = res["speedrun"]["fraction_of_peak"] if "speedrun" in res else None
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
