"""Config validation: a bad value stops the run at once with one message naming key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_lab import builders
from cifar_lab.config.schema import ConfigError, find_problems, validate_config
from cifar_lab.cli.train import train
from conftest import ROOT, SYNTH, compose_cfg, run_cli

# (overrides, the message's "key=value" part, words of what is allowed)
BAD_VALUES = [
    (["data.batch_size=0"], "data.batch_size=0", "an integer >= 1"),
    (["data.batch_size=-8"], "data.batch_size=-8", "an integer >= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0", "an integer >= 1, or null"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum=1.5", "a number in [0, 1)"),
    (["data.augment.flip.p=1.5"], "data.augment.flip.p=1.5", "a number in [0, 1]"),
    (["+data.augment.gray={_target_:cifar_lab.data.augment.RandomGrayscale,p:-0.2}"],
     "data.augment.gray.p=-0.2", "a number in [0, 1]"),
    (["experiment=resnet_se", "data.mixing.prob=1.2"], "data.mixing.prob=1.2", "a number in [0, 1]"),
    (["experiment=resnet_se", "data.mixing.mixup_alpha=0"], "data.mixing.mixup_alpha=0", "a number > 0"),
    (["experiment=resnet_se", "data.mixing.mixup_alpha=-1"], "data.mixing.mixup_alpha=-1", "a number > 0"),
    (["data.val_size=600"], "data.val_size=600", "less than 600"),
    (["data.val_size=-1"], "data.val_size=-1", "an integer >= 0"),
    (["data.augment.crop.size=48"], "data.augment.crop.size=48", "at most the padded image, 40x40"),
    (["data.augment.crop.padding=-2"], "data.augment.crop.padding=-2", "non-negative"),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed", "float16 needs a GPU"),
    (["trainer.precision=64"], "trainer.precision=64", "32, bf16-mixed or 16-mixed"),
    (["trainer.precision=64-true"], "trainer.precision=64-true", "precisions that cast the whole network"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true", "32, bf16-mixed or 16-mixed"),
    (["data.pipeline=fast"], "data.pipeline=fast", "one of 'batched', 'per_image'"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", "an integer >= 1, or -1"),
    (["seed=-3"], "seed=-3", "an integer in [0, 4294967295]"),
    (["scheduler.interval=batch"], "scheduler.interval=batch", "one of 'epoch', 'step'"),
    (["module.label_smoothing=1.0"], "module.label_smoothing=1.0", "a number in [0, 1)"),
    (["autotune.probe_slower=1"], "autotune.probe_slower=1", "a number > 1"),
    (["autotune.give_up_first=0.5"], "autotune.give_up_first=0.5", "a number > 1"),
    (["optimized_metric=val/accuracy"], "optimized_metric=val/accuracy", "'val/acc'"),
    (["optimized_metric=test/acc"], "optimized_metric=test/acc", "'val/acc_best'"),
    (["callbacks.model_checkpoint.monitor=val/acc1"], "callbacks.model_checkpoint.monitor=val/acc1", "'val/acc'"),
    (["+trainer.limit_val_batches=0"], "optimized_metric=val/acc_best", "validation off"),
    (["data.drop_last=true", "data.batch_size=500"], "data.batch_size=500", "at most 400"),
    (["data.num_classes=1"], "data.num_classes=1", "an integer >= 2"),
    (["data.std=[0.2,0.0,0.2]"], "data.std=[0.2, 0.0, 0.2]", "a list of 3 values, each a number > 0"),
]


# Values the constructors refuse themselves (no schema rule): (overrides, the node named, the library's words).
# They must stop the run as one ConfigError before any data is read.
REFUSED_BY_CONSTRUCTORS = [
    (["optimizer.lr=-0.1"], "optimizer (torch.optim.AdamW)", "Invalid learning rate: -0.1"),
    (["optimizer.weight_decay=-0.01"], "optimizer (torch.optim.AdamW)", "Invalid weight_decay value: -0.01"),
    (["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer (torch.optim.SGD)",
     "Nesterov momentum requires a momentum and zero dampening"),
    (["model=simple_cnn_bn", "model.dropout=1.5"], "model (cifar_lab.models.simple_cnn.SimpleCNN)",
     "dropout probability has to be between 0 and 1, but got 1.5"),
    (["trainer.precision=fp16"], "trainer (lightning.pytorch.Trainer)", "Precision 'fp16' is invalid"),
    (["trainer.accelerator=gpus"], "trainer (lightning.pytorch.Trainer)", "invalid accelerator name"),
    (["trainer.gradient_clip_algorithm=clip"], "trainer (lightning.pytorch.Trainer)",
     "`gradient_clip_algorithm` clip is invalid"),
    (["scheduler=plateau", "scheduler.scheduler.factor=2"], "scheduler.scheduler (torch.optim.lr_scheduler.ReduceLROnPlateau)",
     "Factor should be < 1.0"),
    (["scheduler=cosine_warmup", "scheduler.scheduler.warmup_epochs=50"],
     "scheduler.scheduler (cifar_lab.optim.schedules.warmup_cosine)", "warmup_epochs=50 must lie in [0, T_max="),
]


def _no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the datamodule (the first step that reads data) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the datamodule was built: the refusal came after the first expensive step")
    monkeypatch.setattr(builders, "build_datamodule", refuse)


@pytest.mark.parametrize("overrides,node,words", REFUSED_BY_CONSTRUCTORS, ids=[" ".join(r[0]) for r in REFUSED_BY_CONSTRUCTORS])
def test_value_refused_by_its_constructor_stops_before_any_data(tmp_path: Path, monkeypatch, overrides, node,
                                                                 words) -> None:
    # cifar10 from a folder that does not exist: reading data would fail with a DataError instead
    cfg = compose_cfg(["model=simple_cnn", f"data.root={tmp_path / 'no-data'}", "data.source.download=false",
                       *overrides], tmp_path / "run")
    assert find_problems(cfg) == []  # no schema rule repeats the library's check
    _no_data(monkeypatch)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"invalid config: {node}: ") and words in message, message
    assert "\n" not in message  # one line
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("overrides,shown,allowed", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_is_named_with_what_is_allowed(tmp_path: Path, overrides, shown, allowed) -> None:
    recipe = any(o.startswith("experiment=") for o in overrides)
    base = [o for o in SYNTH if o != "model=simple_cnn"] if recipe else SYNTH
    cfg = compose_cfg([*base, *overrides], tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith("invalid config")
    line = next(line for line in message.splitlines() if shown in line)
    assert allowed in line, line


def test_known_dataset_size_checked_before_loading(tmp_path: Path) -> None:
    cfg = compose_cfg(["model=simple_cnn", "data=cifar10", "data.val_size=50000", f"data.root={tmp_path}"],
                      tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.val_size=50000: must be less than 50000 \(the cifar10 training set"):
        validate_config(cfg)
    cfg = compose_cfg(["model=simple_cnn", "data=cifar100", "data.num_classes=10"], tmp_path / "run")
    with pytest.raises(ConfigError, match="data.num_classes=10: must be 100 for cifar100"):
        validate_config(cfg)


def test_misspelt_argument_is_refused_with_suggestion(tmp_path: Path) -> None:
    cfg = compose_cfg([*SYNTH, "+model.dropuot=0.5", "+callbacks.model_checkpoint.save_lst=true"], tmp_path / "run")
    message = str(pytest.raises(ConfigError, validate_config, cfg).value)
    assert message.startswith("invalid config (2 problems):")
    assert "model.dropuot: not an argument of cifar_lab.models.simple_cnn.SimpleCNN (did you mean dropout?)" in message
    assert "callbacks.model_checkpoint.save_lst: not an argument of" in message and "save_last?" in message


def test_every_problem_in_one_message(tmp_path: Path) -> None:
    cfg = compose_cfg([*SYNTH, "data.batch_size=0", "optimizer=sgd", "optimizer.momentum=1.5", "data.augment.flip.p=2"],
                      tmp_path / "run")
    message = str(pytest.raises(ConfigError, validate_config, cfg).value)
    assert message.splitlines()[0] == "invalid config (3 problems):"
    assert len(message.splitlines()) == 4


STOCK = [[f"experiment={p.stem}"] for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml"))] + [
    ["data=cifar100"], ["data=imagefolder"], ["data=synthetic"], ["trainer=ddp_cpu"], ["trainer=gpu"],
    ["hparams_search=optuna"], ["debug=overfit"], ["callbacks=none", "logger=tensorboard_csv"],
    *([f"scheduler={p.stem}"] for p in sorted((ROOT / "conf" / "scheduler").glob("*.yaml"))),
    *([f"model={p.stem}"] for p in sorted((ROOT / "conf" / "model").glob("*.yaml"))),
    *([f"optimizer={p.stem}"] for p in sorted((ROOT / "conf" / "optimizer").glob("*.yaml"))),
]


@pytest.mark.parametrize("overrides", STOCK, ids=[" ".join(o) for o in STOCK])
def test_stock_configs_are_valid(tmp_path: Path, overrides) -> None:
    assert find_problems(compose_cfg(overrides, tmp_path / "run")) == []


def test_train_stops_before_any_work(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg([*SYNTH, "data.batch_size=0"], tmp_path / "run")
    _no_data(monkeypatch)
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing printed, saved or built


def _only_message(stderr: str, first_line: str) -> None:
    """The error is one message (after Lightning's own start-up lines at most), with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    assert f"Error: {first_line}" in lines, stderr[-3000:]
    assert sum(line.startswith("Error: ") for line in lines) == 1


@pytest.mark.slow
def test_cli_bad_value_prints_one_message_and_exits_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*SYNTH, "optimizer.lr=-0.5", f"hydra.run.dir={run_dir}"], tmp_path, script="cifar_lab.cli.train")
    assert proc.returncode == 2, proc.stderr[-3000:]
    _only_message(proc.stderr, "invalid config: optimizer (torch.optim.AdamW): Invalid learning rate: -0.5")
    assert (run_dir / "error.txt").read_text().startswith("invalid config: optimizer (torch.optim.AdamW)")


@pytest.mark.slow
def test_cli_data_error_prints_one_message_and_exits_2(tmp_path: Path) -> None:
    proc = run_cli(["model=simple_cnn", f"data.root={tmp_path / 'empty'}", "data.source.download=false",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, script="cifar_lab.cli.train")
    assert proc.returncode == 2, proc.stderr[-3000:]
    _only_message(proc.stderr, f"no cifar10 data found: looked for {tmp_path / 'empty' / 'cifar-10-batches-py'} "
                               f"and {tmp_path / 'empty' / 'cifar-10-python.tar.gz'} (data.source.download=false).")


@pytest.mark.slow
@pytest.mark.skipif("main_guarded" not in (ROOT / "train.py").read_text(),
                    reason="train.py does not call cifar_lab.cli.train.main_guarded yet")
def test_top_level_train_py_prints_one_message_and_exits_2(tmp_path: Path) -> None:
    proc = run_cli([*SYNTH, "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _only_message(proc.stderr, "invalid config: data.batch_size=0: must be an integer >= 1")
