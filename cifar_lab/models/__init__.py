"""Networks of the model zoo: plain ``nn.Module``s mapping ``(B, 3, H, W)`` images to logits.

Each has a config in ``conf/model/`` holding its constructor arguments only, so
``hydra.utils.instantiate(cfg.model)`` returns the network. How it runs (memory format,
``torch.compile``) is the training module's business (``module.memory_format``,
``module.compile``), not the network's.
"""

from torch import nn


def trainable_params(net: nn.Module) -> int:
    """The parameter count every report shows (console, metrics.json, model card, compare): trainable
    parameters only (a frozen whitening filter, for example, is not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
