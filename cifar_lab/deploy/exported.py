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
import re
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


def _runtime_message(err: BaseException) -> str:
    """The part of a runtime's error a user can read: its status message, without source paths and symbols."""
    text = " ".join(str(err).split()).split("Status Message:")[-1]
    text = re.sub(r"\S*::\S*\([^)]*\)", " ", text)  # C++ signatures
    words = [w for w in text.split() if not w.startswith("/") and "::" not in w and w != "void*"]
    return " ".join(words)[:200] or type(err).__name__


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
            options.log_severity_level = 4  # its failures become one message here, not log lines of its own
            if threads:
                options.intra_op_num_threads = int(threads)
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 - onnxruntime's own errors for a broken file
                raise InputError(f"{self.path} is not a readable ONNX model ({' '.join(str(err).split())[:300]})"
                                 ) from None
            self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
            self._check_signature()
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

    def _check_signature(self) -> None:
        """An ONNX model must take ``images`` and give a rank-2 ``probs``: refused in one line before it runs."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        problem = None
        if INPUT_NAME not in inputs or len(inputs) != 1:
            problem = f"its inputs are {sorted(inputs)}, not the one input {INPUT_NAME!r}"
        elif OUTPUT_NAME not in outputs:
            problem = f"it has no {OUTPUT_NAME!r} output (its outputs: {sorted(outputs)})"
        elif isinstance(outputs[OUTPUT_NAME].shape, (list, tuple)) and len(outputs[OUTPUT_NAME].shape) != 2:
            problem = f"its {OUTPUT_NAME!r} output has rank {len(outputs[OUTPUT_NAME].shape)}, not 2 (images, classes)"
        if problem:
            raise InputError(f"{self.path} is not a cifar-lab classifier: {problem}; export the model again with "
                             "python -m cifar_lab.export")

    def probs(self, images: Tensor) -> Tensor:
        """Softmax probabilities ``(N, classes)`` of one ``uint8 (N, 3, H, W)`` batch, on the CPU.

        A model that fails while running (an allocation it cannot make, an operator error) or answers with
        anything but one finite row per image and class is refused in one line (:class:`InputError`).
        """
        images = images.detach().cpu().contiguous()
        try:
            if self.format == "onnx":
                out = torch.from_numpy(np.asarray(self._session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]))
            else:
                with torch.inference_mode():
                    out = self._module(images)
        except MemoryError:
            raise InputError(f"{self.path}: running the model needs more memory than this machine has; it is not "
                             "a cifar-lab export (export the model again with python -m cifar_lab.export)") from None
        except Exception as err:  # noqa: BLE001 - the runtime's own errors for a model that cannot run
            text = _runtime_message(err)
            raise InputError(f"{self.path}: the model failed while running ({text}); export the model again with "
                             "python -m cifar_lab.export") from None
        expected = (images.shape[0], len(self.class_names) or None)
        if (not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != expected[0]
                or (expected[1] is not None and out.shape[1] != expected[1]) or not out.is_floating_point()):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"{self.path}: the model answered {shape} for {expected[0]} images, not one row of "
                             f"{expected[1] or 'class'} probabilities per image; export the model again with "
                             "python -m cifar_lab.export")
        return out.float()

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Probabilities of all ``images``, ``batch_size`` at a time."""
        return torch.cat([self.probs(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
