"""The plain-text summary table printed at the end of a run."""

from __future__ import annotations

from typing import Any


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def ablation_cell(entry: dict[str, Any]) -> str:
    """One pair of the ablation: its median, "not timed (probe 13.6x)", or its one repeat when stopped."""
    if entry.get("median") is None:
        ratio = entry.get("probe_ratio")
        return f"not timed (probe {ratio:.1f}x)" if ratio is not None else "not timed"
    return _fmt(entry["median"]) + (" (1 repeat: stopped)" if entry.get("note") else "")


def _default_over_best_row(model: str, r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """default / best: the autotuned pair's ablation img/s (cifar-lab column) over the best pair's."""
    if not r:
        return []
    if r.get("ratio") is None:
        return [(f"default / best {model}: best vs autotuned img/s", "-", "-", "-", f"{r['default']} not timed")]
    return [(f"default / best {model}: best vs autotuned img/s", _fmt(r["best_images_per_s"]),
             _fmt(r["default_images_per_s"]), f"{r['ratio']:.3f} ratio", f"best {r['best']}; autotuned {r['default']}")]


def _compile_row(model: str, decision: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """autotune's compile decision (module.compile=auto): the step eager vs compiled, and its cost."""
    t = (decision or {}).get("compile_timing") or {}
    if (decision or {}).get("compile") is None or "eager_s" not in t:
        return []
    gain = t["eager_s"] / t["compiled_s"]
    return [(f"compile {model}: step ms eager vs compiled", f"{1000 * t['eager_s']:.1f}", f"{1000 * t['compiled_s']:.1f}",
             f"{gain:.2f}x", f"compiling {t['compile_s']:.0f} s, {t.get('steps')} steps: "
             + ("compiled" if decision["compile"] else "eager"))]


def _speedrun_rows(s: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """The speedrun step's GFLOP/s (cifar-lab column) against the matmul peak of its precision."""
    if not s:
        return []
    peaks = s["peak_matmul"]["gflops"]
    where = f"{s['model']} step GFLOP/s (batch {s['batch_size']}): {s['peak_precision']} matmul peak vs achieved"
    rows = [(where, _fmt(peaks[s["peak_precision"]]), _fmt(s["achieved_gflops"]),
             f"{s['fraction_of_peak']:.3f} of peak",
             f"{s['precision']} {s['memory_format']}, {s['train_flops'] / 1e9:.1f} GFLOP/step, "
             f"{1000 * s['median_step_s']:.0f} ms/step, {s['fraction_of_bf16_peak']:.3f} of the bf16 peak; peaks "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in peaks.items()) + f" GFLOP/s (n={s['peak_matmul']['n']})")]
    d = s.get("with_data_path")
    if d:
        size = d.get("image_size", s.get("image_size", 32))
        rows.append(("same, whole step with the data path (train measurement)", _fmt(peaks[s["peak_precision"]]),
                     _fmt(d["achieved_gflops"]), f"{d['fraction_of_peak']:.3f} of peak",
                     f"{_fmt(d['images_per_s'])} img/s at {size} px, {d['fraction_of_bf16_peak']:.3f} of the bf16 peak"))
    return rows


def _callback_rows(c: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """The default callback set's step (tiny network) against none, then each callback's microseconds a step."""
    if not c:
        return []
    none, default = c["none"], c["default"]
    rows = [("step ms, tiny network: no callbacks vs the default set", f"{none['lightning_median_step_ms']:.2f}",
             f"{default['lightning_median_step_ms']:.2f}", f"{c['default_minus_none_ms']:+.2f} ms",
             f"{len(c['per_callback_us'])} callbacks, {c['per_callback_total_us']:.0f} us a step in their hooks")]
    for name, us in sorted(c["per_callback_us"].items(), key=lambda kv: -kv[1]):
        rows.append((f"  callback {name}, us per step", "", f"{us:.1f}", "", ""))
    return rows


def format_table(res: dict[str, Any]) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']}, "
                 f"threads {m['torch_threads']}, env {m.get('env') or {}}, "
                 f"load {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    lines.append(f"data: {res['data_source']} (reference: {res.get('reference_dataset')}); "
                 f"host memory reuse (train/overhead): {'on' if res.get('reuse_host_memory') else 'off'}")
    rows = [("measure", "reference", "cifar-lab", "speedup", "cifar-lab settings")]
    d = res.get("data")
    if d:
        rows.append((f"data only, img/s (batch {d['batch_size']})", _fmt(d["reference"]["median"]),
                     _fmt(d["cifar_lab"]["median"]), f"{d['speedup']:.1f}x", d["cifar_lab"]["output"]))
    for model, t in res["train"].items():
        tuned = f" (autotune: {t['autotune']['source']})" if "autotune" in t else ""
        rows.append((f"train {model}, img/s (batch {t['batch_size']})", _fmt(t["reference"]["median"]),
                     _fmt(t["cifar_lab"]["median"]), f"{t['speedup']:.2f}x", t["cifar_lab"]["settings"] + tuned))
    for model, t in res["train"].items():
        rows += _default_over_best_row(model, t.get("default_over_best"))
        rows += _compile_row(model, t.get("autotune"))
    o = res.get("overhead")
    if o:
        m_ = o["model"]
        rows.append((f"step ms, hand loop vs Lightning ({o['model_name']}, batch {o['batch_size']})",
                     f"{m_['plain_median_step_ms']:.1f}", f"{m_['lightning_median_step_ms']:.1f}",
                     f"{m_['ratio']:.3f} ratio", f"{o['precision']} {o.get('memory_format', '')}".strip()))
        if "tiny" in o:
            t_ = o["tiny"]
            rows.append(("step ms, same with a tiny network", f"{t_['plain_median_step_ms']:.2f}",
                         f"{t_['lightning_median_step_ms']:.2f}", f"{t_['median_paired_difference_ms']:+.2f} ms",
                         f"-> ratio {o['ratio_from_tiny_overhead']:.3f} for {o['model_name']}"))
        if "lightning_floor" in o:
            f_ = o["lightning_floor"]
            rows.append(("step ms, Lightning alone (one layer, SGD, no hooks)", f"{f_['plain_median_step_ms']:.3f}",
                         f"{f_['lightning_median_step_ms']:.3f}", f"{f_['median_paired_difference_ms']:+.2f} ms",
                         "Lightning's floor"))
        rows += _callback_rows(o.get("callbacks"))
    rows += _speedrun_rows(res.get("speedrun"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j in (0, 4) else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    mem = res.get("memory") or {}
    if mem.get("available"):
        lines.append(f"data path peak RSS increase: {mem['peak_rss_increase_mb']:.0f} MB = {mem['peak_ratio']:.2f}x the "
                     f"{mem['dataset_uint8_mb']:.0f} MB of uint8 images held (val_size={mem['val_size']})")
    for model, t in res["train"].items():
        if "ablation" in t:
            parts = ", ".join(f"{k}: {ablation_cell(v)}" for k, v in t["ablation"].items())
            lines.append(f"ablation {model} (img/s, batched path): {parts}")
    return "\n".join(lines)
