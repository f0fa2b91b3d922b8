"""Common corruptions in the style of CIFAR-10-C, generated on the fly as batched tensor ops.

``corrupt(images, name, severity, seed)`` takes and returns ``uint8`` images ``(N, 3, H, W)``
on any device; severities run from 1 (mild) to 5 (strong) and the result is deterministic for
a given seed. The severity parameters follow Hendrycks & Dietterich's CIFAR-10-C script where
a tensor op can reproduce the corruption (noise, brightness, contrast, JPEG quality,
pixelation; the last rescales bilinearly); blur and haze are tensor versions of theirs (an anti-aliased disk, a line kernel
at a random angle per image, a multi-octave random haze). JPEG compresses each image with
torchvision on the CPU; everything else runs on the images' device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

from cifar_lab.errors import ConfigError

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "check_corruptions"]

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[Tensor, float, torch.Generator], Tensor]  # float [0, 1] images -> float images


def _gaussian_noise(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    return x + sigma * torch.randn(x.shape, generator=g, device=x.device)


def _shot_noise(x: Tensor, photons: float, g: torch.Generator) -> Tensor:
    return torch.poisson(x * photons, generator=g) / photons


def _impulse_noise(x: Tensor, amount: float, g: torch.Generator) -> Tensor:
    """Salt and pepper: a fraction ``amount`` of the values set to 0 or 1."""
    hit = torch.rand(x.shape, generator=g, device=x.device) < amount
    salt = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _filter(x: Tensor, kernels: Tensor) -> Tensor:
    """Each image filtered by its own ``(k, k)`` kernel (``kernels``: ``(N, k, k)`` or one ``(k, k)``)."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    kernels = kernels.expand(n, k, k) if kernels.ndim == 2 else kernels
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (n * c, 1, k, k)
    padded = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def _grid(radius: int, device: torch.device) -> tuple[Tensor, Tensor]:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    return torch.meshgrid(r, r, indexing="ij")


def _defocus_blur(x: Tensor, radius: float, g: torch.Generator) -> Tensor:
    """An anti-aliased disk of ``radius`` pixels."""
    yy, xx = _grid(math.ceil(radius), x.device)
    disk = (radius + 0.5 - (xx ** 2 + yy ** 2).sqrt()).clamp(0, 1)
    return _filter(x, disk / disk.sum())


def _motion_blur(x: Tensor, length: float, g: torch.Generator) -> Tensor:
    """A line of ``length`` pixels at a random angle per image."""
    half = length / 2
    yy, xx = _grid(math.ceil(half), x.device)
    angle = torch.rand(len(x), generator=g, device=x.device) * math.pi
    ux, uy = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    along = (xx * ux + yy * uy).clamp(-half, half)  # distance to the segment through the centre
    dist = ((xx - along * ux) ** 2 + (yy - along * uy) ** 2).sqrt()
    kernels = (1 - dist).clamp(min=0)
    return _filter(x, kernels / kernels.sum(dim=(1, 2), keepdim=True))


def _brightness(x: Tensor, shift: float, g: torch.Generator) -> Tensor:
    return x + shift


def _contrast(x: Tensor, factor: float, g: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _haze(x: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Fog: random haze summed over octaves (coarse ones strongest) added, then rescaled as CIFAR-10-C does."""
    n, _, h, w = x.shape
    haze = torch.zeros(n, 1, h, w, device=x.device)
    for octave in range(1, int(math.log2(max(h, w))) + 1):
        size = 2 ** octave
        noise = torch.rand(n, 1, size, size, generator=g, device=x.device)
        haze += F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False) / 1.75 ** octave
    low = haze.amin(dim=(2, 3), keepdim=True)
    high = haze.amax(dim=(2, 3), keepdim=True)
    haze = (haze - low) / (high - low).clamp(min=1e-6)
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * haze) * top / (top + strength)


def _pixelate(x: Tensor, scale: float, g: torch.Generator) -> Tensor:
    """Resolution loss: down to ``scale`` times the size and back up (bilinear; nearest-neighbour upscaling
    misaligns the pixel grid, which makes a milder scale look worse than a stronger one at 32 pixels)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def _jpeg(x: Tensor, quality: float, g: torch.Generator) -> Tensor:
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    decoded = decode_jpeg(encode_jpeg(list(images), quality=int(quality)))
    return torch.stack(decoded).to(x.device, torch.float32) / 255


# name -> (corruption, its parameter at severities 1..5)
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (_defocus_blur, (0.75, 1.0, 1.25, 1.5, 2.0)),
    "motion_blur": (_motion_blur, (2.0, 3.0, 4.0, 5.0, 6.0)),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "fog": (_haze, (0.2, 0.5, 0.75, 1.0, 1.5)),
    "jpeg_compression": (_jpeg, (80, 65, 58, 50, 40)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
}


def check_corruptions(names: list[str] | str, severities: list[int]) -> tuple[list[str], list[int]]:
    """The corruption names (``all`` for every one) and severities, checked; a ConfigError names the bad one."""
    chosen = list(CORRUPTIONS) if names in ("all", None) else list(names)
    unknown = [n for n in chosen if n not in CORRUPTIONS]
    if unknown or not chosen:
        raise ConfigError(f"corruption.names: unknown {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(CORRUPTIONS)} (or all)")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ConfigError(f"corruption.severities must lie in 1-5, got {list(severities)}")
    return chosen, [int(s) for s in severities]


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` (uint8 ``(N, 3, H, W)``) under corruption ``name`` at ``severity`` 1-5, as uint8."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    check_corruptions([name], [severity])
    fn, params = CORRUPTIONS[name]
    g = torch.Generator(device=images.device)
    g.manual_seed(seed * 1_000_003 + list(CORRUPTIONS).index(name) * 10 + severity)
    out = fn(images.float() / 255, float(params[severity - 1]), g)
    return (out * 255).round_().clamp_(0, 255).to(torch.uint8)
