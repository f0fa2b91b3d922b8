"""Model zoo table: size, cost, reported accuracy and CPU speed of every ``conf/model`` config.

Usage::

    python -m cifar_lab.zoo                      # print the Markdown table
    python -m cifar_lab.zoo --out docs/models.md # also write it to a file
    python -m cifar_lab.zoo --out docs/models.md --threads 1 --clock process  # how docs/models.md is made
    python -m cifar_lab.zoo --models simple_cnn resnet_se --no-speed

Each config is composed with Hydra (``+model=<name> +data.num_classes=10``) and
built with :func:`cifar_lab.models.build_network`. Multiply-accumulates are
``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 for one 3x32x32 image in
eval mode; they cover convolutions and matrix products (linear layers, the
branch-mixing contractions), not elementwise ops, pooling or normalisation.
Speed is CPU inference (eval mode, ``no_grad``, batch 256, channels_last when the
config asks for it): the median of ``--repeats`` timed batches after ``--warmup``,
timed by wall clock or, with ``--clock process``, by this process's CPU time
(steady on a shared machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from cifar_lab.models import build_network

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Top-1 CIFAR-10 test accuracy (%) stated by the report each config reproduces (see SPEC.md).
REPORT_ACCURACY = {
    "simple_cnn": "71 untuned, 74.7 tuned",
    "simple_cnn_bn": "71 untuned, 74.7 tuned",
    "pseudo_se_net": "49.75",
    "conv_block_net": "88.85",
    "attention_net": "91.7",
    "resnet_se": "97.00 (96.76 with mixup)",
    "efficientnet": "33.8 (ImageNet stem)",
    "squeezenet": "54-56",
    "torchvision": ">90 (pretrained, fine-tuned)",
}


def model_names(conf_dir: Path) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "model").glob("*.yaml"))


def compose_model(conf_dir: Path, name: str):
    """The composed ``model`` node of ``conf/model/<name>.yaml`` with ``data.num_classes=10``."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+model={name}", "+data.num_classes=10"])
    return cfg.model


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(net: torch.nn.Module, size: int = 32) -> int:
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        net(torch.randn(1, 3, size, size))
    return counter.get_total_flops() // 2


@torch.no_grad()
def images_per_second(net: torch.nn.Module, channels_last: bool, batch_size: int = 256, warmup: int = 1,
                      repeats: int = 3, clock: str = "wall") -> float:
    """Median throughput over ``repeats`` batches. ``clock="process"`` divides by this process's
    CPU time instead of wall time (equal on an idle machine with one thread, unaffected by other load)."""
    timer = time.process_time if clock == "process" else time.perf_counter
    net.eval()
    x = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        net(x)
    times = []
    for _ in range(repeats):
        start = timer()
        net(x)
        times.append(timer() - start)
    return batch_size / statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_macs(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}G"


def build_table(conf_dir: Path, names: list[str], speed: bool = True, batch_size: int = 256, warmup: int = 1,
                repeats: int = 3, clock: str = "wall", log=print,
                command: str = "python -m cifar_lab.zoo") -> str:
    rows = []
    for name in names:
        cfg = compose_model(conf_dir, name)
        torch.manual_seed(0)
        net = build_network(cfg)
        target = str(cfg.get("_target_", "")).rsplit(".", 1)[-1]
        if name == "torchvision":
            target += f" ({cfg.get('arch')})"
        params, macs = count_params(net), count_macs(net)
        ips = "-"
        if speed:
            channels_last = bool(cfg.get("channels_last", False))
            ips = f"{images_per_second(net, channels_last, batch_size, warmup, repeats, clock):,.0f}"
        rows.append(f"| `{name}` | {target} | {_fmt_int(params)} | {_fmt_macs(macs)} | "
                    f"{REPORT_ACCURACY.get(name, '-')} | {ips} |")
        log(f"{name}: {params:,} params, {macs / 1e6:,.1f}M MACs, {ips} img/s", flush=True)
    header = [
        "# Model zoo",
        "",
        f"Generated by `{command}`; one row per `conf/model/*.yaml`",
        "(composed with `data.num_classes=10`).",
        "",
        "- **Params**: trainable parameters.",
        "- **MACs**: multiply-accumulates for one 3x32x32 image (`FlopCounterMode` FLOPs / 2:",
        "  convolutions and matrix products; elementwise ops, pooling and normalisation not counted).",
        "- **Report acc.**: CIFAR-10 test accuracy (%) stated by the report the config follows",
        "  (SPEC.md; their budgets and GPUs), not measured here.",
        f"- **CPU img/s**: inference, eval mode, `no_grad`, batch {batch_size}, channels_last as configured,",
        f"  median of {repeats} timed batches after {warmup} warm-up; torch {torch.__version__},",
        f"  {torch.get_num_threads()} intra-op thread(s), {_cpu_name()}; "
        + ("images per second of this process's CPU time (`--clock process`: wall-clock speed on an idle"
           " core, unaffected by other load)." if clock == "process" else "wall-clock time (`--clock wall`)."),
        "",
        "| Config | Network | Params | MACs | Report acc. (%) | CPU img/s |",
        "|---|---|---:|---:|---|---:|",
    ]
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR, help="config root holding model/")
    parser.add_argument("--models", nargs="*", help="config names (default: all of conf/model)")
    parser.add_argument("--no-speed", action="store_true", help="skip the CPU timing")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="time batches by wall clock or by this process's CPU time (stable on a busy machine)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m cifar_lab.zoo", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)

    conf_dir = args.conf_dir.resolve()
    names = args.models or model_names(conf_dir)
    table = build_table(conf_dir, names, not args.no_speed, args.batch_size, args.warmup, args.repeats,
                        args.clock, log=lambda *a, **k: print(*a, file=sys.stderr, **k), command=command)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
