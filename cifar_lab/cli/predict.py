"""Predict classes for unlabelled images with a trained checkpoint; write a CSV.

    python -m cifar_lab.predict ckpt_path=<run dir or .ckpt> input=<images> output=predictions.csv

``input`` is one of

* a folder of image files (png, jpg, bmp, gif, webp, tif; top level only). Files are taken in
  natural order of their names: case-insensitive, with digit runs compared as numbers, so
  ``img2.png`` comes before ``img10.png``; ``0.png .. N-1.png`` get ids equal to their stems;
* a ``.npy`` file holding a uint8 array ``(N, H, W, 3)`` (channels last, as CIFAR's
  python batches reshape to and as PIL/numpy images are), or ``(N, 3, H, W)``;
* a pickle file holding such a numpy array, or a dict with a ``data`` entry in
  the CIFAR python-batch layout (``(N, 3072)`` uint8 rows, red plane then green then blue).

The CSV has the header ``id,label`` and one row per input image; ``id`` is the image's
position in the input (0..N-1) and ``label`` the predicted class name (``label_format=name``)
or index (``label_format=index``). ``include_file=true`` adds a ``file`` column for folders.

Images must have the size the model was trained on, or ``resize=true`` resizes them
(bilinear, antialiased).

``ckpt_path=model.onnx`` runs a model written by ``python -m cifar_lab.export`` with
onnxruntime instead (no Lightning, no training config): the class names and the image size
come from the file's metadata; the CSV is the same. Problems with the input end the program with a one-line message
and exit code 2.
"""

from __future__ import annotations

import csv
import os
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from cifar_lab import checkpoints
from cifar_lab.config.compose import compose_training, hydra_job
from cifar_lab.config.schema import check_tta
from cifar_lab.data.image_folder import IMAGE_SUFFIXES, ImageDecodeError, decode_image_file
from cifar_lab.errors import InputError
from cifar_lab.cli.exits import run_command
from cifar_lab.fileio import RefusedPickle, atomic_output, check_output, load_array_pickle

log = logging.getLogger(__name__)

LABEL_FORMATS = ("name", "index")


# ----------------------------------------------------------------------------- input


def natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: ``a2`` < ``a10``; case-insensitive."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def _decode(path: Path) -> Tensor:
    try:
        return decode_image_file(path)
    except (OSError, ImageDecodeError) as err:  # unreadable, or no decoder knows the format
        raise InputError(f"cannot read image {path}: {err}") from None


def _array_images(array: Any, origin: str) -> Tensor:
    """A uint8 ``(N, 3, H, W)`` tensor from an ``(N, H, W, 3)``/``(N, 3, H, W)``/``(N, 3072)`` array."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise InputError(
            f"{origin} holds a {type(array).__name__}, expected an array of images: uint8 (N, H, W, 3)"
        )
    if array.dtype != np.uint8:
        raise InputError(f"{origin}: images must be uint8 (values 0-255), got dtype {array.dtype}")
    shape = tuple(array.shape)
    if array.ndim == 2 and shape[1] == 3 * 32 * 32:
        array = array.reshape(-1, 3, 32, 32)  # CIFAR python-batch rows
    elif array.ndim == 4 and shape[-1] == 3:
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim == 4 and shape[1] == 3:
        pass
    else:
        hint = " (one image? add a leading axis: x[None])" if array.ndim == 3 else ""
        raise InputError(
            f"{origin}: expected images of shape (N, H, W, 3), (N, 3, H, W) or (N, 3072), got {shape}{hint}"
        )
    if array.shape[0] == 0:
        raise InputError(f"{origin} holds no images (shape {shape})")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_input(path: str | Path) -> tuple[Tensor | list[Tensor], list[str] | None]:
    """The images (one tensor, or a list for folders whose images differ in size) and file names."""
    path = Path(str(path)).expanduser()
    if str(path) in ("", "???"):
        raise InputError("input is required: input=<folder of images | .npy file | pickle file>")
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise InputError(
                f"input folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        images = [_decode(p) for p in files]
        return images, [p.name for p in files]
    if not path.is_file():
        raise InputError(f"input={path}: no such file or folder")
    if path.stat().st_size == 0:
        raise InputError(f"input file {path} is empty")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{path} is not a readable .npy array file ({type(err).__name__}: {err})") from err
        return _array_images(array, str(path)), None
    try:
        obj = load_array_pickle(path.read_bytes())
    except RefusedPickle as err:
        raise InputError(
            f"{path}: {err}; a pickle input may hold only a uint8 image array (or a CIFAR-style dict of one), "
            "never other objects: save the images with numpy.save as a .npy file instead"
        ) from None
    except Exception as err:  # noqa: BLE001 - anything that fails to unpickle is "not a pickle"
        raise InputError(
            f"{path} is not a pickle file ({type(err).__name__}); input must be a folder of images, "
            "a .npy file or a pickle of a uint8 (N, H, W, 3) array"
        ) from None
    if isinstance(obj, dict):
        data = obj.get("data", obj.get(b"data"))
        if data is None:
            raise InputError(f"{path} holds a dict without a 'data' entry; expected an array of images")
        obj = data
    return _array_images(obj, str(path)), None


def fit_size(images: Tensor | list[Tensor], size: int, resize: bool,
             names: Sequence[str] | None = None) -> Tensor:
    """One uint8 ``(N, 3, size, size)`` tensor: resized when allowed, else an error naming the size."""
    items = list(images) if isinstance(images, list) else [images]
    out = []
    for i, x in enumerate(items):
        batch = x if x.ndim == 4 else x.unsqueeze(0)
        h, w = batch.shape[-2:]
        if (h, w) != (size, size):
            if not resize:
                where = f"image {names[i]} is" if names else "the input images are"
                raise InputError(
                    f"{where} {w}x{h} pixels but the model takes {size}x{size}; "
                    "pass resize=true to resize the images"
                )
            batch = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False).round().clamp(0, 255).to(torch.uint8)
        out.append(batch)
    return torch.cat(out) if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------- prediction


def _device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"device={name}: {err}; use device=auto, cpu or cuda") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device={name}: no such CUDA GPU is visible to this process; use device=cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device={name}: predict runs on cpu or cuda; use device=auto, cpu or cuda")
    return device


def class_names(checkpoint: dict[str, Any], datamodule: Any) -> list[str]:
    """Class names stored in the checkpoint, else from the training data (loads it)."""
    names = checkpoint.get(checkpoints.CLASS_NAMES_KEY)
    if names:
        return [str(n) for n in names]
    try:
        datamodule.setup("predict")
        return [str(n) for n in datamodule.classes]
    except Exception as err:  # noqa: BLE001
        raise InputError(
            f"the class names are not in the checkpoint and the training data could not be loaded to find them "
            f"({type(err).__name__}: {err}); use label_format=index or point data.root at the data"
        ) from err


# A cell starting with one of these is a formula (or becomes one) in Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A text cell a spreadsheet shows as text: one starting with ``= + - @``, a tab or a carriage return gets a
    leading ``'`` (OWASP's CSV-injection guidance), since class names (an exported model's metadata) and file
    names come from outside. The CSV writer quotes what needs quoting."""
    cell = str(cell)
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def predict(
    ckpt_path: str | Path,
    input: str | Path,
    output: str | Path = "predictions.csv",
    label_format: str = "name",
    resize: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    include_file: bool = False,
    tta: dict[str, Any] | None = None,
    data_overrides: dict[str, Any] | None = None,
) -> Path:
    """Predict every image of ``input`` and write ``output``; returns the CSV path."""
    if label_format not in LABEL_FORMATS:
        raise InputError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    check_output(output, (input,), "predictions.csv")
    model_file = ckpt_path if str(ckpt_path).lower().endswith(".onnx") else checkpoints.resolve(ckpt_path, "use")
    check_output(output, (model_file,))
    _device(device)  # a device this machine lacks is refused before any work
    check_tta(tta)
    tta = dict(tta or {})
    if str(ckpt_path).lower().endswith(".onnx"):
        if tta.get("enabled"):
            raise InputError("tta.enabled=true needs the checkpoint; an exported ONNX model predicts without TTA")
        images, files = load_input(input)
        labels, names = _predict_exported(ckpt_path, images, files, resize, batch_size)
    else:
        labels, names, files = _predict_checkpoint(ckpt_path, input, output, label_format, resize, batch_size,
                                                   device, tta, data_overrides)
    if names and max(labels) >= len(names):
        raise InputError(f"the model predicts class {max(labels)} but only {len(names)} class names are known")
    if label_format == "name" and not names:
        raise InputError(f"{ckpt_path} holds no class names; use label_format=index")

    out = Path(output)
    with atomic_output(out) as tmp, open(tmp, "w", newline="") as f:  # a kill leaves the previous file whole
        writer = csv.writer(f)
        writer.writerow(["id", "label", "file"] if include_file and files else ["id", "label"])
        for i, label in enumerate(labels):
            row = [i, spreadsheet_safe(names[label]) if label_format == "name" else label]
            if include_file and files:
                row.append(spreadsheet_safe(files[i]))
            writer.writerow(row)
    print(f"Wrote {len(labels)} predictions to {out}")
    return out


def _predict_exported(path: str | Path, images: Tensor | list[Tensor], files: list[str] | None, resize: bool,
                      batch_size: int) -> tuple[list[int], list[str]]:
    """Labels and class names from an exported ONNX model run with onnxruntime."""
    from cifar_lab.deploy.exported import ExportedModel

    model = ExportedModel(Path(str(path)).expanduser(), "onnx")
    x_all = fit_size(images, model.image_size, resize, files)
    return model.predict(x_all, batch_size).argmax(dim=1).tolist(), model.class_names


def _predict_checkpoint(ckpt_path: str | Path, input: str | Path, output: str | Path, label_format: str,
                        resize: bool, batch_size: int, device: str, tta: dict[str, Any],
                        data_overrides: dict[str, Any] | None) -> tuple[list[int], list[str], list[str] | None]:
    """Labels, class names and file names from a checkpoint run in PyTorch."""
    from hydra.utils import instantiate

    from cifar_lab.models.tta import tta_probs, tta_views

    ckpt_file = checkpoints.resolve(ckpt_path, "use")
    checkpoint = checkpoints.load(ckpt_file)
    saved, _ = checkpoints.saved_config(ckpt_file, checkpoint)
    training, _ = checkpoints.saved_overrides(ckpt_file, checkpoint)
    images, files = load_input(input)  # check the input before anything expensive
    train_cfg = compose_training(training, [], saved)
    OmegaConf.update(train_cfg, "paths.output_dir", str(Path(output).resolve().parent), force_add=True)
    for key, value in (data_overrides or {}).items():
        OmegaConf.update(train_cfg, f"data.{key}", value, force_add=True)

    size = int(OmegaConf.select(train_cfg, "data.source.image_size", default=32) or 32)
    x_all = fit_size(images, size, resize, files)

    datamodule = instantiate(train_cfg.data, _convert_="all")
    names = class_names(checkpoint, datamodule) if label_format == "name" else []
    net = instantiate(train_cfg.model, _convert_="all")
    checkpoints.load_network_weights(net, checkpoint, ckpt_file)
    dev = _device(device)
    net = net.to(dev).eval()
    views = (tta_views(bool(tta.get("flip", True)), int(tta.get("translate", 0)), tta.get("shifts"))
             if tta.get("enabled") else None)

    preds = []
    with torch.inference_mode():
        for start in range(0, len(x_all), batch_size):
            x = datamodule.normalize(x_all[start:start + batch_size].to(dev))
            if views is not None:
                probs = tta_probs(net, x, views, str(tta.get("padding_mode", "reflect")))
            else:
                probs = net(x).float().softmax(dim=1)
            preds.append(probs.argmax(dim=1).cpu())
    return torch.cat(preds).tolist(), names, files


def predict_from_config(cfg: DictConfig) -> Path:
    return predict(
        ckpt_path=OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False) or "",
        input=OmegaConf.select(cfg, "input", throw_on_missing=False) or "",
        output=cfg.output,
        label_format=cfg.label_format,
        resize=bool(cfg.resize),
        batch_size=int(cfg.batch_size),
        device=str(cfg.device),
        include_file=bool(cfg.get("include_file", False)),
        tta=OmegaConf.to_container(cfg.tta, resolve=True) if cfg.get("tta") else None,
        data_overrides=OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
    )


def run(overrides: Sequence[str], output_dir: str | Path | None = None, *, logging_to_file: bool = False) -> Path:
    """``python -m cifar_lab.predict <overrides>`` (job directory ``output_dir``, else hydra.run.dir)."""
    with hydra_job("predict", overrides, output_dir, logging_to_file=logging_to_file) as cfg:
        return predict_from_config(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(run, __doc__, argv)


if __name__ == "__main__":
    main()
