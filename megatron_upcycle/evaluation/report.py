"""The report's "Downstream quality" section, from results.csv rows with eval_* columns.

``downstream_section(plan, rows, out_dir)`` returns Markdown chunks and writes two
PNGs into ``out_dir``: the core average against validation loss (one point per run,
coloured by kind), and the relative improvement of upcycled over dense CPT at
matched FLOPs per D1 (Doubov et al.'s Figures 1 and 4), with the noise stated.
"""
from __future__ import annotations

import math
from pathlib import Path

from megatron_upcycle.evaluation.aggregate import CHANCE

KIND_ORDER = {"dense": 0, "upcycled": 1, "moe": 2, "cpt": 3}
KIND_COLOURS = {"dense": "tab:blue", "upcycled": "tab:red", "moe": "tab:green", "cpt": "tab:orange"}
CORE = "eval_core_average"


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _task_columns(rows: list[dict]) -> list[str]:
    """eval_<task>_<metric> columns of each task's headline metric, in a stable order."""
    columns = sorted({c for row in rows for c in row if c.startswith("eval_") and c != CORE
                      and not c.endswith("_stderr")})
    headline = [c for c in columns if any(c == f"eval_{t}_{m}" for t, (m, _) in CHANCE.items())]
    return headline or columns


def task_table(rows: list[dict]) -> str:
    columns = _task_columns(rows)
    head = " | ".join(c.removeprefix("eval_") for c in columns)
    several = len({r.get("model") for r in rows}) > 1  # a model column only when sizes differ
    lines = [("| model " if several else "") + f"| kind | D1 (tokens) | D2 (tokens) | val loss (nats) | {head} "
             "| core average |",
             ("|---" if several else "") + "|---|---:|---:|---:|" + "---:|" * (len(columns) + 1)]
    ordered = sorted(rows, key=lambda r: (r.get("model") or "", KIND_ORDER.get(r["kind"], 9), _num(r.get("D1")) or 0,
                                          _num(r.get("D2")) or 0))
    for r in ordered:
        cells = [f"{_num(r.get(c)):.3f}" if _num(r.get(c)) is not None else "-" for c in columns + [CORE]]
        d1, d2, loss = _num(r.get("D1")), _num(r.get("D2")), _num(r.get("val_loss"))
        lines.append((f"| {r.get('model')} " if several else "")
                     + f"| {r['kind']} | {f'{int(d1):,}' if d1 else '-'} | {f'{int(d2):,}' if d2 else '-'} | "
                     f"{f'{loss:.4f}' if loss is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_core_vs_loss(rows: list[dict], path: Path) -> Path | None:
    from megatron_upcycle.plotting import figure as _figure
    from megatron_upcycle.plotting import save_png as _save

    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    drawn = False
    for kind in sorted({r["kind"] for r in rows}, key=lambda k: KIND_ORDER.get(k, 9)):
        points = [(_num(r.get("val_loss")), _num(r.get(CORE))) for r in rows if r["kind"] == kind]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            ax.scatter(*zip(*points), label=kind, color=KIND_COLOURS.get(kind), s=24)
            drawn = True
    if not drawn:
        return None
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("validation loss (nats)")
    ax.set_ylabel("core average (0 = chance, 1 = perfect)")
    ax.set_title("downstream quality against validation loss, one point per run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def matched_pairs(rows: list[dict]) -> list[tuple[float, float, float, float, str]]:
    """(D1, D2, upcycled core average, CPT core average, model) for CPT runs of the same dense
    model at the upcycled run's FLOPs (within 5%)."""
    cpt = [r for r in rows if r["kind"] == "cpt" and _num(r.get(CORE)) is not None]
    pairs = []
    for upc in rows:
        if upc["kind"] != "upcycled" or _num(upc.get(CORE)) is None:
            continue
        d1, flops = _num(upc.get("D1")), _num(upc.get("FLOPs"))
        same = [r for r in cpt if r.get("model") == upc.get("model") and _num(r.get("D1")) == d1 and flops
                and _num(r.get("FLOPs"))]
        if not same:
            continue
        best = min(same, key=lambda r: abs(_num(r["FLOPs"]) / flops - 1))
        if abs(_num(best["FLOPs"]) / flops - 1) <= 0.05:
            pairs.append((d1, _num(upc["D2"]), _num(upc[CORE]), _num(best[CORE]), upc.get("model") or ""))
    return pairs


def plot_relative_improvement(pairs, path: Path) -> Path | None:
    from matplotlib.ticker import ScalarFormatter

    from megatron_upcycle.plotting import figure as _figure
    from megatron_upcycle.plotting import save_png as _save

    usable = [(model, d1, d2, 100 * (u - c) / abs(c)) for d1, d2, u, c, model in pairs if abs(c) > 1e-9 and d2]
    if not usable:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    several = len({p[0] for p in usable}) > 1
    for model, d1 in sorted({p[:2] for p in usable}):
        points = sorted((d2, rel) for p_model, p_d1, d2, rel in usable if (p_model, p_d1) == (model, d1))
        ax.plot(*zip(*points), "o-", label=(f"{model}, " if several else "") + f"D1 = {int(d1):,} tokens")
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.xaxis.set_minor_formatter(formatter)
    ax.set_xlabel("D2 (tokens; the CPT run has the same FLOPs)")
    ax.set_ylabel("upcycled vs CPT core average (%)")
    ax.set_title("relative improvement of upcycling over dense CPT at matched FLOPs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _seed_spread(rows: list[dict], plan) -> list[float]:
    """Standard deviation of the core average over each noise-probe group (a first-seed run
    and its reruns with other seeds, experiment ``seeds.extra``) that was evaluated."""
    import statistics

    core = {r["run_id"]: _num(r.get(CORE)) for r in rows if _num(r.get(CORE)) is not None}
    groups: dict[str, list[float]] = {}
    for run in plan.runs if plan is not None else []:
        if run.repeat_of and run.run_id in core and run.repeat_of in core:
            groups.setdefault(run.repeat_of, [core[run.repeat_of]]).append(core[run.run_id])
    return [statistics.stdev(values) for values in groups.values() if len(values) > 1]


def _noise_line(rows: list[dict], plan) -> str:
    errs = [_num(r.get(f"{CORE}_stderr")) for r in rows]
    errs = [e for e in errs if e is not None]
    sampling = (f"item-sampling noise of a core average: about ±{sum(errs) / len(errs):.3f} (one standard "
                "error, from the harness's per-task standard errors)") if errs else "no standard errors recorded"
    spreads = _seed_spread(rows, plan)
    if spreads:
        seed_note = (f"run-to-run (seed) spread of the core average over {len(spreads)} rerun point(s): "
                     + ", ".join(f"{s:.3f}" for s in spreads) + " (standard deviation over seeds)")
    else:
        seed_note = ("run-to-run (seed) noise of the core average is not measured for the evaluated models "
                     "(no evaluated noise-probe reruns); differences smaller than twice the item noise are "
                     "not evidence")
    return f"Noise: {sampling}; {seed_note}."


def downstream_section(plan, rows: list[dict], out_dir: Path) -> list[str]:
    """Markdown chunks of the "Downstream quality" section; PNGs go into ``out_dir``."""
    rows = [r for r in rows if _num(r.get(CORE)) is not None]
    if not rows:
        return ["## Downstream quality", "No run has been evaluated yet (add `eval:` to the experiment)."]
    out_dir = Path(out_dir)
    tasks = sorted({c.removeprefix("eval_").rsplit("_", 1)[0] for c in _task_columns(rows)})
    chunks = [
        "## Downstream quality",
        "lm-evaluation-harness, offline. Core average: the mean over tasks of (accuracy - chance) / "
        "(1 - chance), Gauntlet-style; chance levels: "
        + ", ".join(f"{t} {CHANCE[t][1]:g}" for t in tasks if t in CHANCE) + ".",
        task_table(rows),
    ]
    scatter = plot_core_vs_loss(rows, out_dir / "downstream_vs_loss.png")
    if scatter:
        chunks.append(f"![core average vs validation loss]({scatter.name})")
    pairs = matched_pairs(rows)
    relative = plot_relative_improvement(pairs, out_dir / "downstream_upcycled_vs_cpt.png")
    if relative:
        chunks.append(f"![upcycled vs CPT at matched FLOPs]({relative.name})")
    elif not pairs:
        chunks.append("No upcycled run has a CPT run at matched FLOPs with an evaluation yet.")
    chunks.append(_noise_line(rows, plan))
    return chunks
