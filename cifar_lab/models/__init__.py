"""Networks of the model zoo: plain ``nn.Module``s mapping ``(B, 3, H, W)`` images to logits.

Each has a config in ``conf/model/`` holding its constructor arguments only, so
``hydra.utils.instantiate(cfg.model)`` returns the network. How it runs (memory format,
``torch.compile``) is the training module's business (``module.memory_format``,
``module.compile``), not the network's.
"""
