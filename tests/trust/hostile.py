"""Builders of hostile inputs, one family per function, each written around the mechanism it attacks.

Every builder takes a copy of a real finished run (``run``), a ``victim`` folder holding files the
attack tries to reach, and the ``marker`` path a payload would create if any code ran; it changes the
run (or makes an input) and returns what the test needs. The families:

- interpolation: ``${...}`` in saved data (checkpoint hyper_parameters, stored overrides,
  .hydra/config.yaml, .hydra/overrides.yaml), in different keys and at different depths;
- replay: stored overrides that aim Hydra, loggers, callbacks or paths at other places, or name a
  config group option outside the shipped tree;
- callback_state: ModelCheckpoint state naming files outside the run (plain, ``file://``, other
  fsspec protocols);
- symlink: a file or folder of the run directory replaced by a link to a victim;
- yaml_bomb: a small YAML of nested aliases;
- image_bomb: a PNG whose header declares 20000x20000 pixels;
- crafted_onnx: ONNX models with cifar-lab's metadata whose graphs allocate more than any machine has,
  lack the ``probs`` output, give it another rank or class count, or take another input;
- formula_classifier: a working ONNX classifier whose class names are spreadsheet formulas (OWASP's
  CSV-injection starts: = + - @ tab CR);
- storage: sweep storage settings naming places a study cannot live (read-only SQLite URIs, SQLite
  URI filenames, journals on virtual, device or folder paths).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

OVERRIDES_KEY = "overrides"


def payload(marker: Path) -> dict[str, Any]:
    """A node that would create ``marker`` if Hydra built it (os.makedirs is on no allow-list)."""
    return {"_target_": "os.makedirs", "name": str(marker), "exist_ok": True}


def checkpoints_of(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("*.ckpt"))


def edit_checkpoints(run: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to every checkpoint of the run (best and last alike)."""
    for path in checkpoints_of(run):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)


def _model(checkpoint: dict) -> dict:
    return checkpoint["hyper_parameters"]["model"]


# ----------------------------------------------------------------------------- interpolation
def _create(marker: Path) -> str:
    return "${oc.create:" + yaml.safe_dump(payload(marker), default_flow_style=True).strip() + "}"


INTERPOLATIONS: dict[str, Callable[[Path, Path], None]] = {}


def interpolation(name: str):
    def register(fn: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        INTERPOLATIONS[name] = fn
        return fn
    return register


@interpolation("hparams_model_value_creates_node")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: _model(c).__setitem__("dropout", _create(marker)))


@interpolation("hparams_model_value_reads_env")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: _model(c).__setitem__("fc_units", "${oc.env:HOME}"))


@interpolation("hparams_nested_in_list_decode")
def _(run: Path, marker: Path) -> None:
    text = "${oc.decode:'" + yaml.safe_dump(payload(marker), default_flow_style=True).strip() + "'}"
    edit_checkpoints(run, lambda c: _model(c).__setitem__("filters", [8, text]))


@interpolation("hparams_whole_model_node")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: c["hyper_parameters"].__setitem__("model", _create(marker)))


@interpolation("hparams_target_is_interpolated")
def _(run: Path, marker: Path) -> None:
    def change(c: dict) -> None:
        c["hyper_parameters"]["evil"] = payload(marker)
        _model(c)["_target_"] = "${evil._target_}"
    edit_checkpoints(run, change)


@interpolation("hparams_self_reference")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: _model(c).__setitem__("fc_units", "${model.fc_units}"))


@interpolation("hparams_escaped_interpolation")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: _model(c).__setitem__("fc_units", "\\${oc.env:HOME}"))


@interpolation("hparams_data_reads_env")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: c["hyper_parameters"]["data"].__setitem__("root", "${oc.env:HOME}"))


@interpolation("overrides_yaml_value")
def _(run: Path, marker: Path) -> None:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    overrides.append("data.eval_batch_size=${oc.env:HOME}")
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


@interpolation("stored_overrides_of_a_lone_checkpoint")
def _(run: Path, marker: Path) -> None:
    (run / ".hydra" / "overrides.yaml").unlink()
    edit_checkpoints(run, lambda c: c[OVERRIDES_KEY].append("data.mean=" + _create(marker)))


@interpolation("hydra_config_yaml_when_hparams_lack_the_model")
def _(run: Path, marker: Path) -> None:
    edit_checkpoints(run, lambda c: c["hyper_parameters"].pop("model"))
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    config["model"]["dropout"] = _create(marker)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))


# ----------------------------------------------------------------------------- replay
def replay_overrides(victim: Path) -> dict[str, str]:
    """Stored overrides that point somewhere else (never replayed: the command succeeds, nothing moves)."""
    return {
        "hydra_group_relative_path": f"hydra/job_logging=../../../../{victim.name}/x",
        "hydra_run_dir": f"hydra.run.dir={victim}",
        "report_output_dir": f"callbacks.report.output_dir={victim}",
        "added_logger": "+logger.evil={_target_:lightning.pytorch.loggers.CSVLogger,save_dir:" + str(victim) + "}",
        "remote_tracking": "logger=mlflow",
        "paths_output_dir": f"paths.output_dir={victim}",
        "checkpoint_dirpath": f"callbacks.model_checkpoint.dirpath={victim}",
    }


# Stored group choices outside the shipped tree: refused.
UNSHIPPED_CHOICES = {
    "data_group_traversal": "data=../../../../etc",
    "experiment_from_another_group": "experiment=../hparams_search/optuna",
    "augment_missing_option": "augment=not_shipped",
}


def add_override(run: Path, override: str) -> None:
    path = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text())
    overrides.append(override)
    path.write_text(yaml.safe_dump(overrides))
    edit_checkpoints(run, lambda c: c[OVERRIDES_KEY].append(override))


# ----------------------------------------------------------------------------- callback state
def callback_state_paths(victim: Path) -> dict[str, Callable[[dict], None]]:
    """Ways a ModelCheckpoint state could name the victim's files (each a change of one state dict).

    Lightning itself keeps plain local paths outside its folder, but removes any path whose protocol
    is not ``file`` (``local://`` is the local filesystem under another name) recursively: the
    ``local_protocol`` variants delete the victim when nothing guards the state.
    """
    file, folder = str(victim / "precious.txt"), str(victim)

    def worst_kept(path: str) -> Callable[[dict], None]:
        def change(state: dict) -> None:  # the only kept checkpoint, worse than anything: replaced (deleted) next
            state.update(best_k_models={path: torch.tensor(-1e9)}, kth_best_model_path=path,
                         kth_value=torch.tensor(-1e9), best_model_path=path, best_model_score=torch.tensor(-1e9))
        return change

    return {
        "kth_best_local_protocol_folder": worst_kept(f"local://{folder}"),
        "kth_best_local_protocol_file": worst_kept(f"local://{file}"),
        "last_model_path_local_protocol": lambda s: s.__setitem__("last_model_path", f"local://{file}"),
        "kth_best_plain_folder": worst_kept(folder),
        "last_model_path_file_url": lambda s: s.__setitem__("last_model_path", f"file://{file}"),
        "best_model_path_relative": lambda s: s.__setitem__("best_model_path", f"../../{victim.name}/precious.txt"),
    }


def edit_checkpoint_callback_state(run: Path, change: Callable[[dict], None]) -> None:
    """``change`` every ModelCheckpoint state, aimed at this run's own folder (so Lightning restores it)."""
    def apply(checkpoint: dict) -> None:
        for name, state in checkpoint.get("callbacks", {}).items():
            if name.startswith("ModelCheckpoint"):
                state["dirpath"] = os.path.realpath(run / "checkpoints")
                change(state)
    edit_checkpoints(run, apply)


# ----------------------------------------------------------------------------- symlink
SYMLINKED = (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "config.yaml", "train.log",
             "checkpoints", "tensorboard")


def symlink(run: Path, relative: str, victim: Path) -> None:
    """Replace ``run/relative`` by a link to a victim file (or folder, for a folder)."""
    path = run / relative
    target = victim if path.is_dir() else victim / "precious.txt"
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(target)


# ----------------------------------------------------------------------------- bombs
def yaml_bomb(levels: int = 9) -> str:
    """About 1 KB that expands to 10**levels strings when aliases are followed."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join(f"*a{i - 1}" for _ in range(10))
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (1 + width * 3) * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- crafted exported models
def _onnx_model(nodes: list, inputs: list, outputs: list, initializers: list = (), classes: int = 10,
                names: list[str] | None = None):
    """An ONNX model with cifar-lab's metadata around any graph."""
    import json

    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "crafted", inputs, outputs, initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    names = names if names is not None else [f"c{i}" for i in range(classes)]
    for key, value in {"producer": "cifar-lab", "class_names": json.dumps(names),
                       "image_size": "32"}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model


def _images_input():
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, 32, 32])


def _const(name: str, values: list[int]):
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _probs(shape: list) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("probs", TensorProto.FLOAT, shape)


def _float_images(out: str = "x") -> list:
    from onnx import TensorProto, helper

    return [helper.make_node("Cast", ["images"], [out], to=TensorProto.FLOAT)]


def _crafted_onnx() -> dict[str, Callable[[], Any]]:
    from onnx import TensorProto, helper

    huge = 1 << 40  # elements per dimension: no machine allocates the product, whatever it overcommits
    return {
        # an allocation no machine makes, from a constant shape and from the input's own shape
        "huge_constant": lambda: _onnx_model(
            [helper.make_node("ConstantOfShape", ["shape"], ["probs"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.1]))],
            [_images_input()], [_probs([huge, huge])], [_const("shape", [huge, huge])]),
        "huge_expand": lambda: _onnx_model(
            [*_float_images(), helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, axes=[1, 2, 3]),
             helper.make_node("Unsqueeze", ["m", "one"], ["m2"]),
             helper.make_node("Expand", ["m2", "shape"], ["probs"])],
            [_images_input()], [_probs(["N", huge])], [_const("shape", [huge, huge]), _const("one", [1])]),
        # the outputs a classifier must not lack or shape otherwise
        "no_probs_output": lambda: _onnx_model(
            [*_float_images(), helper.make_node("ReduceMean", ["x"], ["logits"], keepdims=0, axes=[2, 3])],
            [_images_input()], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]),
        "rank_1_output": lambda: _onnx_model(
            [*_float_images(), helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0, axes=[1, 2, 3])],
            [_images_input()], [_probs(["N"])]),
        "rank_4_output": lambda: _onnx_model(
            [*_float_images(), helper.make_node("Identity", ["x"], ["probs"])], [_images_input()],
            [_probs(["N", 3, 32, 32])]),
        # rank 2 as declared, but the wrong number of classes (3 columns, 10 class names)
        "wrong_class_count": lambda: _onnx_model(
            [*_float_images(), helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0, axes=[2, 3])],
            [_images_input()], [_probs(["N", 3])]),
        # an undeclared output shape that turns out rank 1 when run
        "undeclared_rank_1": lambda: _onnx_model(
            [*_float_images(), helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0, axes=[1, 2, 3])],
            [_images_input()], [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)]),
        "another_input_name": lambda: _onnx_model(
            [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0, axes=[2, 3])],
            [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, 32, 32])], [_probs(["N", 3])],
            classes=3),
    }



def crafted_onnx(name: str, path: Path) -> Path:
    """Write the crafted ONNX model ``name`` (one of :func:`crafted_onnx_names`) to ``path``."""
    import onnx

    onnx.save(_crafted_onnx()[name](), str(path))
    return path


def crafted_onnx_names() -> list[str]:
    return list(_crafted_onnx())


# ----------------------------------------------------------------------------- sweep storage
def storage_settings(victim: Path, elsewhere: Path) -> dict[str, str]:
    """hydra.sweeper.storage values naming places a study cannot live (``elsewhere``: a folder outside the
    job, where nothing may appear)."""
    return {
        "sqlite_uri_read_only": f"sqlite:///file:{elsewhere}/ro.db?mode=ro&uri=true",
        "sqlite_uri_read_only_in_uri": f"sqlite:///file:{elsewhere}/ro.db%3Fmode%3Dro?uri=true",
        "sqlite_uri_immutable": f"sqlite:///file:{elsewhere}/im.db?immutable=1&uri=true",
        "sqlite_uri_other_host": "sqlite:///file://elsewhere.example/x.db?uri=true",
        "sqlite_on_a_folder": f"sqlite:///{victim}",
        "journal_on_a_virtual_file": "journal:/proc/version",
        "journal_new_in_a_virtual_folder": "journal:/proc/cifar_lab_study.log",
        "journal_on_a_device": "journal:/dev/null",
        "journal_on_a_folder": f"journal:{victim}",
    }


# ----------------------------------------------------------------------------- spreadsheet formulas
# OWASP's CSV-injection starts: what a spreadsheet evaluates (or starts evaluating) in a cell
FORMULAS = {"equals": "=cmd|' /C calc'!A0", "plus": "+1+cmd|' /C calc'!A0", "minus": "-2+3+cmd|' /C calc'!A0",
            "at": "@SUM(1+1)*cmd|' /C calc'!A0", "tab": "\t=1+1", "carriage_return": "\r=1+1"}


def formula_classifier(path: Path, formula: str) -> Path:
    """A valid classifier (3 classes: the image's channel means) whose class names are all spreadsheet formulas."""
    import onnx
    from onnx import helper

    nodes = [*_float_images(), helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0, axes=[2, 3])]
    onnx.save(_onnx_model(nodes, [_images_input()], [_probs(["N", 3])], names=[f"{formula}{i}" for i in range(3)]),
              str(path))
    return path
