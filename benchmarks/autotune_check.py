"""Autotune's decisions against the full ablation, one table per CPU kind (docs/benchmarks.md).

For speedrun_net (as ``experiment=speedrun``), simple_cnn and attention_net, the benchmark
(``python -m cifar_lab.bench``) decides each model's precision and memory format as a training run
over CIFAR-10 would (``autotune.decide``, with a fresh, empty cache so every decision is measured),
then times every precision x memory format pair on the batched path in interleaved repeats, by
autotune's rules: a pair whose precision the precision probe rules out here (emulated bf16, over
``autotune.probe_slower`` x fp32's time) is listed as "not timed (probe Nx)", and a pair whose
first repeat took over ``autotune.give_up_first`` x the fastest's time is timed no further. The
table puts each decision (its margin, spread, rounds and measuring time, decided or the usual
pair) next to the ablation and checks that every default runs at 0.9x of the best timed pair or
better.

    python benchmarks/autotune_check.py --data-root DIR --out autotune_check.json
    python benchmarks/autotune_check.py --generated     # no CIFAR-10 copy: generated images

About 12-16 minutes on a 2-core CPU (15.4 on an AMD EPYC Zen 3, whose emulated bf16 pairs are not
timed; autotune's rounds add up to a minute per model). ``--repeats`` and ``--steps`` shrink the
bench's counts. Run it on a quiet machine;
the exit code is 1 when a default is below 0.9x of the best pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

MODELS = ("speedrun_net", "simple_cnn", "attention_net")
TARGET = 0.9


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _probe_lines(res: dict[str, Any]) -> list[str]:
    """What the precision probe found (cached once per machine setup, so the same for every model)."""
    found = {p: f for t in res["train"].values() for p, f in (t["autotune"].get("probe") or {}).items()}
    return [f"Precision probe: a {p} convolution took {f['ratio']:.1f}x fp32's time here; "
            + ("over autotune.probe_slower, so its pairs are not timed, by autotune nor by the ablation."
               if f.get("note") else "its pairs are timed.") for p, f in found.items() if f.get("ratio") is not None]


def table(res: dict[str, Any]) -> tuple[str, bool]:
    """The Markdown table of decisions next to the ablation, and whether every default met the target."""
    from cifar_lab.tools.bench.report import ablation_cell

    machine = res["machine"]
    # the ablation's pairs (a GPU's 16-mixed included), without simple_cnn's one-thread variant
    pairs = list(dict.fromkeys(n for t in res["train"].values() for n in t.get("ablation", {}) if "thread" not in n))
    lines = [f"{machine['cpu']} ({', '.join(machine.get('cpu_bf16') or ['no bf16 flags'])}), "
             f"{machine['torch_threads']} threads, torch {machine['torch']}, {machine['date'][:10]}, "
             f"data: {res['data_source']}, {res['wall_s']:.0f} s", "",
             "| model (batch) | " + " | ".join(pairs) + " | autotuned | decided | margin | spread | rounds | "
             "measuring | default / best |",
             "|---|" + "---:|" * len(pairs) + "---|---|---:|---:|---:|---:|---:|"]
    ok = True
    for model, t in res["train"].items():
        ablation = t.get("ablation", {})
        best = (t.get("default_over_best") or {}).get("best")  # the fastest timed pair
        cells = [("-" if n not in ablation else f"**{ablation_cell(ablation[n])}**" if n == best
                  else ablation_cell(ablation[n])) for n in pairs]
        a = t["autotune"]
        ratio = (t.get("default_over_best") or {}).get("ratio")
        ok = ok and ratio is not None and ratio >= TARGET
        decided = {True: "yes", False: "no: the usual pair", None: "-"}[a.get("decided")]
        lines.append(f"| {model} ({t['batch_size']}) | " + " | ".join(cells) +
                     f" | {a['precision']} {a['memory_format']} | {decided} | {_percent(a.get('margin'))} | "
                     f"{_percent(a.get('spread'))} | {a.get('rounds', '-')} | {a.get('measuring_s', 0):.1f} s | "
                     + ("-" if ratio is None else f"{ratio:.3f}") + " |")
    lines += ["", "Images/s of whole training steps on the batched path (medians of interleaved repeats; the "
              "best timed pair in bold). Decisions measured with an empty cache for a run over CIFAR-10's 50,000 "
              f"images. Every default at {TARGET}x of the best timed pair or better: {'yes' if ok else 'NO'}.",
              *_probe_lines(res)]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=None, help="CIFAR-10 in the python-batches layout")
    p.add_argument("--generated", action="store_true", help="generated images instead of CIFAR-10")
    p.add_argument("--out", type=Path, default=Path("autotune_check.json"), help="the benchmark's JSON")
    p.add_argument("--table", type=Path, default=None, help="also write the table here (Markdown)")
    p.add_argument("--repeats", type=int, default=None, help="the bench's interleaved repeats (default 8; the "
                   "ablation runs half as many)")
    p.add_argument("--steps", type=int, default=None, help="the bench's timed steps per repeat (default 2)")
    args = p.parse_args(argv)
    os.environ["CIFAR_LAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="autotune_check_")  # every decision measured
    from cifar_lab.tools.bench import main as bench

    bench_args = ["--models", *MODELS, "--skip", "data", "memory", "overhead", "--ablation", "--no-speedrun",
                  "--out", str(args.out)]
    if args.data_root:
        bench_args += ["--data-root", str(args.data_root)]
    if args.generated:
        bench_args.append("--generated")
    for option in ("repeats", "steps"):
        if getattr(args, option) is not None:
            bench_args += [f"--{option}", str(getattr(args, option))]
    bench(bench_args)
    text, ok = table(json.loads(args.out.read_text()))
    print("\n" + text)
    if args.table:
        args.table.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
