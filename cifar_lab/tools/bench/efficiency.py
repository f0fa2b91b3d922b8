"""Measurement 4, compute efficiency of the speedrun: the training step's achieved GFLOP/s
against the machine's matmul peak, measured in the same run on the same device and threads.

* FLOPs of a training step: 3 x the forward FLOPs of the network on one batch, as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add; matmuls,
  convolutions and attention only, so normalisation, activations, pooling and the optimizer
  count nothing); forward + backward is taken as 3 forwards. The count of a real forward +
  backward pass is recorded beside it (lower where a layer needs no weight or input gradient,
  e.g. the speedrun's frozen whitening stem on the input images).
* Step time: the median of whole training steps (forward under the autotuned precision,
  loss, backward, optimizer step) on one batch resident on the device, in the autotuned
  memory format: the compute a training step does, without the data path.
* With the data path: the training measurement's images/s of the same model and batch, at the
  FLOPs of the image size its batches had. It once read 1.5x the step measurement on an AMX
  Xeon (0.594 against 0.392 of the peak) because its FLOPs were counted at 32 px while its
  batches, served at epoch 0, were the speedrun recipe's 24 px images (0.56 of the pixels).
  The interleaved matmul samples were not the cause: steps timed back to back and steps
  each followed by a peak sample took the same time (943 and 964 ms, medians of 5).
* Peak: GFLOP/s of a square matmul (``n`` x ``n`` by ``n`` x ``n``, 2 n^3 FLOPs) in bf16 and fp32
  (and fp16 where the step ran in 16-mixed), the best sample. One sample of each peak is
  taken after each timed step, so a load change on a shared machine hits both alike.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lab.models.flops import TRAIN_STEP_FORWARDS, forward_flops
from cifar_lab.tools.bench.lab import assembled_module, autotuned, compose, model_overrides
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _median, _sync
from cifar_lab.tools.bench.training import _autocast, _optimizer, _train_step_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the matmul peak a step in each precision is held against
PEAK_OF = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16-true": "fp16", "32": "fp32", "32-true": "fp32"}


def default_peak_size(device: torch.device) -> int:
    """Large enough to be compute-bound: 2048 on a CPU, 4096 on a GPU."""
    return 4096 if device.type == "cuda" else 2048


class MatmulPeak:
    """Samples of ``n`` x ``n`` matmul GFLOP/s in ``dtype`` on ``device`` (operands made once)."""

    def __init__(self, dtype: torch.dtype, n: int, device: torch.device, min_sample_s: float = 0.02) -> None:
        self.device, self.n = device, n
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        self.inner = 1
        seconds = self._time(1)  # warm-up (library and kernel selection, page faults)
        seconds = self._time(1)
        # a sample of several products where one is too short to time (a fast GPU)
        self.inner = max(1, min(1000, math.ceil(min_sample_s / max(seconds, 1e-9))))

    def _time(self, count: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(self.a, self.b, out=self.out)
        _sync(self.device)
        return time.perf_counter() - start

    def sample(self) -> float:
        """GFLOP/s of one timed sample."""
        return self.inner * 2 * self.n**3 / self._time(self.inner) / 1e9


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: torch.device | None = None) -> float:
    """The best of ``repeats`` samples of square-matmul GFLOP/s (2 n^3 FLOPs per product)."""
    peak = MatmulPeak(dtype, n, device or torch.device("cpu"))
    return max(peak.sample() for _ in range(repeats))


def training_flops(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """FLOPs of a training step on ``x``: forward + backward taken as 3 forwards."""
    return TRAIN_STEP_FORWARDS * forward_flops(net, x)


def counted_forward_backward_flops(net: nn.Module, x: torch.Tensor, precision: str = "32") -> int:
    """FLOPs of one real forward + backward pass (cross-entropy on random labels), as counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with _autocast(precision, x.device):
            logits = net(x)
        F.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long, device=x.device)).backward()
    for p in net.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def bench_speedrun(base_overrides: list[str], settings: Settings, device: torch.device, log,
                   model: str = "speedrun_net", train: dict[str, Any] | None = None) -> dict[str, Any]:
    """GFLOP/s of ``model``'s training step (its experiment's config, the autotuned precision and
    memory format) and the matmul peaks beside it; with ``train`` (the training measurement of
    ``model``) also the GFLOP/s of that whole step, data path included."""
    from cifar_lab.module import MEMORY_FORMATS

    bs = settings.speedrun_batch_size
    cfg = compose([*base_overrides, *model_overrides(model), "data.val_size=0"])
    settled = autotuned(cfg, bs)
    cfg, decision = settled.cfg, settled.decision
    precision, memory_format = decision.precision, decision.memory_format
    log(f"  {model} batch {bs}: autotune ({decision.source}, {decision.seconds:.1f} s): {precision} {memory_format}")
    torch.manual_seed(0)
    module = assembled_module(settled, device)  # the module applies the memory format
    size = int(cfg.data.source.get("image_size", 32) or 32)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    y = torch.randint(0, int(cfg.data.num_classes), (bs,), device=device)
    fwd = forward_flops(module, x)
    counted = counted_forward_backward_flops(module, x, precision)
    step = _train_step_fn(module, _optimizer(cfg, module.net.parameters()), precision, device)

    peak_name = PEAK_OF.get(str(precision), "fp32")
    names = sorted({"bf16", "fp32", peak_name}, key=list(DTYPES).index)
    n = settings.peak_size or default_peak_size(device)
    peaks = {name: MatmulPeak(DTYPES[name], n, device) for name in names}
    for _ in range(settings.speedrun_warmup):
        step(x, y)
    step_s: list[float] = []
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(settings.speedrun_steps):  # one step, then one sample of each peak
        _sync(device)
        start = time.perf_counter()
        step(x, y)
        _sync(device)
        step_s.append(time.perf_counter() - start)
        for name in names:
            samples[name].append(peaks[name].sample())
        log(f"    step {i + 1}/{settings.speedrun_steps}: {1000 * step_s[-1]:8.1f} ms, "
            + ", ".join(f"{k} matmul {v[-1]:,.0f} GFLOP/s" for k, v in samples.items()))
    median_s = _median(step_s)
    step_flops = TRAIN_STEP_FORWARDS * fwd
    achieved = step_flops / median_s / 1e9
    peak = {name: max(v) for name, v in samples.items()}
    result = {
        "model": model, "batch_size": bs, "overrides": model_overrides(model),
        "precision": precision, "memory_format": memory_format, "autotune": decision.record(),
        "threads": torch.get_num_threads(), "device": str(device),
        "forward_flops": fwd, "train_flops": step_flops, "counted_forward_backward_flops": counted,
        "step_s": step_s, "median_step_s": median_s, "images_per_s": bs / median_s,
        "achieved_gflops": achieved,
        "peak_matmul": {"n": n, "samples_gflops": samples, "gflops": peak},
        "peak_precision": peak_name,
        "fraction_of_peak": achieved / peak[peak_name],
        "fraction_of_bf16_peak": achieved / peak["bf16"], "image_size": size,
    }
    if train and train.get("batch_size") == bs:
        train_size = int(train["cifar_lab"].get("image_size") or size)
        x_train = x if train_size == size else F.interpolate(x, size=(train_size, train_size))
        with_data_path(result, train, TRAIN_STEP_FORWARDS * forward_flops(module, x_train), train_size)
    return result


def with_data_path(speedrun: dict[str, Any], train: dict[str, Any], train_flops: int, image_size: int) -> None:
    """Adds the GFLOP/s of the whole training step (data path included) from the training
    measurement of the same model, batch size and autotuned variant: ``train_flops`` a step at the
    ``image_size`` its batches had."""
    gflops = train_flops / speedrun["batch_size"] * train["cifar_lab"]["median"] / 1e9
    peak = speedrun["peak_matmul"]["gflops"]
    speedrun["with_data_path"] = {"images_per_s": train["cifar_lab"]["median"], "achieved_gflops": gflops,
                                  "image_size": image_size, "train_flops": train_flops,
                                  "fraction_of_peak": gflops / peak[speedrun["peak_precision"]],
                                  "fraction_of_bf16_peak": gflops / peak["bf16"]}
