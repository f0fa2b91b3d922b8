"""Classification reports for every run: per-class metrics, confusion matrix, calibration, curves.

:class:`ClassificationReport` accumulates torchmetrics from the ``{"loss", "logits", "labels"}``
dicts that ``validation_step``/``test_step`` return, so it works with any module that returns
those. It logs to whatever loggers the trainer has and adds images and the HPARAMS summary
to TensorBoard (to MLflow: the run config as params, the report files as artifacts); it writes
report files into the run directory on global rank 0 only (the metrics themselves are
synchronised across DDP ranks by torchmetrics). What the test pass measured stays in
``results["test"]``: the model card reads it instead of running the test set again.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from torch import Tensor, nn
from torchmetrics.classification import (
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat

from cifar_lab.callbacks import plots, wandb_run
from cifar_lab.runs.summary import scalars
from cifar_lab.fileio import atomic_write_text

log = logging.getLogger(__name__)

STAGES = ("val", "test")
# Report files copied into an MLflow run as artifacts, when they exist in the run directory.
REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "curves.png", "misclassified.png")
CLASS_NAMES_KEY = "class_names"  # checkpoint entry holding the class names (used by predict)


# ----------------------------------------------------------------------------- report text


def _present(confmat: Tensor) -> Tensor:
    """Classes that occur among the targets or the predictions (the labels sklearn would list)."""
    return (confmat.sum(dim=1) + confmat.sum(dim=0)) > 0


def summarize(
    precision: Tensor, recall: Tensor, f1: Tensor, confmat: Tensor
) -> dict[str, Any]:
    """Per-class numbers plus accuracy, macro and support-weighted averages.

    Macro averages are taken over the classes present in targets or predictions (as
    torchmetrics' ``average="macro"`` and sklearn do); weighted averages use the support.
    """
    confmat = confmat.detach().double().cpu()
    support = confmat.sum(dim=1)
    total = float(support.sum())
    per_class = torch.stack([precision.detach().double().cpu(), recall.detach().double().cpu(),
                             f1.detach().double().cpu()], dim=1)
    present = _present(confmat)
    macro = per_class[present].mean(dim=0) if present.any() else torch.zeros(3, dtype=torch.float64)
    weighted = (per_class * support[:, None]).sum(dim=0) / total if total > 0 else torch.zeros(3, dtype=torch.float64)
    return {
        "precision": per_class[:, 0],
        "recall": per_class[:, 1],
        "f1": per_class[:, 2],
        "support": support.long(),
        "accuracy": float(confmat.trace() / total) if total > 0 else 0.0,
        "macro": macro,
        "weighted": weighted,
        "total": int(total),
    }


def format_report(summary: Mapping[str, Any], class_names: Sequence[str], digits: int = 2) -> str:
    """The summary laid out like sklearn's ``classification_report``."""
    headers = ("precision", "recall", "f1-score", "support")
    width = max([len(n) for n in class_names] + [len("weighted avg"), digits])
    lines = [f"{'':>{width}s} " + "".join(f" {h:>9}" for h in headers), ""]

    def row(name: str, values: Sequence[float], support: int) -> str:
        return f"{name:>{width}s} " + "".join(f" {v:>9.{digits}f}" for v in values) + f" {support:>9}"

    for i, name in enumerate(class_names):
        values = (float(summary["precision"][i]), float(summary["recall"][i]), float(summary["f1"][i]))
        lines.append(row(name, values, int(summary["support"][i])))
    lines.append("")
    total = summary["total"]
    lines.append(f"{'accuracy':>{width}s} " + f" {'':>9}" * 2 + f" {summary['accuracy']:>9.{digits}f}" + f" {total:>9}")
    lines.append(row("macro avg", [float(v) for v in summary["macro"]], total))
    lines.append(row("weighted avg", [float(v) for v in summary["weighted"]], total))
    return "\n".join(lines) + "\n"


def tag_name(name: str) -> str:
    """A class name usable inside a metric tag (no slashes or spaces)."""
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "class"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a/b": value}`` with values TensorBoard's HPARAMS tab accepts."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = str(value)
    return flat


def reliability_bins(confidences: Tensor, correct: Tensor, bins: int) -> dict[str, list]:
    """Per equal-width confidence bin: the mean confidence, the accuracy and the image count.

    The bins are torchmetrics' (``[k/B, (k+1)/B)``; a confidence of exactly 1 joins the last bin), so
    the bars of the reliability diagram are the terms of the expected calibration error.
    """
    confidences, correct = confidences.detach().double().cpu(), correct.detach().double().cpu()
    index = (torch.bucketize(confidences, torch.linspace(0, 1, bins + 1, dtype=torch.float64), right=True) - 1)
    index = index.clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    filled = count.clamp(min=1)
    return {"confidence": (torch.bincount(index, confidences, minlength=bins) / filled).tolist(),
            "accuracy": (torch.bincount(index, correct, minlength=bins) / filled).tolist(),
            "count": count.long().tolist()}


class CalibrationError(MulticlassCalibrationError):
    """torchmetrics' expected calibration error (L1); ``compute`` also keeps the bins in ``self.bins``.

    ``compute`` runs on the states of every DDP rank, so the bins hold every test image once.
    """

    bins: dict[str, list] | None = None

    def compute(self) -> Tensor:
        self.bins = reliability_bins(dim_zero_cat(self.confidences), dim_zero_cat(self.accuracies), self.n_bins)
        return super().compute()


# ----------------------------------------------------------------------------- callback
class ClassificationReport(L.Callback):
    """Per-class precision/recall/F1, confusion matrix, ECE and misclassified images; report files.

    TensorBoard (and any other logger) gets ``{stage}_per_class/{precision,recall,f1}/<class>``
    and ``{stage}/ece`` every validation epoch and at test; TensorBoard also gets the confusion
    matrix image ``{stage}/confusion_matrix`` (validation every ``val_confusion_every_n_epochs``
    epochs and at the last epoch), the grid ``test/misclassified`` and the run config with the
    final metrics in its HPARAMS tab. An MLflow logger gets the run config as params when
    fitting (or testing) starts and the report files below as artifacts once they are written.

    Files written to ``output_dir`` (global rank 0): after testing ``classification_report.txt``,
    ``confusion_matrix.png`` and ``misclassified.png``; after fitting ``curves.png``. A run that
    fits without testing gets the report files from its last validation instead.

    Args:
        output_dir: run directory for the files (default: the trainer's ``default_root_dir``).
        class_names: names for the report (default: the datamodule's ``classes``, else indices).
        mean, std: normalisation of the batches, to show misclassified images in true colour.
        normalize: confusion matrix normalisation: ``true`` (rows), ``pred``, ``all`` or ``none``.
        val_confusion_every_n_epochs: confusion image during validation every N epochs (0: never).
        per_class_metrics: log the per-class scalars.
        ece_bins: bins of the expected calibration error.
        misclassified: how many misclassified test images to show (0: none).
        log_hparams: write the config and final metrics to TensorBoard's HPARAMS tab, and the
            config to MLflow's params.
        write_files: write the report files.
        digits: decimals in ``classification_report.txt``.
        graph_input_size: image size of the batch traced for the model graph when the TensorBoard
            logger has ``log_graph=true`` (and the module has no ``example_input_array``).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalize: str | None = "true",
        val_confusion_every_n_epochs: int = 5,
        per_class_metrics: bool = True,
        ece_bins: int = 15,
        misclassified: int = 32,
        log_hparams: bool = True,
        write_files: bool = True,
        digits: int = 2,
        graph_input_size: int | None = None,
    ) -> None:
        super().__init__()
        if val_confusion_every_n_epochs < 0:
            raise ValueError("val_confusion_every_n_epochs must be >= 0")
        self.output_dir = output_dir
        self.class_names = list(class_names) if class_names else None
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.normalize = plots.check_normalize(normalize)
        self.val_confusion_every_n_epochs = val_confusion_every_n_epochs
        self.per_class_metrics = per_class_metrics
        self.ece_bins = ece_bins
        self.misclassified = misclassified
        self.log_hparams = log_hparams
        self.write_files = write_files
        self.digits = digits
        self.graph_input_size = graph_input_size

        self.metrics: nn.ModuleDict | None = None
        self.num_classes: int | None = None
        # epoch -> {"train/loss", "train/acc", "val/loss", "val/acc"}, for curves.png
        self.history: dict[int, dict[str, float]] = {}
        # stage -> the last pass's summary, confusion matrix, ece and its bins (the model card reads "test")
        self.results: dict[str, dict[str, Any]] = {}
        self.fit_metrics: dict[str, float] = {}
        self._wrong: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._wrong_count = 0
        self._mlflow_runs_with_params: set[str] = set()
        self._wandb_config_logged = False

    # ------------------------------------------------------------------ helpers
    def _build_metrics(self, num_classes: int) -> nn.ModuleDict:
        def stage_metrics() -> nn.ModuleDict:
            return nn.ModuleDict({
                "precision": MulticlassPrecision(num_classes, average=None),
                "recall": MulticlassRecall(num_classes, average=None),
                "f1": MulticlassF1Score(num_classes, average=None),
                "confmat": MulticlassConfusionMatrix(num_classes),
                "ece": CalibrationError(num_classes, n_bins=self.ece_bins, norm="l1"),
            })

        return nn.ModuleDict({stage: stage_metrics() for stage in STAGES})

    def _names(self, trainer: L.Trainer) -> list[str]:
        n = self.num_classes or 0
        if self.class_names and len(self.class_names) == n:
            return list(self.class_names)
        classes = list(getattr(trainer.datamodule, "classes", None) or []) if trainer.datamodule is not None else []
        if len(classes) == n:
            return [str(c) for c in classes]
        return [str(i) for i in range(n)]

    def _run_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def _norm_stats(self, trainer: L.Trainer) -> tuple[Sequence[float] | None, Sequence[float] | None]:
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        normalize = getattr(getattr(trainer.datamodule, "eval_augment", None), "normalize", None)
        return getattr(normalize, "mean", None), getattr(normalize, "std", None)

    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger
        return None

    def _add_image(self, trainer: L.Trainer, tag: str, image: np.ndarray) -> None:
        """A rendered figure (:func:`plots.figure_to_array`) to TensorBoard, when the run logs there."""
        tb = self._tensorboard(trainer)
        if tb is not None and trainer.is_global_zero:
            tb.experiment.add_image(tag, image, global_step=trainer.global_step, dataformats="HWC")

    def _update(self, stage: str, outputs: Any) -> tuple[Tensor, Tensor] | None:
        if not isinstance(outputs, Mapping) or "logits" not in outputs or "labels" not in outputs:
            return None
        logits = outputs["logits"].detach().float()
        labels = outputs["labels"].detach()
        if labels.ndim == 2:  # soft targets: score against the dominant class
            labels = labels.argmax(dim=1)
        probs = logits.softmax(dim=1)
        metrics = self.metrics[stage]
        for name in ("precision", "recall", "f1", "confmat"):
            metrics[name].update(probs, labels)
        metrics["ece"].update(probs, labels)
        return probs, labels

    def _compute(self, stage: str, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = self.metrics[stage]
        if metrics["confmat"].update_count == 0:
            return {}
        confmat = metrics["confmat"].compute()
        summary = summarize(metrics["precision"].compute(), metrics["recall"].compute(),
                            metrics["f1"].compute(), confmat)
        ece = float(metrics["ece"].compute())
        result = {"summary": summary, "confmat": confmat.detach().cpu(), "ece": ece, "bins": metrics["ece"].bins}
        self.results[stage] = result
        return result

    def _log_scalars(self, trainer: L.Trainer, stage: str, result: Mapping[str, Any], names: Sequence[str],
                     pl_module: L.LightningModule) -> None:
        # ECE goes through the module so it lands in callback_metrics (and metrics.json). torchmetrics computed it
        # over every rank's predictions, so each rank holds the same value and their mean is that value exactly.
        pl_module.log(f"{stage}/ece", result["ece"], sync_dist=True)
        if not self.per_class_metrics or not trainer.is_global_zero:
            return
        # Per-class values go straight to the loggers: they would swamp the progress bar and
        # the printed test table (30 rows for CIFAR-10, 300 for CIFAR-100).
        summary = result["summary"]
        values = {
            f"{stage}_per_class/{kind}/{tag_name(name)}": float(summary[kind][i])
            for kind in ("precision", "recall", "f1")
            for i, name in enumerate(names)
        }
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _write_reports(self, trainer: L.Trainer, stage: str) -> np.ndarray | None:
        """classification_report.txt and confusion_matrix.png of ``stage``; returns the rendered
        confusion matrix (None where nothing was written)."""
        result = self.results.get(stage)
        if not (self.write_files and trainer.is_global_zero and result):
            return None
        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        names = self._names(trainer)
        what = "test set" if stage == "test" else "validation set (last epoch)"
        text = format_report(result["summary"], names, self.digits)
        header = f"Classification report, {what}\n\n"
        footer = f"\nexpected calibration error ({self.ece_bins} bins): {result['ece']:.4f}\n"
        atomic_write_text(run_dir / "classification_report.txt", header + text + footer)
        return plots.save_figure(self._confusion_figure(result, names, f"Confusion matrix, {what}"),
                                 run_dir / "confusion_matrix.png")

    def _confusion_figure(self, result: Mapping[str, Any], names: Sequence[str], title: str) -> Any:
        return plots.confusion_matrix_figure(result["confmat"], names, self.normalize, title=title)

    def _write_curves(self, trainer: L.Trainer) -> None:
        if not (self.write_files and trainer.is_global_zero and self.history):
            return
        plots.save_figure(plots.curves_figure(self.history), self._run_dir(trainer) / "curves.png")

    def _log_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: Mapping[str, float]) -> None:
        tb = self._tensorboard(trainer)
        if not (self.log_hparams and tb is not None and trainer.is_global_zero):
            return
        params = flatten_params(dict(pl_module.hparams)) or {"module": type(pl_module).__name__}
        final = {f"hp/{k.replace('/', '_')}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        tb.log_hyperparams(params, final)

    def _log_mlflow_params(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The flattened run config as MLflow params, once per MLflow run.

        MLflow params cannot change once set, so this runs when fitting or testing starts, after
        the run has settled its config (e.g. the measured precision); MLFlowLogger cuts values to
        250 characters.
        """
        if not (self.log_hparams and trainer.is_global_zero):
            return
        if not self._wandb_config_logged:
            wandb_run.log_config(trainer.loggers, lambda: flatten_params(dict(pl_module.hparams)))
            self._wandb_config_logged = True
        for logger in trainer.loggers:
            if not isinstance(logger, MLFlowLogger):
                continue
            try:
                if logger.run_id in self._mlflow_runs_with_params:
                    continue
                params = flatten_params(dict(pl_module.hparams)) or {"module": type(pl_module).__name__}
                logger.log_hyperparams(params)
                self._mlflow_runs_with_params.add(logger.run_id)
            except Exception as err:  # noqa: BLE001 - a tracking server's hiccup does not stop training
                log.warning("could not log the config to MLflow: %s", err)

    def _log_mlflow_artifacts(self, trainer: L.Trainer) -> None:
        """The report files of the run directory as artifacts of each MLflow logger's run."""
        if not (self.write_files and trainer.is_global_zero):
            return
        files = [path for name in REPORT_FILES if (path := self._run_dir(trainer) / name).is_file()]
        wandb_run.save_files(trainer.loggers, files)
        for logger in trainer.loggers if files else []:
            if not isinstance(logger, MLFlowLogger):
                continue
            try:
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path))
            except Exception as err:  # noqa: BLE001 - the files stay in the run directory either way
                log.warning("could not copy the report files to MLflow: %s", err)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
        if not num_classes:
            raise ValueError("ClassificationReport needs the module's num_classes")
        if self.metrics is None or self.num_classes != num_classes:
            self.num_classes = num_classes
            self.metrics = self._build_metrics(num_classes)
        self.metrics.to(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_graph(trainer, pl_module)
        self._log_mlflow_params(trainer, pl_module)
        self._add_dashboard_layout(trainer)

    # TensorBoard's CUSTOM SCALARS tab: the charts that answer "is it learning, is it overfitting"
    # first, instead of the alphabetical list of single-metric cards.
    DASHBOARD = {
        "cifar-lab": {
            "loss: train vs val": ["Multiline", ["^train/loss$", "^val/loss$"]],
            "accuracy: train vs val": ["Multiline", ["^train/acc$", "^val/acc$", "^val/acc_best$"]],
            "learning rate": ["Multiline", ["^lr-"]],
            "step loss and accuracy": ["Multiline", ["^train/loss_step$", "^train/acc_step$"]],
        }
    }

    def _add_dashboard_layout(self, trainer: L.Trainer) -> None:
        tb = self._tensorboard(trainer)
        if tb is not None and trainer.is_global_zero:
            tb.experiment.add_custom_scalars(self.DASHBOARD)

    def _log_graph(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The network's graph, when the TensorBoard logger was asked for it (``log_graph=true``).

        Lightning's own tracing feeds ``example_input_array`` through the datamodule's batch
        hooks, which expect ``(images, labels)``; tracing the network directly on a normalised
        all-zero batch avoids that. Done in eval mode so BatchNorm statistics stay untouched.
        """
        tb = self._tensorboard(trainer)
        if tb is None or not getattr(tb, "_log_graph", False) or not self.graph_input_size:
            return
        if getattr(pl_module, "example_input_array", None) is not None or not trainer.is_global_zero:
            return  # Lightning traces the module's own example
        net = getattr(pl_module, "net", pl_module)
        size = int(self.graph_input_size)
        example = torch.zeros(2, 3, size, size, device=pl_module.device)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                tb.experiment.add_graph(net, example)
        except Exception as err:  # noqa: BLE001 - tracing is best effort; training goes on
            log.warning("could not trace the model graph for TensorBoard: %s", err)
            return
        finally:
            net.train(was_training)
        # Lightning would now warn that example_input_array is unset; the graph is already there.
        warnings.filterwarnings("ignore", message="Could not log computational graph")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics.to(pl_module.device)
        for metric in self.metrics["val"].values():
            metric.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._update("val", outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        result = self._compute("val", pl_module)
        if not result:
            return
        names = self._names(trainer)
        self._log_scalars(trainer, "val", result, names, pl_module)
        every = self.val_confusion_every_n_epochs
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if every and ((epoch + 1) % every == 0 or last) and self._tensorboard(trainer) is not None:
            fig = self._confusion_figure(result, names, f"Validation, epoch {epoch + 1}")
            self._add_image(trainer, "val/confusion_matrix", plots.figure_to_array(fig))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch-level values are in callback_metrics by now (they are not yet in on_validation_epoch_end).
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = scalars(trainer.callback_metrics, ("val/loss", "val/acc"))
        entry = self.history.setdefault(trainer.current_epoch, {})
        for key in ("val/loss", "val/acc"):
            if key in values:
                entry[key] = values[key]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = scalars(trainer.callback_metrics, ("train/",))
        entry = self.history.setdefault(trainer.current_epoch, {})
        for key in ("train/loss", "train/acc"):
            value = values.get(f"{key}_epoch", values.get(key))
            if value is not None:
                entry[key] = value

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_metrics = scalars(trainer.callback_metrics, ("val/", "train/"))
        self._write_curves(trainer)
        will_test = bool(dict(pl_module.hparams).get("test", True)) if pl_module.hparams else True
        if not will_test:
            self._write_reports(trainer, "val")
            keep = ("val/acc_best", "val/acc", "val/loss", "val/ece")
            self._log_hparams(trainer, pl_module, {k: v for k, v in self.fit_metrics.items() if k in keep})
            self._log_mlflow_artifacts(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_mlflow_params(trainer, pl_module)  # a test-only run (evaluate) has not fitted

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics.to(pl_module.device)
        for metric in self.metrics["test"].values():
            metric.reset()
        self._wrong, self._wrong_count = [], 0

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        updated = self._update("test", outputs)
        if updated is None or self._wrong_count >= self.misclassified:
            return
        probs, labels = updated
        confidence, preds = probs.max(dim=1)
        wrong = torch.nonzero(preds != labels).flatten()[: self.misclassified - self._wrong_count]
        if len(wrong) == 0 or not isinstance(batch, (tuple, list)):
            return
        images = batch[0]
        if not isinstance(images, Tensor) or images.ndim != 4 or len(images) != len(labels):
            return
        mean, std = self._norm_stats(trainer)
        picked = plots.denormalize(images[wrong], mean, std).cpu()
        self._wrong.append((picked, labels[wrong].cpu(), preds[wrong].cpu(), confidence[wrong].cpu()))
        self._wrong_count += len(wrong)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self._compute("test", pl_module)
        if result:
            self._log_scalars(trainer, "test", result, self._names(trainer), pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.results.get("test")
        if not result or not trainer.is_global_zero:
            return
        names = self._names(trainer)
        tensorboard = self._tensorboard(trainer) is not None
        confusion = self._write_reports(trainer, "test")  # drawn once, for the file and TensorBoard
        if confusion is None and tensorboard:
            confusion = plots.figure_to_array(self._confusion_figure(result, names, "Confusion matrix, test set"))
        if confusion is not None:
            self._add_image(trainer, "test/confusion_matrix", confusion)
        if self.misclassified and (self.write_files or tensorboard):
            grid = self._misclassified_figure(names)
            image = (plots.save_figure(grid, self._run_dir(trainer) / "misclassified.png") if self.write_files
                     else plots.figure_to_array(grid))
            self._add_image(trainer, "test/misclassified", image)
        final = {k: v for k, v in self.fit_metrics.items() if k in ("val/acc_best", "val/acc", "val/loss")}
        final.update(scalars(trainer.callback_metrics, ("test/",)))
        self._log_hparams(trainer, pl_module, final)
        self._log_mlflow_artifacts(trainer)

    def _misclassified_figure(self, names: Sequence[str]) -> Any:
        if self._wrong:
            images = torch.cat([w[0] for w in self._wrong])
            true = torch.cat([w[1] for w in self._wrong]).tolist()
            pred = torch.cat([w[2] for w in self._wrong]).tolist()
            conf = torch.cat([w[3] for w in self._wrong]).tolist()
        else:
            images, true, pred, conf = torch.zeros(0, 3, 1, 1, dtype=torch.uint8), [], [], []
        titles = [f"true: {names[t]}\npred: {names[p]} ({c:.0%})" for t, p, c in zip(true, pred, conf)]
        return plots.image_grid_figure(images, titles, title="Misclassified test images")

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Prediction outside a Trainer needs the class names without loading the data set.
        names = self._names(trainer) if self.num_classes else []
        if names:
            checkpoint[CLASS_NAMES_KEY] = names

    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(k): dict(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): dict(v) for k, v in state_dict.get("history", {}).items()}
