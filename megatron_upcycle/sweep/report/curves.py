"""Figure 3 of the paper: training curves, the upcycled runs drawn from their D1 head start
(x = tokens the model has seen, D1 + D2 for upcycled runs), with the rewarmed learning rate."""
from __future__ import annotations

import json

from megatron_upcycle.sweep.plan import fmt_tokens
from megatron_upcycle.sweep.report import figures
from megatron_upcycle.sweep.report.context import ReportContext


def _points(ctx: ReportContext, run) -> list[dict]:
    path = ctx.plan.run_dir(run).metrics
    if not path.exists():
        return []
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [p for p in points if "loss" in p]


def plot_training_curves(ctx: ReportContext):
    from matplotlib.ticker import FuncFormatter

    models = ctx.plan.experiment.dense_models
    fig = figures.figure(4.6 * len(models) + 1.6, 6.0)
    axes = fig.subplots(2, len(models), sharex="col", squeeze=False)
    drawn = False
    probe_seeds = set(ctx.plan.experiment.noise_seeds())  # the noise probe's reruns: not drawn
    for col, model in enumerate(models):
        loss_ax, lr_ax = axes[0][col], axes[1][col]
        upcycled = sorted({r.D1 for r in ctx.plan.runs if r.model == model and r.kind == "upcycle"})
        colours = {d1: f"C{i % 8}" for i, d1 in enumerate(upcycled)}
        for run in ctx.plan.runs:
            if run.model != model or run.kind == "convert" or run.seed in probe_seeds or run.model_kind == "cpt":
                continue
            points = _points(ctx, run)
            if not points:
                continue
            start = run.D1 if run.model_kind == "upcycle" else 0  # the head start
            x = [start + p["tokens"] for p in points]
            stable = run.stage == "stable"
            if run.model_kind == "dense":
                style = dict(color="k", label="dense (stable run)" if stable else None)
            elif run.model_kind == "moe":
                style = dict(color="C9", label="MoE from scratch" if stable else None)
            else:
                style = dict(color=colours[run.D1],
                             label=f"upcycled from D1 = {fmt_tokens(run.D1)}" if stable else None)
            line = "-" if stable else ":"
            loss_ax.plot(x, [p.get("loss_window_mean", p["loss"]) for p in points], line, lw=1.1, **style)
            lr_ax.plot(x, [p["lr"] for p in points], line, lw=1.1, color=style["color"])
            drawn = True
        loss_ax.set_title(f"{model} (solid: stable runs, dotted: decay branches)", fontsize=8)
        loss_ax.set_ylabel("training loss, mean per log interval (nats)", fontsize=8)
        lr_ax.set_ylabel("learning rate (per step)", fontsize=8)
        lr_ax.set_xlabel("tokens seen by the model (upcycled: D1 + D2)")
        lr_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: figures.compact(v)))
        for ax in (loss_ax, lr_ax):
            ax.grid(alpha=0.3)
        figures.legend_outside(loss_ax)
    if not drawn:
        return None
    return figures.save(fig, ctx.out_dir / "fig3_training_curves.png")


def curves_section(ctx: ReportContext) -> list[str]:
    path = plot_training_curves(ctx)
    if path is None:
        return ["## Training curves", "No training metrics under the run directories (the runs have not started "
                "here, or ran elsewhere)."]
    ctx.figures["training_curves"] = path
    return ["## Training curves (paper Figure 3)",
            "Upcycled runs start where their dense model stopped (x = D1 + D2): the head start; the learning "
            "rate is warmed up again after conversion (bottom).", ctx.link(path, "training curves")]
