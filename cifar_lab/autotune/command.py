"""See and reset the cached speed decisions.

    python -m cifar_lab.autotune show [model]     # the cached decisions: pair, figures, margin, state
    python -m cifar_lab.autotune clear [model]    # forget one model's decisions, or all of them

``show`` also lists the precision probes (a reduced precision's convolution against fp32 on this
machine; one far slower is not timed), which ``clear`` without a model forgets.

``model`` is the model's config name (``model=<name>``, e.g. ``simple_cnn``). The cache is
``$CIFAR_LAB_CACHE_DIR`` (default ``~/.cache/cifar_lab``)/``autotune.json``; a cleared or stale
decision is measured again by the next run that needs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from cifar_lab.autotune import cache
from cifar_lab.autotune.decision import pair_name, percent
from cifar_lab.errors import EXIT_INTERRUPTED, InputError, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_lab.autotune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("action", choices=("show", "clear"), help="show the cached decisions, or clear them")
    p.add_argument("model", nargs="?", default=None, help="only this model's decisions (default: all)")
    return p


def _under(e: dict[str, Any]) -> list[str]:
    u = e.get("under") or {}
    return [str(u.get("batch_size", "-")), str(u.get("image_size", "-")), str(u.get("threads", "-")),
            str(u.get("torch", "-")), str(u.get("device", "-"))]


def _pair_row(e: dict[str, Any]) -> list[str]:
    d = e.get("decision") or {}
    chosen = next((c for c in d.get("table", []) if (c.get("precision"), c.get("memory_format")) ==
                   (d.get("precision"), d.get("memory_format"))), {})
    speed = chosen.get("images_per_s")
    others = ", ".join(f"{pair_name(c['precision'], c['memory_format'])} "
                       + (f"{c['images_per_s']:,.0f}" if c.get("images_per_s") else "not timed (probe)")
                       for c in d.get("table", []) if c is not chosen and (
                           c.get("images_per_s") or str(c.get("note", "")).startswith("not timed")))
    state = f"stale: {e['stale']}" if e.get("stale") else "undecided: the usual pair" if d.get("decided") is False \
        else "decided"
    return [str(e.get("model", "?")), *_under(e), pair_name(str(d.get("precision")), str(d.get("memory_format"))),
            f"{speed:,.0f}" if speed else "-", others or "-", percent(d.get("margin")), percent(d.get("spread")),
            str(d.get("rounds", "-")), f"{d.get('measuring_s', 0):.1f} s", str(e.get("measured_at", "-")), state]


def _compile_row(e: dict[str, Any]) -> list[str]:
    t = e.get("timing") or {}
    return [str(e.get("model", "?")), *_under(e), pair_name(*map(str, e.get("pair") or ["?", "?"])),
            f"{1000 * t.get('eager_s', 0):.1f}", f"{1000 * t.get('compiled_s', 0):.1f}",
            f"{t.get('compile_s', 0):.0f}", str(e.get("measured_at", "-"))]


def _probe_row(e: dict[str, Any]) -> list[str]:
    fp32, reduced = e.get("fp32_s") or 0.0, e.get("reduced_s") or 0.0
    return [*_under(e)[2:], str(e.get("precision", "?")), f"{1000 * fp32:.2f}", f"{1000 * reduced:.2f}",
            f"{reduced / fp32:.1f}x" if fp32 else "-", str(e.get("measured_at", "-"))]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


UNDER = ["batch", "image px", "threads", "torch", "device"]


def show(entries: dict[str, dict[str, Any]], model: str | None) -> str:
    chosen = [e for e in entries.values() if model is None or e.get("model") == model]
    pairs = sorted((e for e in chosen if e.get("kind") == "pair"), key=lambda e: (e.get("model", ""),
                                                                                   e.get("measured_at", "")))
    compiles = sorted((e for e in chosen if e.get("kind") == "compile"), key=lambda e: e.get("model", ""))
    probes = [e for e in entries.values() if e.get("kind") == "probe"] if model is None else []
    parts = []
    if pairs:
        parts.append(_markdown(["model", *UNDER, "chosen pair", "images/s", "others (images/s)", "margin", "spread",
                                "rounds", "measuring", "measured at", "state"], [_pair_row(e) for e in pairs]))
    if compiles:
        parts.append("Compile timings (module.compile=auto):\n\n" + _markdown(
            ["model", *UNDER, "pair", "eager ms", "compiled ms", "compile s", "measured at"],
            [_compile_row(e) for e in compiles]))
    if probes:
        parts.append("Precision probes (one convolution, forward and backward; a reduced precision over "
                     "autotune.probe_slower x fp32's time is not timed):\n\n" + _markdown(
                         ["threads", "torch", "device", "precision", "fp32 ms", "reduced ms", "ratio", "measured at"],
                         [_probe_row(e) for e in probes]))
    return "\n\n".join(parts)


def clear(entries: dict[str, dict[str, Any]], model: str | None) -> tuple[int, int]:
    """Remove ``model``'s entries (all, precision probes included, when None) from the cache file; how many
    decisions and how many probes went."""
    kept = {} if model is None else {k: e for k, e in entries.items() if e.get("model") != model}
    cache.write(kept)
    probes = sum(e.get("kind") == "probe" for k, e in entries.items() if k not in kept)
    return len(entries) - len(kept) - probes, probes


def run(args: argparse.Namespace) -> str:
    path = cache.cache_path()
    raw = cache.read_file(path)
    if path.exists() and not raw and not (args.action == "clear" and args.model is None):
        raise InputError(f"{path} is not a readable autotune cache; `python -m cifar_lab.autotune clear` "
                         f"replaces it with an empty one")
    entries = cache.read(path)
    models = sorted({str(e.get("model")) for e in entries.values() if e.get("kind") != "probe"})
    if args.model is not None and args.model not in models:
        cached = ", ".join(models) if models else "nothing"
        raise InputError(f"no cached decision for model '{args.model}' in {path} (cached: {cached}); "
                         f"`python -m cifar_lab.autotune show` lists them")
    if args.action == "show":
        older = " (it holds an older format, which runs ignore; clear removes it)" if raw and not entries else ""
        return show(entries, args.model) or f"no cached decisions in {path}{older}"
    if not path.exists():
        return f"nothing to clear: {path} does not exist"
    gone, probes = clear(entries, args.model)
    return f"cleared {gone} cached decision{'s' if gone != 1 else ''}" + \
        (f" of {args.model}" if args.model else "") + f" from {path}" + \
        (f", and {probes} precision probe{'s' if probes != 1 else ''}" if probes else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except UserError as err:  # the same one-line report as every command, returned as the exit code
        print(f"Error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # clear writes its file atomically: it is the old one or the new one
        print("Error: interrupted (Ctrl-C); the cache file was left whole", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
