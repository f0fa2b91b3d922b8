"""The report figures' test-end work, an earlier tree against this one, side by side in one process.

    git worktree add /tmp/before 78c0eba
    python benchmarks/report_figures_ab.py --before /tmp/before

What ``ClassificationReport.on_test_end`` draws for 32 misclassified images and a 10-class confusion
matrix: the earlier tree's steps (the grid built, drawn for TensorBoard and saved with a cropping
second draw; the confusion matrix built twice) against this tree's (each figure drawn once for its
PNG and TensorBoard). Medians of alternating repeats after one warm-up; results in
docs/benchmarks.md, "Report figures".
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _plots(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, tree / "cifar_lab" / "callbacks" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout of the earlier tree")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    old, new = _plots(args.before, "before_plots"), _plots(Path(__file__).resolve().parents[1], "plots")
    cm = torch.randint(0, 50, (10, 10), generator=torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    titles = [f"true: {NAMES[i % 10]}\npred: {NAMES[(i + 1) % 10]} (55%)" for i in range(32)]
    out = Path(tempfile.mkdtemp())

    def before() -> None:
        grid = old.image_grid_figure(images, titles)
        old.figure_to_array(grid)
        old.save_figure(grid, out / "grid_before.png")
        old.save_figure(old.confusion_matrix_figure(cm, NAMES), out / "confusion_before.png")
        old.figure_to_array(old.confusion_matrix_figure(cm, NAMES))

    def after() -> None:
        new.save_figure(new.image_grid_figure(images, titles), out / "grid_after.png")
        new.save_figure(new.confusion_matrix_figure(cm, NAMES), out / "confusion_after.png")

    cases = {"test end, before": before, "test end, after": after,
             "grid build and draw, before": lambda: old.figure_to_array(old.image_grid_figure(images, titles)),
             "grid build and draw, after": lambda: new.figure_to_array(new.image_grid_figure(images, titles))}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, work in cases.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name:30s} {1000 * statistics.median(seconds[1:]):7.0f} ms")
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
