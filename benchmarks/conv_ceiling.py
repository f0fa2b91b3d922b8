"""The ceiling of the speedrun step's efficiency: each convolution of ``speedrun_net`` timed alone
(forward, and forward + backward with the input and weight gradients), bf16 channels_last, at
the speedrun's batch, against the bf16 matrix-multiply peak measured in the same run.

The bench's speedrun figure (``python -m cifar_lab.bench --models speedrun_net --speedrun``)
holds the whole training step's FLOPs against that peak; the step can reach at most what its
convolutions reach on their own, since they carry all of its counted FLOPs and the rest
(BatchNorm, GELU, pooling, the optimizer) adds time and no counted FLOPs.

    python benchmarks/conv_ceiling.py                 # batch 1024, 32 px
    python benchmarks/conv_ceiling.py --batch-size 512 --size 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cifar_lab.models.speedrun_net import SpeedrunNet
from cifar_lab.tools.bench.efficiency import matmul_peak


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: oneDNN primitive creation, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def conv_inputs(net: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, torch.Size]]:
    """Every Conv2d of ``net`` with the input shape it sees on ``x``."""
    seen: list[tuple[nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0].shape)))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak(torch.bfloat16)
    print(f"bf16 matmul peak (2048 x 2048): {peak:,.0f} GFLOP/s; threads {torch.get_num_threads()}")
    layout = torch.channels_last
    net = SpeedrunNet().to(torch.bfloat16, memory_format=layout)
    x = torch.randn(args.batch_size, 3, args.size, args.size).to(torch.bfloat16, memory_format=layout)
    total_flops, total_ms = 0.0, 0.0
    for conv, shape in conv_inputs(net, x):
        # a frozen layer on the images (the whitening stem) computes no gradient at all, yet the
        # bench counts it as 3 forwards like every layer: so it is timed here as it runs, forward only
        trained = conv.weight.requires_grad
        inp = torch.randn(shape).to(torch.bfloat16, memory_format=layout).requires_grad_(trained)
        out = conv(inp)
        grad = torch.randn_like(out)
        flops = 2 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        fwd = _median_ms(lambda: conv(inp), args.repeats)
        both = (_median_ms(lambda: torch.autograd.grad(conv(inp), (inp, conv.weight), grad), args.repeats)
                if trained else fwd)
        total_flops += 3 * flops
        total_ms += both
        print(f"conv {conv.in_channels:>3}->{conv.out_channels:<3} k{conv.kernel_size[0]} on {shape[-1]:>2} px: "
              f"forward {flops / fwd / 1e6:6,.0f} GFLOP/s ({flops / fwd / 1e6 / peak:.2f} of peak), "
              f"forward + backward {3 * flops / both / 1e6:6,.0f} ({3 * flops / both / 1e6 / peak:.2f})")
    achieved = total_flops / total_ms / 1e6
    print(f"all convolutions, forward + backward: {total_ms:.0f} ms, {achieved:,.0f} GFLOP/s = "
          f"{achieved / peak:.2f} of the bf16 peak (the step's ceiling)")


if __name__ == "__main__":
    main()
