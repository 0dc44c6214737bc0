"""D*: where training an MoE from scratch starts to beat upcycling. Observed in the runs,
solved from this study's fitted laws, and from the paper's published laws; Figure 4/6 style
D*(N1) with the paper's line."""
from __future__ import annotations

import numpy as np

from megatron_upcycle.errors import UserError
from megatron_upcycle.sweep.report import figures
from megatron_upcycle.sweep.report.context import ReportContext


def observed_dstar_lines(rows: list[dict]) -> list[str]:
    """Per size: L_upc(D1 = D, D2 = D) against L_moe(D) where both were measured."""
    sizes = sorted({float(r["N1"]) for r in rows if r["kind"] == "upcycled" and r["N1"]})
    lines = []
    for n1 in sizes:
        moe = {int(float(r["D1"])): float(r["val_loss"]) for r in rows
               if r["kind"] == "moe" and r["N1"] and float(r["N1"]) == n1}
        diagonal = {int(float(r["D1"])): float(r["val_loss"]) for r in rows
                    if r["kind"] == "upcycled" and r["D1"] == r["D2"] and float(r["N1"]) == n1}
        common = sorted(set(moe) & set(diagonal))
        if not common:
            lines.append(f"- N1 = {n1:,.0f}: no D with both an upcycled run at D1 = D2 = D and an MoE from scratch "
                         "at D.")
            continue
        wins = [d for d in common if diagonal[d] < moe[d]]
        pairs = ", ".join(f"D = {d:,}: {diagonal[d]:.4f} vs {moe[d]:.4f}" for d in common)
        if len(wins) == len(common):
            verdict = f"upcycling wins at every measured D, so D* > {common[-1]:,} tokens"
        elif not wins:
            verdict = f"from scratch wins at every measured D, so D* < {common[0]:,} tokens"
        else:
            verdict = "the winner changes inside the measured range"
        lines.append(f"- N1 = {n1:,.0f} parameters (upcycled vs from scratch, nats): {pairs}; {verdict}.")
    return lines or ["No upcycled runs."]


def _fmt(x) -> str:
    if x is None:
        return "no crossing in range"
    return "above range" if not np.isfinite(x) else f"{x:.3g}"


def laws_table(ctx: ReportContext) -> list[str]:
    """D*(N1) at the study's sizes and the paper's, from the fitted and the published laws."""
    result = ctx.analysis
    fitted = {r.n1: r for r in result.dstar_fitted.rows} if result.dstar_fitted else {}
    paper = {r.n1: r for r in result.dstar_paper.rows}
    study = set(ctx.dense_sizes())
    lines = ["| N1 (parameters) | D* fitted laws (tokens) | 95% interval | D* paper's laws, numeric (tokens) | "
             "paper's closed form (tokens) |", "|---:|---:|---|---:|---:|"]
    for n1 in sorted(paper):
        f, p = fitted.get(n1), paper[n1]
        mark = " (this study)" if any(abs(n1 - s) <= 0.01 * s for s in study) else ""
        ci = "-" if f is None or f.ci_low is None else f"[{_fmt(f.ci_low)}, {_fmt(f.ci_high)}]"
        lines.append(f"| {n1:,.0f}{mark} | {_fmt(f.dstar) if f else 'no joint law'} | {ci} | {_fmt(p.dstar)} | "
                     f"{p.closed_form:.3g} |")
    return lines


def one_size_dstar(ctx: ReportContext) -> list[tuple[float, float | None, str]]:
    """Without a joint law: (N1, D* or None, text) at each size from that size's own
    D1-D2 and one-size MoE laws."""
    from megatron_upcycle.scaling.derived import DSTAR_RANGE, fitted_predictors, solve_dstar

    result = ctx.analysis
    chosen = {s.subset: s.chosen for s in result.selections}
    out = []
    for n1 in ctx.dense_sizes():
        try:
            pred = fitted_predictors(result.fits, result.n2_over_n1, n1=n1, selections=chosen)
        except UserError as exc:
            out.append((n1, None, f"- N1 = {n1:,.0f}: {exc}"))
            continue
        if pred.upcycled is None or pred.moe is None:
            out.append((n1, None, f"- N1 = {n1:,.0f}: needs an upcycled and an MoE-from-scratch law at this size "
                                  f"({pred.source})"))
            continue
        _, first, gap, at = solve_dstar(pred, n1)
        text = (f"D* = {first:.3g} tokens" if first is not None else
                f"no crossing in {DSTAR_RANGE[0]:.0e}-{DSTAR_RANGE[1]:.0e} tokens (closest {gap:.1e} nats at "
                f"{at:.3g} tokens)")
        out.append((n1, first, f"- N1 = {n1:,.0f}: {text} ({pred.source})"))
    return out


def plot_dstar(ctx: ReportContext):
    """D*(N1): the paper's closed form, the paper's laws solved numerically, this study's laws."""
    from megatron_upcycle.scaling import published

    result = ctx.analysis
    n1_all = sorted(r.n1 for r in result.dstar_paper.rows)
    grid = np.geomspace(min(n1_all) / 1.5, max(n1_all) * 1.5, 200)
    fig = figures.figure(8.0, 4.4)
    ax = fig.subplots()
    ax.plot(grid, published.closed_form_dstar(grid), "k-", lw=1, label="paper: closed form")
    paper = [(r.n1, r.dstar) for r in result.dstar_paper.rows if r.dstar is not None]
    if paper:
        ax.plot(*zip(*paper), "o", color="C0", ms=4, label="paper's laws, solved numerically")
    if result.dstar_fitted is not None:
        rows = [r for r in result.dstar_fitted.rows if r.dstar is not None]
        if rows:
            ax.plot([r.n1 for r in rows], [r.dstar for r in rows], "s-", color="C3", ms=4,
                    label="this study's fitted laws")
            band = [r for r in rows if r.ci_low is not None and np.isfinite(r.ci_high)]
            if band:
                ax.fill_between([r.n1 for r in band], [r.ci_low for r in band], [r.ci_high for r in band],
                                color="C3", alpha=0.15, label="fitted, 95% bootstrap")
    else:
        own = [(n1, d) for n1, d, _ in one_size_dstar(ctx) if d is not None]
        if own:
            ax.plot(*zip(*own), "s", color="C3", ms=6, label="this study, one-size laws")
    sizes = ctx.dense_sizes()
    if sizes:
        ax.axvspan(min(sizes) / 1.1, max(sizes) * 1.1, color="C2", alpha=0.15, label="this study's N1 range")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N1, dense model size (parameters)")
    ax.set_ylabel("D* (tokens)")
    ax.set_title("Upcycling beats an MoE from scratch below D* (paper Figures 4 and 6)", fontsize=9)
    figures.plain_log_ticks(ax)
    ax.grid(alpha=0.3)
    figures.legend_outside(ax)
    return figures.save(fig, ctx.out_dir / "fig4_dstar_vs_n1.png")


def dstar_section(ctx: ReportContext) -> list[str]:
    out = ["## D*: when training an MoE from scratch beats upcycling",
           "D*(N1) solves L_moe(D) = L_upc(D1 = D, D2 = D): below it upcycling a dense model of N1 parameters "
           "trained on D tokens, then trained D more, beats an MoE trained from scratch on D tokens.",
           "### Observed in this study", "\n".join(observed_dstar_lines(ctx.rows))]
    if ctx.analysis is None:
        return out + ["### From laws", f"No laws: {ctx.analysis_error}."]
    result = ctx.analysis
    out += ["### From the fitted laws, beside the paper's", "\n".join(laws_table(ctx))]
    if result.dstar_fitted is not None:
        out.append(f"Fitted laws: {result.dstar_fitted.source}. {result.dstar_fitted.summary}")
    else:
        why = "; ".join(f"`{s.form}`: {s.reason}" for s in result.skipped
                        if s.form in ("joint", "dense_moe_shared_E")) or "no joint law"
        out.append(f"No D*(N1) curve from fitted laws ({why}). At each size from its own laws:")
        out.append("\n".join(text for _, _, text in one_size_dstar(ctx)))
    out.append(f"Paper's laws: {result.dstar_paper.summary}")
    path = plot_dstar(ctx)
    ctx.figures["dstar"] = path
    out.append(ctx.link(path, "D* against N1"))
    return out
