"""Sizes of one benchmark run: the full run, ``--quick`` and the tiny runs of the tests."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# the models timed by default; ``--models`` picks from MODEL_CHOICES
MODELS = ("simple_cnn", "resnet_se", "attention_net")
# speedrun_net is composed as ``experiment=speedrun`` (its optimizer, augmentation, batch 1024)
MODEL_CHOICES = (*MODELS, "speedrun_net")


@dataclass
class Settings:
    """Sizes of one benchmark run; ``--quick`` and the full run differ only here."""

    quick: bool = False
    batch_size: int = 128
    workers: int = 2
    # Many short interleaved repeats: on a shared machine the load changes within seconds,
    # and medians over short alternating blocks follow it far better than a few long ones.
    repeats: int = 8  # interleaved repeats per comparison
    data_batches: int = 40  # timed batches per data repeat
    data_warmup: int = 4
    train_steps: int = 2  # timed training steps per repeat
    train_warmup: int = 2  # untimed steps before a runner's first repeat
    heavy_batch_size: int = 128  # batch size of resnet_se and attention_net
    overhead_steps: int = 60
    overhead_warmup: int = 5
    overhead_repeats: int = 3
    generated_train: int = 20000
    generated_test: int = 2000
    memory_batches: int = 100
    ablation: bool = True
    models: tuple[str, ...] = MODELS
    speedrun_batch_size: int = 1024  # speedrun_net's batch, as in conf/experiment/speedrun.yaml
    speedrun: bool = True  # the speedrun step's GFLOP/s against the matmul peaks
    speedrun_steps: int = 5  # timed speedrun steps (each paired with one sample of each peak)
    speedrun_warmup: int = 2
    peak_size: int | None = None  # n of the n x n matmul peaks (None: efficiency.default_peak_size)

    def batch_for(self, model: str) -> int:
        """The training batch size the benchmark uses for ``model``."""
        if model == "simple_cnn":
            return self.batch_size
        return self.speedrun_batch_size if model == "speedrun_net" else self.heavy_batch_size

    @classmethod
    def for_run(cls, args: argparse.Namespace) -> "Settings":
        s = cls()
        if args.quick:
            s = cls(quick=True, repeats=2, data_batches=12, data_warmup=3, train_steps=1, train_warmup=1,
                    heavy_batch_size=8, overhead_steps=16, overhead_warmup=3, overhead_repeats=1,
                    generated_train=6000, generated_test=500, memory_batches=20, ablation=False,
                    speedrun_batch_size=128, speedrun=False, speedrun_steps=2, speedrun_warmup=1)
        if args.steps is not None:  # a tiny run for tests: every count scaled down
            n = max(1, args.steps)
            s.train_steps = n
            s.train_warmup = 1
            s.data_batches = max(2, n)
            s.data_warmup = 1
            s.overhead_steps = max(3, n + 2)
            s.overhead_warmup = 1
            s.memory_batches = max(2, n)
            s.speedrun_steps = n
            s.speedrun_warmup = 1
            # a 2048 bf16 product takes about 27 s where bf16 is emulated (AMD EPYC Zen 3): 256 takes 0.05 s
            s.peak_size = 256
        if args.repeats is not None:
            s.repeats = s.overhead_repeats = max(1, args.repeats)
        if args.batch_size is not None:
            s.batch_size = args.batch_size
            s.heavy_batch_size = min(s.heavy_batch_size, args.batch_size)
        if args.heavy_batch_size is not None:
            s.heavy_batch_size = args.heavy_batch_size
        if args.generated_size is not None:
            s.generated_train = args.generated_size
            s.generated_test = max(100, args.generated_size // 10)
        if args.ablation is not None:
            s.ablation = args.ablation
        if getattr(args, "speedrun", None) is not None:
            s.speedrun = args.speedrun
        if getattr(args, "speedrun_batch_size", None) is not None:
            s.speedrun_batch_size = args.speedrun_batch_size
        if args.models:
            s.models = tuple(args.models)
        s.workers = args.workers
        return s
