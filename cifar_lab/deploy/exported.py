"""Exported models: the network with its preprocessing folded in, its metadata, and running the files.

An exported model (ONNX or TorchScript) takes one input, ``images``: ``uint8`` RGB images
``(N, 3, H, W)`` (NCHW, values 0-255, any batch size N). It normalises them with the training
run's mean and std inside the graph and returns ``probs``: softmax probabilities
``(N, num_classes)``. The file's metadata (ONNX ``metadata_props``, TorchScript extra file
``metadata.json``) says so, and holds the class names and the normalisation.

This module needs neither Lightning nor Hydra: an exported model runs with onnxruntime
(or ``torch.jit.load``) alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cifar_lab.errors import ConfigError, InputError

__all__ = ["FORMATS", "INPUT_NAME", "OUTPUT_NAME", "Deployable", "make_metadata", "ExportedModel",
           "format_of", "require_onnx"]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "images"
OUTPUT_NAME = "probs"
TORCHSCRIPT_METADATA = "metadata.json"


class Deployable(nn.Module):
    """``uint8`` images ``(N, 3, H, W)`` -> softmax probabilities: the network with its normalisation.

    Computes ``softmax(net(x / 255 * (1 / std) - mean / std))`` in float32, the evaluation
    preprocessing of :class:`cifar_lab.data.augment.normalize.Normalize`.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).float())
        self.register_buffer("shift", (mean_t / std_t).float())

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32) * self.scale - self.shift
        return self.net(x).float().softmax(dim=1)


def make_metadata(class_names: Sequence[str], image_size: int, mean: Sequence[float], std: Sequence[float],
                  **extra: Any) -> dict[str, str]:
    """String-valued metadata describing the input, the output and the classes."""
    meta = {
        "producer": "cifar-lab",
        "input_name": INPUT_NAME,
        "input_dtype": "uint8",
        "input_layout": "NCHW",
        "input_shape": json.dumps(["N", 3, int(image_size), int(image_size)]),
        "input": f"uint8 RGB images (N, 3, {image_size}, {image_size}), values 0-255; normalised inside the model",
        "output_name": OUTPUT_NAME,
        "output": f"softmax probabilities (N, {len(class_names)})",
        "class_names": json.dumps([str(n) for n in class_names]),
        "image_size": str(int(image_size)),
        "mean": json.dumps([float(m) for m in mean]),
        "std": json.dumps([float(s) for s in std]),
    }
    meta.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()})
    return meta


def require_onnx() -> None:
    """One config message when the optional ONNX packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"ONNX export and inference need the onnx and onnxruntime packages ({err}); "
                          'install them with pip install -e ".[export]"') from None


def format_of(path: str | Path) -> str:
    """``onnx`` or ``torchscript`` from a file name's suffix."""
    suffix = Path(str(path)).suffix.lower()
    for name, ext in FORMATS.items():
        if suffix == ext:
            return name
    raise InputError(f"{path}: an exported model must end in {' or '.join(FORMATS.values())}")


class ExportedModel:
    """An exported file ready to run: :meth:`probs` of ``uint8`` NCHW batches, and its metadata."""

    def __init__(self, path: str | Path, format: str | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        self.format = format or format_of(self.path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such exported model file")
        if self.format == "onnx":
            require_onnx()
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 - onnxruntime's own errors for a broken file
                raise InputError(f"{self.path} is not a readable ONNX model ({' '.join(str(err).split())[:300]})"
                                 ) from None
            self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        else:
            files = {TORCHSCRIPT_METADATA: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                    self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=files).eval()
            except Exception as err:  # noqa: BLE001 - not a TorchScript archive
                raise InputError(f"{self.path} is not a readable TorchScript model ({type(err).__name__})") from None
            try:
                self.metadata = json.loads(files[TORCHSCRIPT_METADATA] or "{}")
            except ValueError:
                self.metadata = None
        if not isinstance(self.metadata, dict) or self.metadata.get("producer") != "cifar-lab":
            raise InputError(f"{self.path} was not exported by cifar-lab (no cifar-lab metadata); export it with "
                             "python -m cifar_lab.export")
        self.class_names, self.image_size = self._checked_metadata()

    def _checked_metadata(self) -> tuple[list[str], int]:
        """The class names and image size the metadata states, refused in one line when malformed."""
        try:
            names = json.loads(self.metadata.get("class_names", "[]"))
            size = int(self.metadata.get("image_size", 32))
            if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
                raise ValueError("class_names is not a list of names")
            if not 1 <= size <= 4096:
                raise ValueError(f"image_size {size} is out of range")
        except (ValueError, TypeError) as err:
            raise InputError(f"{self.path}: its cifar-lab metadata is malformed ({err}); export the model again "
                             "with python -m cifar_lab.export") from None
        return [str(n) for n in names], size

    def probs(self, images: Tensor) -> Tensor:
        """Softmax probabilities ``(N, classes)`` of one ``uint8 (N, 3, H, W)`` batch, on the CPU."""
        images = images.detach().cpu().contiguous()
        if self.format == "onnx":
            out = self._session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
            return torch.from_numpy(np.asarray(out))
        with torch.inference_mode():
            return self._module(images).float()

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Probabilities of all ``images``, ``batch_size`` at a time."""
        return torch.cat([self.probs(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
