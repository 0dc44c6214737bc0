"""REPORT.md for a finished study: what ran, the results, the fitted laws, D*, advice, limits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.sweep.plan import Plan, fmt_tokens


def _read_rows(results_csv: Path) -> list[dict]:
    with results_csv.open() as handle:
        return list(csv.DictReader(handle))


def results_table(rows: list[dict]) -> str:
    order = {"dense": 0, "upcycled": 1, "moe": 2, "cpt": 3}
    rows = sorted(rows, key=lambda r: (order.get(r["kind"], 9), float(r["D1"] or 0), float(r["D2"] or 0)))
    lines = ["| kind | D1 (tokens) | D2 (tokens) | N active | FLOPs (6ND) | val loss (nats) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d2 = f"{int(float(r['D2'])):,}" if r["D2"] else "-"
        n_active = int(float(r["N2"] or r["N1"]))
        lines.append(f"| {r['kind']} | {int(float(r['D1'])):,} | {d2} | {n_active:,} | {float(r['FLOPs']):.3g} "
                     f"| {float(r['val_loss']):.4f} |")
    return "\n".join(lines)


def plot_training_curves(plan: Plan, out: Path) -> Path | None:
    """Training loss against tokens for every stable run and branch, one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["dense", "upcycle", "moe", "cpt"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(16, 3.8), sharey=True)
    drawn = False
    for ax, kind in zip(axes, kinds):
        for run in plan.runs:
            if run.model_kind != kind or run.kind == "convert":
                continue
            path = plan.run_dir(run).metrics
            if not path.exists():
                continue
            points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            points = [p for p in points if "loss" in p]
            if not points:
                continue
            style = "-" if run.stage == "stable" else ":"
            label = run.run_id.split("-", 2)[-1] if run.stage == "stable" else None
            losses = [p.get("loss_window_mean", p["loss"]) for p in points]
            ax.plot([p["tokens"] for p in points], losses, style, lw=1.2, label=label)
            drawn = True
        ax.set_title(f"{kind} (solid: stable runs, dotted: decay branches)", fontsize=9)
        ax.set_xlabel("tokens (this run)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss, mean per log interval (nats)")
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def study_summary(plan: Plan, rows: list[dict], wall_seconds: float | None) -> str:
    exp = plan.experiment
    saving = plan.independent_tokens / max(plan.total_tokens, 1)
    lines = [
        f"- experiment: `{exp.name}`; dense model(s): {', '.join(exp.dense_models)}; "
        f"MoE: {', '.join(f'{m.experts} experts top-{m.topk}' for m in exp.moe)}",
        f"- D1 budgets: {', '.join(fmt_tokens(d) for d in exp.d1.values())} tokens; "
        f"D2 budgets: {', '.join(fmt_tokens(d) for d in exp.d2.values())} tokens; decay fraction {exp.decay_fraction}",
        f"- {len(plan.runs)} runs, {plan.total_tokens:,} training tokens; training every budget as an "
        f"independent run would take {plan.independent_tokens:,} ({saving:.2f}x more)",
        f"- {len(rows)} finished budgets in results.csv",
    ]
    if wall_seconds is not None:
        lines.append(f"- wall time so far: {wall_seconds / 60:.1f} minutes")
    return "\n".join(lines)


def write_report(plan: Plan, results_csv: Path, out_dir: Path, wall_seconds: float | None = None) -> Path:
    from megatron_upcycle.report_fits import fit_sections

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(results_csv)
    curves = plot_training_curves(plan, out_dir / "training_curves.png")
    sections = [
        f"# Upcycling study: {plan.experiment.name}",
        "All D are tokens, all N are parameters, losses are validation cross-entropy in nats.",
        "## What ran",
        study_summary(plan, rows, wall_seconds),
        "## Results",
        results_table(rows),
    ]
    if curves:
        sections.append(f"![training curves]({curves.name})")
    sections += fit_sections(plan, results_csv, out_dir)
    path = out_dir / "REPORT.md"
    write_text_atomic(path, "\n\n".join(sections) + "\n")
    return path
