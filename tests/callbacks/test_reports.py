"""ClassificationReport with a network whose predictions are known, so every number is checked by hand."""

from __future__ import annotations

import io
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks import ClassificationReport
from cifar_lab.callbacks.plots import normalize_confusion
from cifar_lab.callbacks.reports import CLASS_NAMES_KEY, format_report, summarize, tag_name
from cifar_lab.module import ClassifierModule

CLASSES = ["cat", "dog", "frog", "ship"]
# supports: cat 3, dog 2, frog 1, ship 4
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
PREDICTED = 1  # the network always says "dog"
# logits (0, ln 3, 0, 0): softmax confidence 3 / (3 + 3) = 0.5 for every image
CONFIDENCE = 0.5


class ConstantNet(nn.Module):
    """Always the same logits, whatever the image; one parameter so an optimizer has something."""

    def __init__(self, num_classes: int, predicted: int) -> None:
        super().__init__()
        logits = torch.zeros(num_classes)
        logits[predicted] = math.log(3.0)
        self.register_buffer("logits", logits)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1) * self.scale


class TinyData(L.LightningDataModule):
    """The same ten labelled images for train, val and test, in two batches."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = list(CLASSES)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(len(LABELS), 3, 8, 8, generator=g)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, LABELS), batch_size=5)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


def _module() -> ClassifierModule:
    return ClassifierModule(ConstantNet(len(CLASSES), PREDICTED), optimizer=partial(torch.optim.SGD, lr=0.0),
                            scheduler=None, num_classes=len(CLASSES), hparams={"model": {"name": "constant"}})


def _trainer(tmp_path: Path, callback: ClassificationReport, **kwargs) -> L.Trainer:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    return L.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[callback], enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     num_sanity_val_steps=0, **kwargs)


def _events(tmp_path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


EXPECTED_CONFUSION = torch.tensor([[0, 3, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 4, 0, 0]])
EXPECTED = {  # by hand: only "dog" is ever predicted; 2 of the 10 "dog" predictions are right
    "precision": [0.0, 0.2, 0.0, 0.0],
    "recall": [0.0, 1.0, 0.0, 0.0],
    "f1": [0.0, 2 * 0.2 * 1.0 / 1.2, 0.0, 0.0],
}


def test_summary_and_report_text_match_hand_computation() -> None:
    summary = summarize(torch.tensor(EXPECTED["precision"]), torch.tensor(EXPECTED["recall"]),
                        torch.tensor(EXPECTED["f1"]), EXPECTED_CONFUSION)
    assert summary["accuracy"] == pytest.approx(0.2)
    assert summary["support"].tolist() == [3, 2, 1, 4]
    assert summary["macro"].tolist() == pytest.approx([0.05, 0.25, 1 / 12])
    # weighted by support: dog's share is 2/10
    assert summary["weighted"].tolist() == pytest.approx([0.04, 0.2, 1 / 15])
    text = format_report(summary, CLASSES)
    expected = (
        "              precision    recall  f1-score   support\n"
        "\n"
        "         cat       0.00      0.00      0.00         3\n"
        "         dog       0.20      1.00      0.33         2\n"
        "        frog       0.00      0.00      0.00         1\n"
        "        ship       0.00      0.00      0.00         4\n"
        "\n"
        "    accuracy                           0.20        10\n"
        "   macro avg       0.05      0.25      0.08        10\n"
        "weighted avg       0.04      0.20      0.07        10\n"
    )
    assert text == expected


def test_macro_average_skips_classes_never_seen() -> None:
    # class 2 neither occurs nor is predicted: like sklearn, it does not count in the macro average
    confmat = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    summary = summarize(torch.tensor([2 / 3, 1.0, 0.0]), torch.tensor([1.0, 0.5, 0.0]),
                        torch.tensor([0.8, 2 / 3, 0.0]), confmat)
    assert summary["macro"].tolist() == pytest.approx([5 / 6, 0.75, (0.8 + 2 / 3) / 2])


def test_normalize_confusion_modes() -> None:
    cm = torch.tensor([[2, 2], [0, 4]])
    assert normalize_confusion(cm, "true").tolist() == [[0.5, 0.5], [0.0, 1.0]]
    assert normalize_confusion(cm, "pred").tolist() == [[1.0, 1 / 3], [0.0, 2 / 3]]
    assert normalize_confusion(cm, "all").tolist() == [[0.25, 0.25], [0.0, 0.5]]
    assert normalize_confusion(cm, "none").tolist() == [[2, 2], [0, 4]]
    assert normalize_confusion(cm, True).tolist() == normalize_confusion(cm, "true").tolist()
    with pytest.raises(ValueError, match="normalize"):
        ClassificationReport(normalize="rows")


def test_tag_names_are_safe() -> None:
    assert tag_name("sea lion/seal") == "sea_lion_seal"


def test_test_reports_files_and_tensorboard(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    report = ClassificationReport(output_dir=str(run_dir), mean=[0.5] * 3, std=[0.25] * 3, misclassified=4)
    trainer = _trainer(tmp_path, report)
    results = trainer.test(_module(), datamodule=TinyData(), verbose=False)[0]

    # calibration: every confidence is 0.5 and 20% are right, so ECE = |0.5 - 0.2|
    assert results["test/ece"] == pytest.approx(abs(CONFIDENCE - 0.2), abs=1e-6)
    assert results["test/acc"] == pytest.approx(0.2)
    assert "test/ece" in trainer.callback_metrics
    assert not any("per_class" in k for k in results)  # per-class values go to the loggers only

    result = report.results["test"]
    assert torch.equal(result["confmat"], EXPECTED_CONFUSION)
    for kind, values in EXPECTED.items():
        assert result["summary"][kind].tolist() == pytest.approx(values)

    text = (run_dir / "classification_report.txt").read_text()
    assert "         dog       0.20      1.00      0.33         2" in text
    assert "    accuracy                           0.20        10" in text
    assert "expected calibration error (15 bins): 0.3000" in text
    for name in ("confusion_matrix.png", "misclassified.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "curves.png").exists()  # no fit, no curves

    events = _events(tmp_path)
    tags = events.Tags()
    assert {"test/confusion_matrix", "test/misclassified"} <= set(tags["images"])
    scalars = set(tags["scalars"])
    assert {f"test_per_class/{k}/{c}" for k in ("precision", "recall", "f1") for c in CLASSES} <= scalars
    assert events.Scalars("test_per_class/precision/dog")[-1].value == pytest.approx(0.2)
    assert events.Scalars("test_per_class/recall/ship")[-1].value == 0.0
    assert events.Scalars("test/ece")[-1].value == pytest.approx(0.3, abs=1e-6)
    # HPARAMS: the final metrics are written with the run config
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(0.2)
    image = events.Images("test/confusion_matrix")[-1]
    assert image.width > 100 and image.height > 100


def test_misclassified_grid_holds_only_wrong_predictions(tmp_path: Path) -> None:
    report = ClassificationReport(output_dir=str(tmp_path / "run"), misclassified=100)
    _trainer(tmp_path, report).test(_module(), datamodule=TinyData(), verbose=False)
    true = torch.cat([w[1] for w in report._wrong])
    pred = torch.cat([w[2] for w in report._wrong])
    assert len(true) == 8 and bool((pred == PREDICTED).all()) and bool((true != PREDICTED).all())
    images = torch.cat([w[0] for w in report._wrong])
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 8, 8)


@pytest.mark.slow
def test_fit_logs_validation_confusion_every_n_epochs_and_curves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    report = ClassificationReport(output_dir=str(run_dir), val_confusion_every_n_epochs=2)
    trainer = _trainer(tmp_path, report, max_epochs=3, log_every_n_steps=1)
    module = _module()
    trainer.fit(module, datamodule=TinyData())

    assert sorted(report.history) == [0, 1, 2]
    for epoch in report.history.values():
        assert set(epoch) == {"train/loss", "train/acc", "val/loss", "val/acc"}
        assert epoch["val/acc"] == pytest.approx(0.2)
    assert (run_dir / "curves.png").is_file()
    # module hparams have no `test: false`, so the report files wait for the test
    assert not (run_dir / "classification_report.txt").exists()
    assert trainer.callback_metrics["val/ece"] == pytest.approx(0.3, abs=1e-6)

    events = _events(tmp_path)
    # every 2 epochs (epoch 2) and the last epoch (epoch 3)
    assert len(events.Images("val/confusion_matrix")) == 2
    assert len(events.Scalars("val_per_class/f1/dog")) == 3

    ckpt_path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt_path)
    checkpoint = torch.load(ckpt_path, weights_only=False)
    assert checkpoint[CLASS_NAMES_KEY] == CLASSES


def test_fit_without_test_writes_validation_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    module = ClassifierModule(ConstantNet(4, PREDICTED), optimizer=partial(torch.optim.SGD, lr=0.0),
                              num_classes=4, hparams={"test": False})
    report = ClassificationReport(output_dir=str(run_dir), normalize="none")
    _trainer(tmp_path, report, max_epochs=1).fit(module, datamodule=TinyData())
    text = (run_dir / "classification_report.txt").read_text()
    assert text.startswith("Classification report, validation set")
    assert (run_dir / "confusion_matrix.png").is_file() and (run_dir / "curves.png").is_file()
    assert "hp/val_acc" in _events(tmp_path).Tags()["scalars"]


def test_class_names_fall_back_to_indices(tmp_path: Path) -> None:
    class Nameless(TinyData):
        def __init__(self) -> None:
            super().__init__()
            self.classes = []

    report = ClassificationReport(output_dir=str(tmp_path / "run"), log_hparams=False)
    _trainer(tmp_path, report).test(_module(), datamodule=Nameless(), verbose=False)
    assert "           1       0.20      1.00      0.33         2" in (tmp_path / "run" / "classification_report.txt").read_text()


def test_model_graph_when_the_logger_asks_for_it(tmp_path: Path) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="", log_graph=True)
    report = ClassificationReport(output_dir=str(tmp_path / "run"), graph_input_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[report], max_epochs=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    module = _module()
    trainer.fit(module, datamodule=TinyData())
    assert _events(tmp_path).Tags()["graph"] is True
    assert module.net.training  # traced in eval mode, then put back


def test_the_image_grid_shows_every_image_whole_in_its_cell() -> None:
    """Each image of the grid is drawn at its cell's place at full size (solid colours, counted in the
    rendered pixels, in order, row by row); an empty grid renders too."""
    from cifar_lab.callbacks import plots

    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(-1, -1, 8, 8).contiguous()
    fig = plots.image_grid_figure(images, [f"image {i}" for i in range(5)], columns=3)
    pixels = torch.from_numpy(plots.figure_to_array(fig))
    side = 1.35 * fig.dpi  # an image's side in the rendered figure
    centres = []
    for colour in colours:
        ys, xs = torch.nonzero((pixels == colour).all(dim=-1), as_tuple=True)
        assert len(ys) > 0.9 * side * side, colour  # whole, not clipped
        centres.append((ys.float().mean().item(), xs.float().mean().item()))
    rows = [round(y / (fig.get_figheight() * fig.dpi) * 10) for y, _ in centres]
    assert rows[0] == rows[1] == rows[2] < rows[3] == rows[4]  # 3 columns: two rows
    assert centres[0][1] < centres[1][1] < centres[2][1] and abs(centres[3][1] - centres[0][1]) < 2
    empty = plots.figure_to_array(plots.image_grid_figure(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), []))
    assert empty.ndim == 3 and empty.shape[2] == 3


def test_a_figure_in_a_file_and_in_tensorboard_is_the_same_drawing(tmp_path: Path) -> None:
    from PIL import Image

    run_dir = tmp_path / "run"
    report = ClassificationReport(output_dir=str(run_dir), misclassified=4)
    _trainer(tmp_path, report).test(_module(), datamodule=TinyData(), verbose=False)
    events = _events(tmp_path)
    for name in ("confusion_matrix", "misclassified"):
        shown = events.Images(f"test/{name}")[-1]
        with Image.open(run_dir / f"{name}.png") as written:
            assert written.size == (shown.width, shown.height), name
            assert np.array_equal(np.asarray(written.convert("RGB")),
                                  np.asarray(Image.open(io.BytesIO(shown.encoded_image_string)).convert("RGB"))), name
