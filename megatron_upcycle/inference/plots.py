"""PNG plots of a bench-inference result, in the style of Doubov et al.'s Figures 2 and 3.

- latency_vs_throughput.png: per request rate, median p50 (left) and p90 (right)
  latency against (input + output) tokens/s, one curve per model, bars = min-max over repeats;
- max_throughput.png: offline max throughput, online max throughput and batch-1 decode,
  one bar per model, whiskers = min-max, the MoE / dense ratio written on each MoE bar.
"""
from __future__ import annotations

from pathlib import Path

from megatron_upcycle.plotting import figure, save_png

LATENCY_PNG = "latency_vs_throughput.png"
BARS_PNG = "max_throughput.png"


def _engine_label(results: dict) -> str:
    e = results["engine"]
    return f"{e['name']} {e.get('version', '')} on {e.get('device', '?')} ({e.get('dtype', '?')})"


def plot_latency_vs_throughput(results: dict, path: Path) -> Path | None:
    fig = figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    drawn = False
    for label, summary in results["summary"].items():
        online = summary.get("online")
        if not online:
            continue
        rates = sorted(online["per_rate"])
        x = [online["per_rate"][q]["throughput_tokens_per_s"]["median"] for q in rates]
        for ax, key in zip(axes, ("latency_p50_s", "latency_p90_s")):
            stats = [online["per_rate"][q][key] for q in rates]
            y = [s["median"] for s in stats]
            err = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        drawn = True
    if not drawn:
        return None
    for ax, name in zip(axes, ("p50", "p90")):
        ax.set_xlabel("throughput (input + output tokens/s)")
        ax.set_ylabel(f"{name} latency per request (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    preset = results["preset"]
    fig.suptitle(f"Latency vs throughput, Poisson arrivals ({preset['input_tokens']} in / "
                 f"{preset['output_tokens']} out tokens; {_engine_label(results)})", fontsize=10)
    return save_png(fig, path)


def plot_max_throughput(results: dict, path: Path) -> Path:
    panels = [("offline", "max_throughput", "offline max throughput\n(input + output tokens/s)"),
              ("online", "max_throughput", "online max throughput\n(input + output tokens/s)"),
              ("decode", "tokens_per_s", "batch-1 decode (output tokens/s)")]
    ratio_keys = {"offline": "offline_max_throughput", "online": "online_max_throughput", "decode": "decode_batch1"}
    labels = list(results["summary"])
    fig = figure(4 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels))
    for ax, (workload, key, title) in zip(axes, panels):
        stats = [results["summary"][m].get(workload, {}).get(key) for m in labels]
        heights = [s["median"] if s else 0.0 for s in stats]
        err = [[s["median"] - s["min"] if s else 0 for s in stats], [s["max"] - s["median"] if s else 0 for s in stats]]
        colors = ["tab:blue" if i == 0 else "tab:orange" for i in range(len(labels))]
        ax.bar(range(len(labels)), heights, yerr=err, capsize=4, color=colors)
        for i, m in enumerate(labels[1:], start=1):
            ratio = results["ratios"].get(m, {}).get(ratio_keys[workload])
            if ratio:
                ax.annotate(f"{ratio['ratio']:.2f}x", (i, heights[i]), ha="center", va="bottom", fontsize=9,
                            xytext=(0, 6), textcoords="offset points")
        ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Serving throughput, MoE / dense ratio on each MoE bar ({_engine_label(results)})", fontsize=10)
    return save_png(fig, path)


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    paths = [plot_latency_vs_throughput(results, out_dir / LATENCY_PNG), plot_max_throughput(results, out_dir / BARS_PNG)]
    return [p for p in paths if p is not None]
