"""Building blocks shared by several networks of the zoo.

The central piece is :class:`BranchMixBlock`, the input-conditioned mixture of
parallel convolutions used (with different settings) by the pseudo-SE net,
the conv-block net and the attention net; the three also share their classifier,
:class:`PooledMLPHead`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "make_activation",
    "StackedConv2d",
    "BranchMixBlock",
    "ResidualPair",
    "PooledMLPHead",
    "SqueezeExcite",
    "drop_path",
    "DropPath",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def make_activation(name: str | None) -> nn.Module:
    """Return the activation module called ``name`` (``None``/"identity" -> Identity)."""
    if name is None or name == "identity":
        return nn.Identity()
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)} or None") from None


class StackedConv2d(nn.Conv2d):
    """``branches`` independent convolutions over the same input, stored as one conv.

    Output channels ``[k * out_per_branch, (k + 1) * out_per_branch)`` belong to
    branch ``k``. Weight initialisers that depend on fan-out (see
    :mod:`cifar_lab.models.init`) treat each branch slice as its own layer.
    """

    def __init__(self, in_channels: int, out_per_branch: int, branches: int, **conv_kwargs) -> None:
        super().__init__(in_channels, out_per_branch * branches, **conv_kwargs)
        self.branches = branches
        self.out_per_branch = out_per_branch

    def branch_parameters(self, k: int) -> tuple[Tensor, Tensor | None]:
        """Weight (and bias) of branch ``k`` as views into the stacked tensors."""
        sl = slice(k * self.out_per_branch, (k + 1) * self.out_per_branch)
        return self.weight[sl], (self.bias[sl] if self.bias is not None else None)


_WEIGHTINGS = ("softmax", "sigmoid", "identity", "relu")


class BranchMixBlock(nn.Module):
    """Input-weighted sum of ``branches`` parallel convolutions.

    For an input ``x`` of shape ``(B, C_in, H, W)``::

        m       = mean of x over H, W                      -> (B, C_in)
        w       = weighting(Linear(C_in -> K)(m))          -> (B, K)
        branch_k(x) = branch_act(branch_norm(conv_k(x)))   -> (B, C_out, H', W')
        y       = sum_k w[:, k] * branch_k(x) + residual(x)
        out     = out_act(out_norm(y))

    All K convolutions are computed as a single convolution with ``K * C_out``
    output channels; BatchNorm and activations are per-channel, so applying
    them to the stacked tensor is exactly the per-branch computation. The
    weighted reduction over K is one batched contraction.

    Args:
        in_channels, out_channels: channel counts.
        branches: K, the number of parallel convolutions.
        kernel_size, stride, padding: shared by all branches (padding defaults
            to ``kernel_size // 2``).
        weighting: activation applied to the linear layer's K outputs:
            "softmax" (weights sum to 1), "sigmoid", "relu" or "identity".
        branch_norm: BatchNorm after each branch conv.
        branch_act: activation after each branch (after its BatchNorm), or None.
        residual: None (no residual), "identity" (add x; shapes must match),
            "conv" (conv of x with the branches' kernel/stride unless
            ``residual_kernel_size`` is given, then BatchNorm and ReLU),
            or "auto" (identity when shapes match, else 1x1 conv + BatchNorm).
        out_norm: BatchNorm on the block output (after the residual add).
        out_act: activation on the block output, or None.
        bias: conv bias; defaults to ``not branch_norm``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        branches: int = 2,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        weighting: str = "softmax",
        branch_norm: bool = False,
        branch_act: str | None = None,
        residual: str | None = None,
        residual_kernel_size: int | None = None,
        out_norm: bool = False,
        out_act: str | None = None,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        if branches < 1:
            raise ValueError("branches must be >= 1")
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        if padding is None:
            padding = kernel_size // 2
        if bias is None:
            bias = not branch_norm
        self.in_channels, self.out_channels, self.branches = in_channels, out_channels, branches
        self.weighting = weighting

        self.gate = nn.Linear(in_channels, branches)
        self.conv = StackedConv2d(
            in_channels, out_channels, branches,
            kernel_size=kernel_size, stride=stride, padding=padding, bias=bias,
        )
        self.branch_norm = nn.BatchNorm2d(out_channels * branches) if branch_norm else nn.Identity()
        self.branch_act = make_activation(branch_act)

        same_shape = in_channels == out_channels and stride == 1
        if residual == "auto":
            residual = "identity" if same_shape else "projection"
        if residual is None:
            self.residual = None
        elif residual == "identity":
            if not same_shape:
                raise ValueError("identity residual needs in_channels == out_channels and stride 1")
            self.residual = nn.Identity()
        elif residual == "conv":
            rk = kernel_size if residual_kernel_size is None else residual_kernel_size
            rp = padding if residual_kernel_size is None else rk // 2
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, rk, stride=stride, padding=rp, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
        elif residual == "projection":
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"residual must be None, 'identity', 'conv' or 'auto', got {residual!r}")

        self.out_norm = nn.BatchNorm2d(out_channels) if out_norm else nn.Identity()
        self.out_act = make_activation(out_act)

    def branch_weights(self, x: Tensor) -> Tensor:
        """The (B, K) mixing weights computed from the block input."""
        logits = self.gate(x.mean(dim=(2, 3)))
        if self.weighting == "softmax":
            return logits.softmax(dim=1)
        if self.weighting == "sigmoid":
            return logits.sigmoid()
        if self.weighting == "relu":
            return F.relu(logits)
        return logits

    def branch_outputs(self, x: Tensor) -> Tensor:
        """All branch outputs stacked as (B, K, C_out, H', W')."""
        y = self.branch_act(self.branch_norm(self.conv(x)))
        return y.unflatten(1, (self.branches, self.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        w = self.branch_weights(x)
        y = torch.einsum("bk,bkchw->bchw", w.to(x.dtype), self.branch_outputs(x))
        if self.residual is not None:
            y = y + self.residual(x)
        return self.out_act(self.out_norm(y))

    def extra_repr(self) -> str:
        return f"branches={self.branches}, weighting={self.weighting!r}"


class ResidualPair(nn.Module):
    """Two blocks in sequence with a skip from the first one's input to the second one's output.

    The skip is the identity when channel count and resolution are unchanged,
    otherwise a 1x1 convolution (with the combined stride of the two blocks).
    """

    def __init__(self, first: nn.Module, second: nn.Module, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.first, self.second = first, second
        if in_channels == out_channels and stride == 1:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x)) + self.skip(x)


class PooledMLPHead(nn.Sequential):
    """Classifier head: global average pool, then a two-layer MLP on the pooled features.

    ``AdaptiveAvgPool2d(1) -> Flatten -> Linear(in -> hidden) -> activation
    -> [Dropout(dropout)] -> Linear(hidden -> num_classes)``

    ``dropout=None`` leaves the dropout layer out altogether (``dropout=0.0`` keeps
    a no-op one). It is an ``nn.Sequential``, so its parameters are named by
    position (``2.weight``, then ``4.weight`` or, with a dropout layer,
    ``5.weight``) exactly like the plain ``nn.Sequential`` heads the networks
    were first written with, and their checkpoints still load.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_classes: int,
        dropout: float | None = None,
        act: str = "relu",
    ) -> None:
        layers: list[nn.Module] = [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            make_activation(act),
        ]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, num_classes))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x * gate(x), gate = sigmoid(fc2(act(fc1(avgpool(x))))).

    The two fully connected layers are 1x1 convolutions with bias.
    """

    def __init__(self, channels: int, squeeze_channels: int, act: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = make_activation(act)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability p, rescale the rest by 1/(1-p)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
