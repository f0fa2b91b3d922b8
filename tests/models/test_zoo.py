"""The model zoo table command."""

from __future__ import annotations

from cifar_lab.models import trainable_params
from cifar_lab.tools import zoo

from model_helpers import MODEL_CONF_DIR, MODEL_NAMES


def test_every_config_is_listed():
    assert zoo.model_names(MODEL_CONF_DIR.parent) == MODEL_NAMES


def test_compose_and_count():
    cfg = zoo.compose_model(MODEL_CONF_DIR.parent, "simple_cnn")
    assert cfg.num_classes == 10
    from hydra.utils import instantiate

    net = instantiate(cfg)
    assert trainable_params(net) == 3 * 32 * 9 + 32 + 32 * 64 * 9 + 64 + 4096 * 512 + 512 + 5130
    assert zoo.count_macs(net) == 32 * 27 * 1024 + 64 * 288 * 256 + 4096 * 512 + 5120


def test_table_and_out_file(tmp_path, capsys):
    out = tmp_path / "docs" / "models.md"
    zoo.main(["--models", "simple_cnn", "resnet_se", "--batch-size", "4", "--warmup", "0", "--repeats", "1",
              "--out", str(out)])
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "| `resnet_se` | ResNetSE | 4,993,166 |" in text
    assert "97.00" in text
    assert text.count("\n| `") == 2
