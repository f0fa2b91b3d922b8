"""predict: one row per input image in input order, for folders, .npy and pickles; clear errors otherwise.

The checkpoint holds a network that predicts an image's dominant colour (a 1x1 identity
convolution, then global average pooling), so every expected label is known.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.io import write_png

from cifar_lab.cli import predict as predict_mod
from cifar_lab.cli.predict import natural_key, predict
from cifar_lab.errors import CheckpointError
from cifar_lab.errors import InputError as PredictionError
from conftest import SYNTH, compose_cfg, run_cli

CLASSES = ["red", "green", "blue"]
PATTERN = [0, 1, 2, 2, 1, 0, 1]  # colour index of each input image, in input order


def colour_images(pattern: list[int], size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3) images, each a pure red, green or blue square."""
    images = np.zeros((len(pattern), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(pattern):
        images[i, :, :, c] = 255
    return images


def write_checkpoint(path: Path, class_names: bool = True) -> Path:
    cfg = compose_cfg([*SYNTH, "data.num_classes=3"], path.parent / "train_run")
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model"] = {
        "_target_": "torch.nn.Sequential",
        "_args_": [
            {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 1},
            {"_target_": "torch.nn.AdaptiveAvgPool2d", "output_size": 1},
            {"_target_": "torch.nn.Flatten"},
        ],
    }
    checkpoint = {
        "state_dict": {"net.0.weight": torch.eye(3).view(3, 3, 1, 1), "net.0.bias": torch.zeros(3)},
        "hyper_parameters": hparams,
        "epoch": 0,
        "global_step": 0,
    }
    if class_names:
        checkpoint["class_names"] = CLASSES
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model" / "colour.ckpt")


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def expected_rows(pattern: list[int], names: bool = True) -> list[list[str]]:
    return [["id", "label"]] + [[str(i), CLASSES[c] if names else str(c)] for i, c in enumerate(pattern)]


def test_npy_input(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", colour_images(PATTERN))
    out = predict(ckpt, tmp_path / "x.npy", tmp_path / "out" / "predictions.csv")
    assert read_csv(out) == expected_rows(PATTERN)


def test_pickle_inputs_and_index_labels(ckpt: Path, tmp_path: Path) -> None:
    images = colour_images(PATTERN)
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump(images, f)
    out = predict(ckpt, tmp_path / "x.pkl", tmp_path / "a.csv", label_format="index")
    assert read_csv(out) == expected_rows(PATTERN, names=False)
    # a CIFAR python batch: (N, 3072) rows, channel planes one after another
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(tmp_path / "batch", "wb") as f:
        pickle.dump({"data": rows, "filenames": ["x"] * len(rows)}, f)
    assert read_csv(predict(ckpt, tmp_path / "batch", tmp_path / "b.csv")) == expected_rows(PATTERN)
    # an (N, 3, H, W) numpy array
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), f)
    assert read_csv(predict(ckpt, tmp_path / "t.pkl", tmp_path / "c.csv")) == expected_rows(PATTERN)
    # a pickled torch tensor needs torch's own rebuild functions: refused like any other object
    with open(tmp_path / "torch.pkl", "wb") as f:
        pickle.dump(torch.from_numpy(images), f)
    with pytest.raises(PredictionError, match="refusing to load torch"):
        predict(ckpt, tmp_path / "torch.pkl", tmp_path / "d.csv")


class _Planted:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_never_runs_code(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "images.pkl"
    crafted.write_bytes(pickle.dumps({"data": _Planted(marker)}))
    with pytest.raises(PredictionError, match=r"refusing to load pathlib\.Path"):
        predict(ckpt, crafted, tmp_path / "out.csv")
    assert not marker.exists() and not (tmp_path / "out.csv").exists()
    # a bad checkpoint is reported before the input is even opened
    with pytest.raises(CheckpointError, match="no such file"):
        predict(tmp_path / "missing.ckpt", crafted, tmp_path / "out.csv")
    assert not marker.exists()


def test_folder_in_natural_name_order(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["img1.png", "img2.png", "img3.png", "img10.png", "IMG11.png"]  # the natural order
    colours = [0, 2, 1, 1, 2]
    for name, c in zip(names, colours):
        write_png(torch.from_numpy(colour_images([c])[0]).permute(2, 0, 1).contiguous(), str(folder / name))
    (folder / "notes.txt").write_text("not an image")
    out = predict(ckpt, folder, tmp_path / "p.csv", include_file=True)
    rows = read_csv(out)
    assert rows[0] == ["id", "label", "file"]
    assert rows[1:] == [[str(i), CLASSES[c], n] for i, (n, c) in enumerate(zip(names, colours))]
    assert sorted(names, key=natural_key) == names


def test_hydra_config_run(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", colour_images(PATTERN))
    out = predict_mod.run([f"ckpt_path={ckpt}", f"input={tmp_path / 'x.npy'}", f"output={tmp_path / 'p.csv'}",
                           "tta.enabled=true"], tmp_path / "job")
    assert read_csv(out) == expected_rows(PATTERN)  # colour is flip/shift invariant


def test_other_sizes_need_resize(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", colour_images(PATTERN, size=20))
    with pytest.raises(PredictionError, match=r"20x20 pixels but the model takes 32x32; pass resize=true"):
        predict(ckpt, tmp_path / "x.npy", tmp_path / "p.csv")
    out = predict(ckpt, tmp_path / "x.npy", tmp_path / "p.csv", resize=True)
    assert read_csv(out) == expected_rows(PATTERN)
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(torch.zeros(3, 40, 24, dtype=torch.uint8), str(folder / "a.png"))
    with pytest.raises(PredictionError, match=r"image a.png is 24x40 pixels"):
        predict(ckpt, folder, tmp_path / "q.csv")


def test_class_names_from_the_data_when_the_checkpoint_has_none(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "plain.ckpt", class_names=False)
    np.save(tmp_path / "x.npy", colour_images([2, 0]))
    rows = read_csv(predict(ckpt, tmp_path / "x.npy", tmp_path / "p.csv"))
    assert [r[0] for r in rows] == ["id", "0", "1"] and rows[1][1] != rows[2][1]


BAD_INPUTS = [
    ("empty", lambda p: p.mkdir(), "holds no image files"),
    ("missing.npy", lambda p: None, "no such file or folder"),
    ("float.npy", lambda p: np.save(p, np.zeros((2, 32, 32, 3), np.float32)), "must be uint8"),
    ("gray.npy", lambda p: np.save(p, np.zeros((2, 32, 32), np.uint8)), "expected images of shape"),
    ("one.npy", lambda p: np.save(p, np.zeros((32, 32, 3), np.uint8)), r"x\[None\]"),
    ("none.npy", lambda p: np.save(p, np.zeros((0, 32, 32, 3), np.uint8)), "holds no images"),
    ("text.pkl", lambda p: p.write_text("hello"), "is not a pickle file"),
    ("empty.pkl", lambda p: p.write_bytes(b""), "is empty"),
    ("junk.npy", lambda p: p.write_text("junk"), "not a readable .npy"),
    ("dict.pkl", lambda p: p.write_bytes(pickle.dumps({"x": 1})), "without a 'data' entry"),
    ("list.pkl", lambda p: p.write_bytes(pickle.dumps([1, 2])), "holds a list"),
]


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message(ckpt: Path, tmp_path: Path, name: str, make, message: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(PredictionError, match=message):
        predict(ckpt, path, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_bad_options(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", colour_images(PATTERN))
    with pytest.raises(PredictionError, match="label_format"):
        predict(ckpt, tmp_path / "x.npy", tmp_path / "p.csv", label_format="title")
    with pytest.raises(PredictionError, match="corrupt.png"):
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG garbage")
        predict(ckpt, tmp_path / "imgs", tmp_path / "p.csv")


@pytest.mark.slow  # two fresh interpreters importing Lightning
def test_cli_success_and_clean_error(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", colour_images(PATTERN))
    proc = run_cli([f"ckpt_path={ckpt}", f"input={tmp_path / 'x.npy'}", f"output={tmp_path / 'p.csv'}",
                    "label_format=index"], tmp_path, script="cifar_lab.predict")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_csv(tmp_path / "p.csv") == expected_rows(PATTERN, names=False)
    (tmp_path / "empty").mkdir()
    proc = run_cli([f"ckpt_path={ckpt}", f"input={tmp_path / 'empty'}"], tmp_path, script="cifar_lab.predict")
    assert proc.returncode == 2
    assert f"Error: input folder {tmp_path / 'empty'} holds no image files" in proc.stderr
    assert "Traceback" not in proc.stderr
