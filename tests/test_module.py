"""The training module owns how the network runs: memory format and compilation, in one place."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cifar_lab.checkpoints import check_resume_compatible
from cifar_lab.errors import CheckpointError
from cifar_lab.models.simple_cnn import SimpleCNN
from cifar_lab.module import ClassifierModule
from conftest import SYNTH, compose_cfg


def _module(**kwargs) -> ClassifierModule:
    net = SimpleCNN(num_classes=10, filters=[8, 16], kernel_sizes=[3, 3], fc_units=32)
    return ClassifierModule(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs)


def test_compiled_module_holds_each_parameter_once() -> None:
    plain, compiled = _module(), _module(compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    weights = [k for k in compiled.state_dict() if k.startswith("net.")]
    assert weights and len(weights) == len(compiled.net.state_dict())
    assert len({id(p) for p in compiled.parameters()}) == len(list(compiled.parameters()))


@pytest.mark.parametrize("memory_format,layout", [("channels_last", torch.channels_last),
                                                  ("contiguous", torch.contiguous_format)])
def test_memory_format_applies_to_network_and_input(memory_format: str, layout: torch.memory_format) -> None:
    module = _module(memory_format=memory_format)
    conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=layout)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_memory_format_is_refused() -> None:
    with pytest.raises(ValueError, match="module.memory_format must be auto or one of"):
        _module(memory_format="nhwc")


def test_resume_allowed_when_only_runtime_options_change(tmp_path: Path) -> None:
    base = [*SYNTH, "model=simple_cnn"]
    saved = OmegaConf.to_container(compose_cfg(base, tmp_path), resolve=True)
    changed = compose_cfg([*base, "module.compile=true", "module.compile_mode=reduce-overhead",
                           "module.memory_format=contiguous"], tmp_path)
    assert check_resume_compatible(saved, changed, "run.ckpt") == []  # no refusal, no warning
    # a checkpoint from before these were module options (runtime keys inside the model config)
    saved["model"].update(channels_last=True, compile=False)
    assert check_resume_compatible(saved, changed, "run.ckpt") == []
    other = compose_cfg([*base, "model.fc_units=64"], tmp_path)
    with pytest.raises(CheckpointError, match="model.fc_units: 512 in the checkpoint, 64 now"):
        check_resume_compatible(saved, other, "run.ckpt")
