"""Patch-whitening initialisation of a first convolution from data.

A ``k x k`` convolution on ``C`` input channels sees patches of ``d = C * k * k`` values.
Given the covariance ``S = V diag(lam) V^T`` of those patches over training images, the
filters ``W = diag(1 / sqrt(lam + eps)) V^T`` map a patch ``p`` to ``W (p - mean)``, whose
covariance is ``diag(lam / (lam + eps))``: identity up to the ``eps`` damping of the
weakest directions. The layer thus starts with decorrelated, unit-variance features
(edges, colour opponents, ...) that the rest of the network does not have to learn.

With ``symmetric=True`` each filter comes with its negation (``2 d`` filters), so a
following ReLU/GELU keeps both signs of every direction.

Usable with any network whose first layer is a ``nn.Conv2d`` without padding issues: see
:class:`cifar_lab.callbacks.whitening.WhiteningInit` to initialise it at fit start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["extract_patches", "patch_covariance", "patch_whitening_weights", "init_whitening_"]


def extract_patches(images: Tensor, kernel_size: int) -> Tensor:
    """All ``k x k`` patches (stride 1, no padding) of ``(N, C, H, W)`` images as rows ``(M, C*k*k)``.

    The column order is that of a conv weight ``(C, k, k)`` flattened, so a filter row ``w``
    gives the convolution output ``w @ patch``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    k = int(kernel_size)
    n, c, h, w = images.shape
    if k < 1 or k > min(h, w):
        raise ValueError(f"kernel_size {k} does not fit images of size {h}x{w}")
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


def patch_covariance(images: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """Mean ``(d,)`` and covariance ``(d, d)`` of the ``k x k`` patches, in float64."""
    patches = extract_patches(images, kernel_size).to(torch.float64)
    mean = patches.mean(dim=0)
    centred = patches - mean
    cov = centred.T @ centred / max(1, len(patches) - 1)
    return mean, cov


def patch_whitening_weights(images: Tensor, kernel_size: int = 2, eps: float = 5e-4,
                            symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """Whitening filters and biases for ``images`` (float, already normalised as the network sees them).

    Returns ``(weight, bias)``: ``weight`` is ``(d or 2d, C, k, k)`` with the filters ordered
    from the strongest patch direction (largest eigenvalue) to the weakest; ``bias`` centres
    the output (``-W @ mean``). ``eps`` damps directions with little variance (noise).
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    c = images.shape[1]
    mean, cov = patch_covariance(images, kernel_size)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    filters = eigvecs.T / (eigvals.clamp_min(0) + eps).sqrt().unsqueeze(1)  # (d, d)
    bias = -(filters @ mean)
    if symmetric:
        filters = torch.cat([filters, -filters])
        bias = torch.cat([bias, -bias])
    weight = filters.reshape(-1, c, kernel_size, kernel_size)
    return weight.to(images.dtype), bias.to(images.dtype)


@torch.no_grad()
def init_whitening_(conv: nn.Conv2d, images: Tensor, eps: float = 5e-4, symmetric: bool = True,
                    set_bias: bool = True) -> nn.Conv2d:
    """Set ``conv``'s weight (and bias) to the patch-whitening filters of ``images``.

    ``conv`` must have a square kernel, stride-1 patches of the input, and as many output
    channels as filters (``C*k*k``, or twice that with ``symmetric``).
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"whitening needs a nn.Conv2d, got {type(conv).__name__}")
    kh, kw = conv.kernel_size
    if kh != kw:
        raise ValueError(f"whitening needs a square kernel, got {conv.kernel_size}")
    if conv.groups != 1 or conv.in_channels != images.shape[1]:
        raise ValueError(f"conv sees {conv.in_channels} channels (groups={conv.groups}); images have {images.shape[1]}")
    weight, bias = patch_whitening_weights(images.float(), kh, eps, symmetric)
    if weight.shape[0] != conv.out_channels:
        raise ValueError(
            f"whitening gives {weight.shape[0]} filters for a {kh}x{kw} kernel on {conv.in_channels} channels "
            f"(symmetric={symmetric}); the conv has {conv.out_channels} output channels"
        )
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if set_bias and conv.bias is not None:
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return conv
