"""The fitted laws: a summary of the laws that matter, the full leave-one-out comparison,
Figure 1 (loss against D2 per D1 with the fitted law) and predicted against observed."""
from __future__ import annotations

import numpy as np

from megatron_upcycle.sweep.plan import fmt_tokens
from megatron_upcycle.sweep.report import figures
from megatron_upcycle.sweep.report.context import ReportContext

HEADLINE_FAMILIES = ("chinchilla", "one_size", "shared_E", "d1d2", "joint")


def demote(markdown: str) -> str:
    """A Markdown document as part of the report: no title, every heading one level down."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("# "):
            continue
        out.append("#" + line if line.startswith("##") else line)
    return "\n".join(out).strip()


def headline_fits(result) -> list:
    """Chinchilla, one-size, shared-E and joint fits, and the D1-D2 form chosen per size."""
    chosen = {(s.subset, s.chosen) for s in result.selections}
    return [f for f in result.fits if f.family in HEADLINE_FAMILIES
            and (f.family != "d1d2" or (f.subset, f.form) in chosen)]


def _param(p) -> str:
    if p.fixed:
        return f"{p.name} = {p.value:.4g} (fixed)"
    ci = "" if p.ci_low is None else f" [{p.ci_low:.3g}, {p.ci_high:.3g}]"
    return f"{p.name} = {p.value:.4g}{ci}"


def laws_table(result) -> list[str]:
    lines = ["| law | fitted to | runs | parameters (value [95% bootstrap interval]) | LOO RMS (nats) |",
             "|---|---|---:|---|---:|"]
    for f in headline_fits(result):
        loo = f"{f.loo.rms:.4f}" if f.loo else "-"
        lines.append(f"| `{f.form}`: {f.formula} | {f.subset} | {f.n_points} | "
                     f"{'; '.join(_param(p) for p in f.params)} | {loo} |")
    return lines


def plot_loss_vs_d2(ctx: ReportContext):
    """Figure 1: validation loss against D2 for each D1, one panel per size, with the chosen
    D1-D2 form (solid) and the joint law (dashed)."""
    result = ctx.analysis
    chosen = {(s.subset, s.chosen) for s in result.selections if s.family == "d1d2"}
    fits = sorted((f for f in result.fits if (f.subset, f.form) in chosen), key=lambda f: f.n1 or 0)
    if not fits:
        return None
    joint = result.fit("joint")
    by_id = {r["run_id"]: r for r in ctx.rows}
    fig = figures.figure(4.2 * len(fits) + 1.8, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(fits)))
    for ax, fit in zip(axes, fits):
        rows = [by_id[i] for i in fit.run_ids if i in by_id]
        d1 = np.array([float(r["D1"]) for r in rows])
        d2 = np.array([float(r["D2"]) for r in rows])
        loss = np.array([float(r["val_loss"]) for r in rows])
        grid = np.geomspace(d2.min() / 1.3, d2.max() * 1.3, 80)
        for i, level in enumerate(np.unique(d1)):
            colour, sel = f"C{i % 10}", d1 == level
            ax.plot(d2[sel], loss[sel], "o", color=colour, label=f"D1 = {fmt_tokens(int(level))} tokens")
            n1 = np.full_like(grid, fit.n1)
            ax.plot(grid, fit.predict(D1=np.full_like(grid, level), D2=grid, N1=n1), "-", color=colour)
            if joint is not None:
                ax.plot(grid, joint.predict(D1=np.full_like(grid, level), D2=grid, N1=n1), "--", color=colour,
                        alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"N1 = {figures.compact(fit.n1)} parameters\n`{fit.form}` (solid)"
                     + (", joint (dashed)" if joint is not None else ""), fontsize=8)
        ax.set_xlabel("D2, tokens after upcycling")
        ax.set_ylabel("validation loss (nats)")
        figures.plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    figures.legend_outside(axes[-1])
    return figures.save(fig, ctx.out_dir / "fig1_loss_vs_d2.png")


def plot_predicted_vs_observed(ctx: ReportContext):
    result = ctx.analysis
    shown = headline_fits(result)
    if not shown:
        return None
    loss_of = {r["run_id"]: float(r["val_loss"]) for r in ctx.rows}
    fig = figures.figure(11.5, 4.4)
    ax, res_ax = fig.subplots(1, 2)
    lo, hi = np.inf, -np.inf
    for i, fit in enumerate(shown):
        ids = [r for r in fit.run_ids if r in loss_of]
        observed = np.array([loss_of[r] for r in ids])
        fitted = np.array([fit.fitted[r] for r in ids])
        colour = f"C{i % 10}"
        label = f"{fit.form} ({figures.compact(fit.n1)})" if fit.n1 else fit.form
        if fit.subset.startswith("MoE"):
            label += ", MoE"
        ax.plot(observed, fitted, "o", color=colour, ms=4, label=label)
        res_ax.plot(observed, fitted - observed, "o", color=colour, ms=4)
        points = [observed, fitted]
        if fit.loo:
            held_out = np.array([fit.loo.errors[r] for r in ids])
            ax.plot(observed, observed + held_out, "x", color=colour, ms=4)
            res_ax.plot(observed, held_out, "x", color=colour, ms=4)
            points.append(observed + held_out)
        lo, hi = min(lo, *(p.min() for p in points)), max(hi, *(p.max() for p in points))
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    res_ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("observed validation loss (nats)")
    ax.set_ylabel("predicted loss (nats; o in-sample, x left out)")
    res_ax.set_xlabel("observed validation loss (nats)")
    res_ax.set_ylabel("predicted - observed (nats)")
    for a in (ax, res_ax):
        a.grid(alpha=0.3)
    figures.legend_outside(res_ax, source=ax)
    return figures.save(fig, ctx.out_dir / "predicted_vs_observed.png")


def fits_section(ctx: ReportContext) -> list[str]:
    from megatron_upcycle.scaling.report import loo_markdown

    if ctx.analysis is None:
        return ["## Fitted laws", f"No scaling law could be fitted: {ctx.analysis_error}."]
    result = ctx.analysis
    out = ["## Fitted laws",
           "The laws of the paper fitted to this study's runs (D in tokens, N in parameters, L in nats); the "
           "full comparison of forms, their starts and jackknife errors follow below.", "\n".join(laws_table(result))]
    skipped = [s for s in result.skipped
               if s.form in ("chinchilla", "dense_moe_shared_E", "joint", "one_size", "one_size_shared_E")]
    if skipped:
        out.append("Not fitted: " + "; ".join(f"`{s.form}` ({s.subset}): {s.reason}" for s in skipped) + ".")
    for name, plot, title in (("loss_vs_d2", plot_loss_vs_d2, "Figure 1: loss against D2 per D1"),
                              ("predicted_vs_observed", plot_predicted_vs_observed, "predicted against observed")):
        path = plot(ctx)
        if path is not None:
            ctx.figures[name] = path
            out.append(f"{title}:\n\n{ctx.link(path, name)}")
    out += ["### All forms and their leave-one-out comparison", demote(loo_markdown(result))]
    return out
