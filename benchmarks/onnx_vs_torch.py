"""Images/s of an exported ONNX model under onnxruntime vs the same network in PyTorch, on the CPU.

Both take uint8 images (N, 3, H, W) and include the normalisation and the softmax (the PyTorch
side is :class:`cifar_lab.deploy.exported.Deployable` around the checkpoint's network, eval mode,
``inference_mode``). Each batch size is timed --repeats times after --warmup batches and the
median is reported, with both runtimes held to --threads intra-op threads.

    python -m cifar_lab.export ckpt_path=<run dir> format=onnx output=model.onnx
    python benchmarks/onnx_vs_torch.py --ckpt <run dir> --onnx model.onnx --batch-sizes 1 64 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from cifar_lab.cli.export import load_trained
from cifar_lab.deploy.exported import ExportedModel


def images_per_second(run: Callable[[torch.Tensor], object], batch: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="the training run directory or .ckpt the ONNX file came from")
    parser.add_argument("--onnx", required=True, help="the exported model.onnx")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    trained = load_trained(args.ckpt)
    exported = ExportedModel(args.onnx, "onnx", threads=args.threads)
    size = trained.image_size

    def torch_run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return trained.model(x)

    print(f"CPU inference, {args.threads} threads, {size}x{size} uint8 images in, probabilities out")
    print("| batch | PyTorch img/s | onnxruntime img/s | ratio |")
    print("|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for batch_size in args.batch_sizes:
        batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g)
        pt = images_per_second(torch_run, batch, args.warmup, args.repeats)
        ort = images_per_second(exported.probs, batch, args.warmup, args.repeats)
        print(f"| {batch_size} | {pt:,.0f} | {ort:,.0f} | {ort / pt:.2f}x |")


if __name__ == "__main__":
    main()
