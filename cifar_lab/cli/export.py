"""Export a trained checkpoint to ONNX or TorchScript, preprocessing included, and check parity.

    python -m cifar_lab.export ckpt_path=<run dir or .ckpt> format=onnx|torchscript output=model.onnx

The exported model takes ``uint8`` RGB images ``(N, 3, H, W)`` (any batch size N), normalises
them with the training run's mean/std inside, and returns softmax probabilities; the file's
metadata states this and holds the class names (:mod:`cifar_lab.deploy.exported`).

Parity: the exported file and the PyTorch network both run (on the CPU) over the run's test
set, or the images of ``parity.images=<.npy>``; the top-1 agreement and the largest absolute
difference of their probabilities are printed and saved to ``<output>.parity.json``. The export
fails (exit code 2, with the numbers) when a probability differs by more than
``parity.tolerance``, or a prediction differs on an image the network does not find a near-tie
(top two probabilities more than twice the tolerance apart).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from cifar_lab import checkpoints
from cifar_lab.cli.predict import class_names as predict_class_names
from cifar_lab.cli.predict import fit_size, load_input
from cifar_lab.config.compose import compose_training, hydra_job
from cifar_lab.console import PassProgress
from cifar_lab.errors import ConfigError, ExportError, InputError
from cifar_lab.cli.exits import run_command
from cifar_lab.deploy.exported import (FORMATS, INPUT_NAME, OUTPUT_NAME, TORCHSCRIPT_METADATA, Deployable,
                                ExportedModel, make_metadata, require_onnx)
from cifar_lab.fileio import atomic_output, atomic_write_text, check_output


# ----------------------------------------------------------------------------- writing
# ONNX opsets the TorchScript-based exporter writes (torch.onnx.export(dynamo=False)), as torch states them
MIN_OPSET, MAX_OPSET = torch.onnx._constants.ONNX_MIN_OPSET, torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unsupported_op(err: BaseException) -> str | None:
    """The operator an exporter error names (``aten::i0``), if it names one."""
    match = re.search(r"operator '([^']+)'", str(err))
    return match.group(1) if match else None


def write_onnx(model: nn.Module, example: Tensor, output: Path, metadata: dict[str, str], opset: int) -> None:
    """``model`` as ONNX (batch axis dynamic) with ``metadata`` as its metadata_props."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        try:
            torch.onnx.export(model, (example,), str(output), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False)
        except Exception as err:  # noqa: BLE001 - the exporter's refusals (an op, the opset), one line
            op = _unsupported_op(err)
            why = f"it uses {op}, which has no ONNX mapping at opset {opset}" if op else _first_line(err)
            raise ExportError(f"cannot export the network to ONNX: {why}; try another opset=, or "
                              "format=torchscript") from None
    proto = onnx.load(str(output))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(output))


def write_torchscript(model: nn.Module, example: Tensor, output: Path, metadata: dict[str, str]) -> None:
    """``model`` traced to TorchScript, ``metadata`` stored as the extra file ``metadata.json``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notices
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, (example,), check_trace=False)
        except Exception as err:  # noqa: BLE001 - tracing refuses some Python constructs
            raise ExportError(f"cannot trace the network to TorchScript: {_first_line(err)}") from None
        torch.jit.save(traced, str(output), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


def write_model(model: nn.Module, format: str, example: Tensor, output: Path, metadata: dict[str, str],
                opset: int = 17) -> Path:
    """Write ``model`` (a :class:`~cifar_lab.deploy.exported.Deployable`) in ``format`` to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if format == "onnx":
        write_onnx(model, example, output, metadata, opset)
    else:
        write_torchscript(model, example, output, metadata)
    return output


# ----------------------------------------------------------------------------- parity


@torch.inference_mode()
def parity(model: nn.Module, exported: ExportedModel, images: Tensor, tolerance: float, batch_size: int = 256,
           progress_every_s: float | None = None) -> dict[str, Any]:
    """Top-1 agreement and probability differences of ``exported`` against ``model`` on ``images``."""
    starts = range(0, len(images), batch_size)
    progress = PassProgress(f"parity ({exported.format})", len(starts), "batches", progress_every_s)
    refs, outs = [], []
    for i in starts:
        refs.append(model(images[i:i + batch_size]).float())
        outs.append(exported.predict(images[i:i + batch_size], batch_size).float())
        progress.advance()
    ref, out = torch.cat(refs), torch.cat(outs)
    diff = (ref - out).abs()
    agree = ref.argmax(dim=1) == out.argmax(dim=1)
    top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1]
    clear_disagreements = int((~agree & (margin > 2 * tolerance)).sum())
    max_diff = float(diff.max())
    return {
        "format": exported.format,
        "images": len(images),
        "top1_agreement": float(agree.float().mean()),
        "disagreements": int((~agree).sum()),
        "disagreements_beyond_tolerance": clear_disagreements,
        "max_abs_prob_diff": max_diff,
        "mean_abs_prob_diff": float(diff.mean()),
        "tolerance": float(tolerance),
        "passed": max_diff <= tolerance and clear_disagreements == 0,
    }


def format_parity(result: dict[str, Any]) -> str:
    return (f"parity ({result['format']}, {result['images']} images): top-1 agreement "
            f"{100 * result['top1_agreement']:.2f}% ({result['disagreements']} differ), max |prob diff| "
            f"{result['max_abs_prob_diff']:.2e}, mean {result['mean_abs_prob_diff']:.2e} "
            f"(tolerance {result['tolerance']:.0e}): {'passed' if result['passed'] else 'FAILED'}")


# ----------------------------------------------------------------------------- command


@dataclass
class Trained:
    """A checkpoint's network wrapped with its preprocessing, and what it was trained with."""

    model: Deployable
    cfg: DictConfig
    ckpt_file: Path
    datamodule: Any
    class_names: list[str]
    mean: list[float]
    std: list[float]
    image_size: int


def load_trained(ckpt_path: str | Path, output_dir: str | Path = ".", data_overrides: dict[str, Any] | None = None
                 ) -> Trained:
    """The checkpoint's network (CPU, float32, eval mode) as a :class:`Deployable`, with its training config."""
    ckpt_file = checkpoints.resolve(ckpt_path, "use")
    checkpoint = checkpoints.load(ckpt_file)
    saved, _ = checkpoints.saved_config(ckpt_file, checkpoint)
    training, _ = checkpoints.saved_overrides(ckpt_file, checkpoint)
    cfg = compose_training(training, [], saved)
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir), force_add=True)
    for key, value in (data_overrides or {}).items():
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)
    net = instantiate(cfg.model, _convert_="all")
    checkpoints.load_network_weights(net, checkpoint, ckpt_file)
    mean, std = [float(m) for m in cfg.data.mean], [float(s) for s in cfg.data.std]
    return Trained(model=Deployable(net.float(), mean, std).eval(), cfg=cfg, ckpt_file=ckpt_file,
                   datamodule=instantiate(cfg.data, _convert_="all"),
                   class_names=[str(n) for n in checkpoint.get(checkpoints.CLASS_NAMES_KEY) or []], mean=mean,
                   std=std, image_size=int(OmegaConf.select(cfg, "data.source.image_size", default=32) or 32))


def _parity_images(datamodule: Any, images: str | None, size: int, limit: int | None
                   ) -> Tensor:
    """The parity set: ``images`` (a .npy or pickle of uint8 images), else the run's test set."""
    if images:
        loaded, names = load_input(images)
        x = fit_size(loaded, size, False, names)
    else:
        try:
            datamodule.setup("test")
        except Exception as err:  # noqa: BLE001 - data not found or unreadable
            raise InputError(f"the run's test set could not be loaded for the parity check ({type(err).__name__}: "
                             f"{err}); point data.root at the data or pass parity.images=<.npy of images>") from err
        x = datamodule.splits["test"][0]
    return x[:limit] if limit else x


def export(ckpt_path: str | Path, format: str, output: str | Path, opset: int = 17, tolerance: float = 1e-4,
           images: str | None = None, limit: int | None = None, batch_size: int = 256,
           data_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the checkpoint's network; return (and write to ``<output>.parity.json``) the parity numbers."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not an export format; use one of {', '.join(FORMATS)}")
    if format == "onnx":
        require_onnx()
    if str(output) in ("", "???", "None"):
        raise InputError(f"output is required: output=<file{FORMATS[format]}>")
    out = check_output(output, (images,), "model" + FORMATS[format])
    check_output(out, (checkpoints.resolve(ckpt_path, "use"),))
    if format == "onnx" and not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ConfigError(f"opset={opset} is not an ONNX opset this exporter writes; use {MIN_OPSET}..{MAX_OPSET} "
                          "(17, the default, runs everywhere onnxruntime does)")
    trained = load_trained(ckpt_path, out.resolve().parent, data_overrides)
    x = _parity_images(trained.datamodule, images, trained.image_size, limit)
    if not trained.class_names:  # an older checkpoint: the names of the training data
        trained.class_names = predict_class_names({}, trained.datamodule)
    metadata = make_metadata(trained.class_names, trained.image_size, trained.mean, trained.std,
                             model=str(trained.cfg.model.get("_target_", "")), checkpoint=str(trained.ckpt_file),
                             format=format, torch_version=torch.__version__)
    report = Path(f"{out}.parity.json")
    # Written beside the target and checked there; only a file that passes replaces an existing one,
    # and a kill at any point leaves the previous file whole.
    with atomic_output(out) as tmp:
        write_model(trained.model, format, x[:2], tmp, metadata, opset)
        result = {"output": str(out), "checkpoint": str(trained.ckpt_file),
                  "parity_set": str(images) if images else "the run's test set",
                  **parity(trained.model, ExportedModel(tmp, format), x, tolerance, batch_size)}
        atomic_write_text(report, json.dumps(result, indent=2) + "\n")
        print(format_parity(result))
        if not result["passed"]:
            kept = f"; {out} was left as it was" if out.exists() else ""
            raise ExportError(f"the exported model disagrees with the network beyond the tolerance: "
                              f"{format_parity(result)}; numbers in {report}{kept}")
    print(f"Wrote {out} and {report}")
    return result


def export_from_config(cfg: DictConfig) -> dict[str, Any]:
    par = cfg.get("parity") or {}
    return export(
        ckpt_path=OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False) or "",
        format=str(cfg.format),
        output=OmegaConf.select(cfg, "output", throw_on_missing=False) or "",
        opset=int(cfg.opset),
        tolerance=float(par.get("tolerance", 1e-4)),
        images=par.get("images") or None,
        limit=par.get("limit") or None,
        batch_size=int(par.get("batch_size", 256)),
        data_overrides=OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
    )


def run(overrides: Sequence[str], output_dir: str | Path | None = None, *, logging_to_file: bool = False
        ) -> dict[str, Any]:
    """``python -m cifar_lab.export <overrides>`` (job directory ``output_dir``, else hydra.run.dir)."""
    with hydra_job("export", overrides, output_dir, logging_to_file=logging_to_file) as cfg:
        return export_from_config(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(run, __doc__, argv)


if __name__ == "__main__":
    main()
