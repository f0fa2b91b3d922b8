"""Images/s of the batched augmentation path vs the per-image torchvision path.

Batched: index gather from an in-memory uint8 (N, 3, 32, 32) tensor
(``index_select``, or ``images[idx]`` with --gather index), then
``BatchAugment({crop(32, pad 4), flip(0.5)}, mean, std)`` -> normalised float32, in the
main process on one device (CPU unless --device says otherwise).

Per-image: the usual CIFAR pipeline, a Dataset returning PIL images through
``transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
Normalize])`` in a DataLoader with --workers worker processes (default 2).

    python benchmarks/augment_speed.py --batch-sizes 128 512
    python benchmarks/augment_speed.py --kornia   # also kornia.augmentation for reference

Numbers depend on what else runs on the machine: every path is timed --repeats times
and the best run is reported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

from cifar_lab.data.augment import BatchAugment, HorizontalFlip, RandomCrop

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


class PILDataset(Dataset):
    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = images_hwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(PIL.Image.fromarray(self.images[i])), int(self.labels[i])


def bench_batched(data: torch.Tensor, batch_size: int, num_images: int, device: torch.device,
                  repeats: int, gather: str = "index_select") -> float:
    aug = BatchAugment({"crop": RandomCrop(32, 4), "flip": HorizontalFlip(0.5)}, MEAN, STD)
    data = data.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = data.shape[0]
    steps = max(1, num_images // batch_size)

    def run(k: int) -> None:
        perm = torch.randperm(n, device=device, generator=gen)
        for s in range(k):
            start = (s * batch_size) % (n - batch_size + 1)
            idx = perm[start:start + batch_size]
            x = data.index_select(0, idx) if gather == "index_select" else data[idx]
            out = aug(x, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    run(5)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        run(steps)
        best = max(best, steps * batch_size / (time.perf_counter() - t))
    return best


def bench_kornia(data: torch.Tensor, batch_size: int, num_images: int, repeats: int) -> float:
    import kornia.augmentation as K

    aug = torch.nn.Sequential(
        K.RandomCrop((32, 32), padding=4),
        K.RandomHorizontalFlip(),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    )
    n = data.shape[0]
    steps = max(1, num_images // batch_size)
    best = 0.0
    for r in range(repeats + 1):
        perm = torch.randperm(n)
        t = time.perf_counter()
        for s in range(steps):
            start = (s * batch_size) % (n - batch_size + 1)
            aug(data[perm[start:start + batch_size]].float().div_(255))
        if r:  # first round is warm-up
            best = max(best, steps * batch_size / (time.perf_counter() - t))
    return best


def bench_per_image(data: torch.Tensor, batch_size: int, num_images: int, workers: int, repeats: int) -> float:
    from torchvision import transforms as T

    transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    ds = PILDataset(data.permute(0, 2, 3, 1).contiguous().numpy(), np.zeros(len(data), dtype=np.int64), transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    steps = max(1, num_images // batch_size)
    best = 0.0
    it = iter(loader)
    for _ in range(min(4, len(loader) - 1)):  # warm-up: workers started, prefetch filled
        next(it)
    for _ in range(repeats):
        t = time.perf_counter()
        done = 0
        while done < steps:
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                continue
            done += 1
        best = max(best, steps * batch_size / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--num-samples", type=int, default=50_000, help="size of the uint8 training tensor")
    ap.add_argument("--images", type=int, default=51_200, help="images timed per batched run")
    ap.add_argument("--per-image-images", type=int, default=10_240, help="images timed per per-image run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gather", choices=["index_select", "index"], default="index_select",
                    help="how the batch is gathered from the uint8 tensor")
    ap.add_argument("--kornia", action="store_true", help="also time kornia.augmentation (CPU)")
    ap.add_argument("--skip-per-image", action="store_true")
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (args.num_samples, 3, 32, 32), dtype=torch.uint8, generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"data {tuple(data.shape)} uint8, gather {args.gather}; crop(32, pad 4) + flip + normalize")
    for bs in args.batch_sizes:
        batched = bench_batched(data, bs, args.images, device, args.repeats, args.gather)
        line = f"batch {bs:5d}: batched {batched:10,.0f} img/s"
        if args.kornia:
            line += f" | kornia {bench_kornia(data, bs, args.images // 4, args.repeats):9,.0f} img/s"
        if not args.skip_per_image:
            per_image = bench_per_image(data, bs, args.per_image_images, args.workers, args.repeats)
            line += (f" | per-image PIL, {args.workers} workers {per_image:8,.0f} img/s"
                     f" | speed-up x{batched / per_image:.1f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
