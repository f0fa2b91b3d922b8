"""The plain-text summary table printed at the end of a run."""

from __future__ import annotations

from typing import Any


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


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
        rows.append((f"train {model}, img/s (batch {t['batch_size']})", _fmt(t["reference"]["median"]),
                     _fmt(t["cifar_lab"]["median"]), f"{t['speedup']:.2f}x", t["cifar_lab"]["settings"]))
    o = res.get("overhead")
    if o:
        m_ = o["model"]
        rows.append((f"step ms, hand loop vs Lightning ({o['model_name']}, batch {o['batch_size']})",
                     f"{m_['plain_median_step_ms']:.1f}", f"{m_['lightning_median_step_ms']:.1f}",
                     f"{m_['ratio']:.3f} ratio", o["precision"]))
        if "tiny" in o:
            t_ = o["tiny"]
            rows.append(("step ms, same with a tiny network", f"{t_['plain_median_step_ms']:.2f}",
                         f"{t_['lightning_median_step_ms']:.2f}", f"+{t_['median_paired_difference_ms']:.2f} ms",
                         f"-> ratio {o['ratio_from_tiny_overhead']:.3f} for {o['model_name']}"))
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
            parts = ", ".join(f"{k}: {_fmt(v['median'])}" for k, v in t["ablation"].items())
            lines.append(f"ablation {model} (img/s, batched path): {parts}")
    return "\n".join(lines)
