"""Milliseconds per batch: the hand-written batched ops vs their kornia-backed replacements.

The hand-written ops are the last version of the single-file ``cifar_lab/data/augment.py``
(read from git at run time, ``--handwritten-ref``, and loaded as a temporary module); the
kornia-backed ones are those of ``cifar_lab.data.augment``. Both run on the same uint8
``(B, 3, 32, 32)`` CPU batch with a seeded generator, as the datamodule calls them, one
intra-op thread (the batched path's setting, ``BatchAugment(cpu_threads=1)``) unless
``--threads`` says otherwise. Timings are interleaved (A B, B A, A B, ...): each sample is
``--calls`` calls of one op, and the table gives the median sample per call. The three
policies (no hand-written version) are timed per-image and per-batch selection.
``--jitter`` times the current hand-written colour jitter (``ColorJitter``, on-device
per-image orders) against kornia's (``KorniaColorJitter``) instead.

    python benchmarks/kornia_vs_handwritten.py                 # batch 128 and 512
    python benchmarks/kornia_vs_handwritten.py --batch-sizes 128 --repeats 5 --out table.md
    python benchmarks/kornia_vs_handwritten.py --jitter

Run it on an idle machine: it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kornia
import torch

import cifar_lab.data.augment as A

ROOT = Path(__file__).resolve().parents[1]
OLD_PATH = "cifar_lab/data/augment.py"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def handwritten_module(ref: str):
    """The single-file augment module at ``ref`` (``auto``: HEAD, else the parent of the
    commit that removed it), loaded from a temporary file; and the commit of its last change."""
    if ref == "auto":
        try:
            _git("cat-file", "-e", f"HEAD:{OLD_PATH}")
            ref = "HEAD"
        except subprocess.CalledProcessError:
            removed = _git("log", "-1", "--diff-filter=D", "--format=%H", "--", OLD_PATH).strip()
            if not removed:
                sys.exit(f"no {OLD_PATH} in this repository's history; pass --handwritten-ref")
            ref = f"{removed}^"
    commit = _git("log", "-1", "--format=%h", ref, "--", OLD_PATH).strip()  # its last change
    source = _git("show", f"{ref}:{OLD_PATH}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "handwritten_augment.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("handwritten_augment", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module, commit


def cases(old) -> dict[str, tuple]:
    """op name -> (hand-written op, kornia-backed op, recipe that uses it)."""
    return {
        "RandomGrayscale p=0.2": (old.RandomGrayscale(0.2), A.KorniaRandomGrayscale(0.2), "resnet_se"),
        "RandomAutocontrast p=0.2": (old.RandomAutocontrast(0.2), A.KorniaRandomAutocontrast(0.2), "resnet_se"),
        "ColorJitter 0.2/0.2/0.2/0.1": (old.ColorJitter(0.2, 0.2, 0.2, 0.1),
                                        A.KorniaColorJitter(0.2, 0.2, 0.2, 0.1), "squeezenet"),
        "ColorJitter 0.2/0.2/0.2/0": (old.ColorJitter(0.2, 0.2, 0.2, 0.0), A.KorniaColorJitter(0.2, 0.2, 0.2, 0.0),
                                      "conv_block_net"),
        "RandomRotation 15": (old.RandomRotation(15), A.RandomRotation(15), "squeezenet"),
        "Cutout 8": (old.Cutout(8), A.Cutout(8), "-"),
        "RandomErasing p=0.5": (old.RandomErasing(p=0.5), A.RandomErasing(p=0.5), "-"),
    }


def jitter_cases() -> dict[str, tuple]:
    """The current hand-written colour jitter against kornia's, as :func:`cases` lists them."""
    return {
        "ColorJitter 0.2/0.2/0.2/0.1": (A.ColorJitter(0.2, 0.2, 0.2, 0.1), A.KorniaColorJitter(0.2, 0.2, 0.2, 0.1),
                                        "squeezenet"),
        "ColorJitter 0.2/0.2/0.2/0": (A.ColorJitter(0.2, 0.2, 0.2, 0.0), A.KorniaColorJitter(0.2, 0.2, 0.2, 0.0),
                                      "conv_block_net"),
    }


def policies() -> dict[str, torch.nn.Module]:
    return {
        "RandAugment n=2 m=9, per image": A.RandAugment(2, 9),
        "RandAugment n=2 m=9, per batch": A.RandAugment(2, 9, selection="batch"),
        "TrivialAugment, per image": A.TrivialAugment(),
        "TrivialAugment, per batch": A.TrivialAugment(selection="batch"),
        "AutoAugment cifar10, per image": A.AutoAugment(),
        "AutoAugment cifar10, per batch": A.AutoAugment(selection="batch"),
    }


def sample_ms(op, x: torch.Tensor, generator: torch.Generator, calls: int) -> float:
    """Milliseconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        op(x, generator)
    return (time.perf_counter() - start) * 1e3 / calls


def interleaved(ops: list, x: torch.Tensor, repeats: int, calls: int) -> list[float]:
    """Median ms per call of each op, sampled in alternating order."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(ops))]
    for op, g in zip(ops, generators):  # warm-up
        sample_ms(op, x, g, 2)
    samples: list[list[float]] = [[] for _ in ops]
    for r in range(repeats):
        order = range(len(ops)) if r % 2 == 0 else reversed(range(len(ops)))
        for i in order:
            samples[i].append(sample_ms(ops[i], x, generators[i], calls))
    return [statistics.median(s) for s in samples]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=9, help="interleaved samples per op")
    ap.add_argument("--calls", type=int, default=10, help="calls per sample")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the batched path uses 1)")
    ap.add_argument("--handwritten-ref", default="auto", help="git revision of the single-file augment.py")
    ap.add_argument("--skip-policies", action="store_true")
    ap.add_argument("--jitter", action="store_true",
                    help="only the current hand-written ColorJitter against kornia's (no policies)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.jitter:
        args.skip_policies = True
    old, commit = handwritten_module(args.handwritten_ref)
    load_start = os.getloadavg()[0]
    head = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.threads} torch thread(s)",
        f"torch {torch.__version__}, kornia {kornia.__version__}, Python {platform.python_version()}; "
        + ("hand-written: the current cifar_lab.data.augment.ColorJitter" if args.jitter
           else f"hand-written ops from {OLD_PATH} at {commit}"),
        f"command: python benchmarks/kornia_vs_handwritten.py {' '.join(sys.argv[1:])}".rstrip(),
        f"load average (1 min) at start: {load_start:.2f}",
    ]
    print("\n".join(head), flush=True)
    if load_start >= 1.0:
        print("warning: load average >= 1, timings will be noisy", flush=True)

    rows = ["| op | batch | hand-written ms | kornia ms | kornia / hand-written | used by |",
            "|---|---:|---:|---:|---:|---|"]
    policy_rows = ["| policy | batch | ms |", "|---|---:|---:|"]
    for bs in args.batch_sizes:
        x = torch.randint(0, 256, (bs, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for name, (hand, delegated, recipe) in (jitter_cases() if args.jitter else cases(old)).items():
            hand_ms, kornia_ms = interleaved([hand, delegated], x, args.repeats, args.calls)
            row = f"| {name} | {bs} | {hand_ms:.2f} | {kornia_ms:.2f} | {kornia_ms / hand_ms:.2f} | {recipe} |"
            rows.append(row)
            print(row, flush=True)
        if not args.skip_policies:
            ops = policies()
            for name, ms in zip(ops, interleaved(list(ops.values()), x, max(3, args.repeats // 3), 2)):
                row = f"| {name} | {bs} | {ms:.1f} |"
                policy_rows.append(row)
                print(row, flush=True)
    tail = f"load average (1 min) at end: {os.getloadavg()[0]:.2f}"
    print(tail)
    if args.out is not None:
        parts = [*head, tail, "", *rows]
        if not args.skip_policies:
            parts += ["", *policy_rows]
        args.out.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
