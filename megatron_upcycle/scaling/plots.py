"""PNG plots (matplotlib, Agg canvas; no pyplot state, no display needed).

- loss_vs_d2.png: loss against D2 for each D1, one panel per model, with the
  chosen D1-D2 form (solid) and the joint law (dashed), log-log.
- exponent_vs_lnd1.png: fitted D2 exponent a2 - a3 ln D1 against ln D1 with its
  bootstrap band, and local slopes read off the data at each D1.
- predicted_vs_observed.png: in-sample and leave-one-out predictions; the runs
  that decide a family's choice (influential, selection.py) are named.
- dstar_vs_n1.png: D*(N1) numeric and closed form, with the +/-0.0005 band (its
  label says where only some nudges cross); N1 values without a crossing are
  marked with a triangle above the curves.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_upcycle.plotting import figure as _figure
from megatron_upcycle.plotting import save_png as _save
from megatron_upcycle.scaling.io import ResultsTable
from megatron_upcycle.scaling.laws import design, to_internal
from megatron_upcycle.scaling.records import AnalysisResult, LawFit, scale_columns


def _rows(table: ResultsTable, run_ids: list[str]) -> np.ndarray:
    index = {r: i for i, r in enumerate(table.run_id)}
    return np.array([index[r] for r in run_ids], dtype=int)


def _chosen_d1d2(result: AnalysisResult) -> list[LawFit]:
    chosen = {(s.subset, s.chosen) for s in result.selections if s.family == "d1d2"}
    return [f for f in result.fits if (f.subset, f.form) in chosen]


def _label(text: str, width: int = 48) -> str:
    """A legend label wrapped onto lines of ``width`` characters, never cut."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def plot_loss_vs_d2(result: AnalysisResult, table: ResultsTable, path: Path) -> Path:
    fits = _chosen_d1d2(result)
    joint = result.fit("joint")
    cols = max(1, min(3, len(fits)))
    rows = max(1, -(-len(fits) // cols))
    fig = _figure(4.2 * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    if not fits:
        _note(axes[0], "no D1-D2 fit (see loo.md)")
    for ax, fit in zip(axes, fits):
        idx = _rows(table, fit.run_ids)
        d1, d2, loss, n1 = (table.col(c)[idx] for c in ("D1", "D2", "val_loss", "N1"))
        levels = np.unique(d1)
        colors = [f"C{i % 10}" for i in range(len(levels))]
        grid = np.logspace(np.log10(d2.min()) - 0.1, np.log10(d2.max()) + 0.1, 100)
        for level, color in zip(levels, colors):
            sel = d1 == level
            ax.loglog(d2[sel], loss[sel], "o", color=color, label=f"D1 = {level:.2g}")
            ax.loglog(grid, fit.predict(D1=np.full_like(grid, level), D2=grid, N1=np.full_like(grid, n1[0])),
                      "-", color=color)
            if joint is not None:
                ax.loglog(grid, joint.predict(D1=np.full_like(grid, level), D2=grid, N1=np.full_like(grid, n1[0])),
                          "--", color=color, alpha=0.6)
        ax.set_title(f"{fit.subset.split(',')[1].strip() if ',' in fit.subset else fit.subset}\n"
                     f"{fit.form}" + (" (solid), joint (dashed)" if joint is not None else ""), fontsize=8)
        ax.set_xlabel("D2 (tokens)")
        ax.set_ylabel("validation loss (nats)")
        ax.legend(fontsize=7)
    for ax in axes[len(fits):]:
        ax.set_axis_off()
    return _save(fig, path)


def _local_slopes(fit: LawFit, table: ResultsTable) -> list[tuple[float, float]]:
    """(D1, -slope of ln(L - terms without D2) against ln D2) from the data at each D1."""
    idx = _rows(table, fit.run_ids)
    cols = {c: table.col(c)[idx] for c in ("D1", "D2", "N1", "N2")}
    law = fit.law
    des = design(law, scale_columns(cols, fit.units))
    theta = to_internal(law, fit.values)
    log_terms = np.einsum("knp,p->kn", des.F, theta) + des.c
    static = np.zeros(len(idx))
    for k, term in enumerate(law.terms):
        if not any("D2" in feature for _, feature, _ in term.powers):
            static += np.exp(log_terms[k])
    rest = table.col("val_loss")[idx] - static
    out = []
    for level in np.unique(cols["D1"]):
        sel = (cols["D1"] == level) & (rest > 0)
        if sel.sum() >= 2 and len(np.unique(cols["D2"][sel])) >= 2:
            slope = np.polyfit(np.log(cols["D2"][sel]), np.log(rest[sel]), 1)[0]
            out.append((float(level), float(-slope)))
    return out


def plot_exponent(result: AnalysisResult, table: ResultsTable, path: Path) -> Path:
    fig = _figure()
    ax = fig.subplots()
    fits = _chosen_d1d2(result) + [f for f in result.fits if f.form == "joint"]
    fits = [f for f in fits if "a2" in f.values]
    if not fits:
        _note(ax, "no D1-D2 or joint fit (see loo.md)")
        return _save(fig, path)
    for i, fit in enumerate(fits):
        idx = _rows(table, fit.run_ids)
        d1 = table.col("D1")[idx]
        ln = np.linspace(np.log(d1.min()) - 0.3, np.log(d1.max()) + 0.3, 60)
        ln_unit = ln - np.log(fit.units.tokens_per_unit)
        color = f"C{i % 10}"
        label = f"{fit.form}: {fit.subset.split(',')[1].strip() if ',' in fit.subset else fit.subset}"
        ax.plot(ln, fit.values["a2"] - fit.values.get("a3", 0.0) * ln_unit, "-", color=color, label=label)
        samples = [v for v in fit.bootstrap_values() if v]
        if len(samples) >= 2:
            curves = np.array([s["a2"] - s.get("a3", 0.0) * ln_unit for s in samples])
            lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(ln, lo, hi, color=color, alpha=0.15)
        slopes = _local_slopes(fit, table)
        if slopes:
            ax.plot(np.log([s[0] for s in slopes]), [s[1] for s in slopes], "o", color=color, alpha=0.8)
    ax.set_xlabel("ln D1 (D1 in tokens)")
    ax.set_ylabel("D2 exponent  a2 - a3 ln D1")
    ax.set_title("Effective D2 exponent (line: fit, band: 95% bootstrap, dots: local slope of data)", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_predicted_vs_observed(result: AnalysisResult, table: ResultsTable, path: Path) -> Path:
    fig = _figure(11.0, 4.8)
    ax, res_ax = fig.subplots(1, 2)
    chosen = {(s.subset, s.chosen) for s in result.selections}
    influential = {(s.family, s.subset): s.influential for s in result.selections}
    families = {f.family for f in result.fits}
    shown = [f for f in result.fits
             if (f.subset, f.form) in chosen or f.family in families - {"d1d2", "config"}]
    lo, hi = np.inf, -np.inf
    for i, fit in enumerate(shown):
        observed = table.col("val_loss")[_rows(table, fit.run_ids)]
        fitted = np.array([fit.fitted[r] for r in fit.run_ids])
        color = f"C{i % 10}"
        ax.plot(observed, fitted, "o", color=color, ms=4, label=_label(f"{fit.form} ({fit.subset})"))
        res_ax.plot(observed, fitted - observed, "o", color=color, ms=4)
        if fit.loo:
            loo_error = np.array([fit.loo.errors[r] for r in fit.run_ids])
            ax.plot(observed, observed + loo_error, "x", color=color, ms=4)
            res_ax.plot(observed, loo_error, "x", color=color, ms=4)
            named = influential.get((fit.family, fit.subset), []) if (fit.subset, fit.form) in chosen else []
            for run_id in named:  # the runs that decide the choice (selection.py), by name
                j = fit.run_ids.index(run_id)
                res_ax.annotate(run_id, (observed[j], loo_error[j]), fontsize=6, color=color,
                                xytext=(3, 3), textcoords="offset points")
            lo, hi = min(lo, (observed + loo_error).min()), max(hi, (observed + loo_error).max())
        lo, hi = min(lo, observed.min(), fitted.min()), max(hi, observed.max(), fitted.max())
    if shown:
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        res_ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("observed validation loss (nats)")
    ax.set_ylabel("predicted (o: in-sample, x: leave-one-out)")
    res_ax.set_xlabel("observed validation loss (nats)")
    res_ax.set_ylabel("predicted - observed (nats)")
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_dstar(result: AnalysisResult, path: Path) -> Path:
    return _save(dstar_figure(result), path)


def dstar_figure(result: AnalysisResult):
    """The D*(N1) figure (unsaved): curves, bands, and marks where the laws do not cross."""
    fig = _figure()
    ax = fig.subplots()
    paper = result.dstar_paper
    n1 = np.array([r.n1 for r in paper.rows])
    ax.loglog(n1, [r.closed_form for r in paper.rows], "k-", label="paper closed form")
    num = [(r.n1, r.dstar) for r in paper.rows if r.dstar is not None]
    if num:
        ax.loglog(*zip(*num), "o-", color="C0", label="numeric, paper Table 2 parameters")
    _no_crossing_marks(ax, paper.rows, "C0", "paper parameters")
    band: dict[float, list[float]] = {}
    tried: dict[float, int] = {}
    for s in paper.sensitivity:
        tried[s.n1] = tried.get(s.n1, 0) + 1
        if s.dstar is not None:
            band.setdefault(s.n1, []).append(s.dstar)
    if band:
        xs = sorted(band)
        partial = [x for x in xs if len(band[x]) < tried[x]]
        label = f"a1 or a2 nudged by +/-{abs(paper.sensitivity[0].delta):g}"
        if partial:
            label += (f"; at N1 = {', '.join(f'{x:.2g}' for x in partial)} only "
                      f"{', '.join(f'{len(band[x])}' for x in partial)} of {tried[partial[0]]} nudges cross")
        ax.fill_between(xs, [min(band[x]) for x in xs], [max(band[x]) for x in xs], color="C0", alpha=0.15,
                        label=_label(label))
    if result.dstar_fitted is not None:
        rows = [r for r in result.dstar_fitted.rows if r.dstar is not None]
        if rows:
            ax.loglog([r.n1 for r in rows], [r.dstar for r in rows], "s-", color="C3", label="numeric, fitted laws")
            ci = [r for r in rows if r.ci_low is not None and np.isfinite(r.ci_high or np.inf)]
            if ci:
                ax.fill_between([r.n1 for r in ci], [r.ci_low for r in ci], [r.ci_high for r in ci], color="C3",
                                alpha=0.15, label="fitted, 95% bootstrap")
        _no_crossing_marks(ax, result.dstar_fitted.rows, "C3", "fitted laws")
        if result.dstar_fitted.warnings:
            ax.text(0.01, 0.01, _label("caution: " + "; ".join(result.dstar_fitted.warnings), 90),
                    transform=ax.transAxes, fontsize=6, va="bottom", color="C3")
    ax.set_xlabel("N1 (dense parameters)")
    ax.set_ylabel("D* (tokens)")
    ax.set_title("Upcycling beats an MoE from scratch below D*", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _no_crossing_marks(ax, rows, color: str, what: str) -> None:
    """N1 values where the laws do not cross: an upward triangle at the top of the search range."""
    from megatron_upcycle.scaling.derived import DSTAR_RANGE
    from megatron_upcycle.scaling.records import range_text

    missing = [r.n1 for r in rows if r.dstar is None]
    if missing:
        top = max([r.closed_form for r in rows] + [r.dstar for r in rows if r.dstar is not None]) * 3
        ax.loglog(missing, [top] * len(missing), "^", color=color, ms=7, linestyle="none",
                  label=_label(f"no crossing in {range_text(DSTAR_RANGE)} ({what})"))


def write_all(directory: str | os.PathLike, result: AnalysisResult, table: ResultsTable) -> list[Path]:
    directory = Path(directory)
    return [
        plot_loss_vs_d2(result, table, directory / "loss_vs_d2.png"),
        plot_exponent(result, table, directory / "exponent_vs_lnd1.png"),
        plot_predicted_vs_observed(result, table, directory / "predicted_vs_observed.png"),
        plot_dstar(result, directory / "dstar_vs_n1.png"),
    ]
