"""Markdown reports: loo.md (form comparison and parameters) and dstar.md (D*, compute-optimal).

Every table states its units; every fitted number sits beside its bootstrap
interval (trap 3: on small grids the exponents and E are poorly identified).
"""
from __future__ import annotations

import os

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.scaling import published
from megatron_upcycle.scaling.derived import DSTAR_RANGE
from megatron_upcycle.scaling.records import AnalysisResult, DStarReport, LawFit, range_text


def g(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf (no crossing)"
    return f"{x:.{digits}g}"


def _ci(lo, hi, digits: int = 3) -> str:
    return "-" if lo is None or hi is None else f"[{g(lo, digits)}, {g(hi, digits)}]"


def _header(result: AnalysisResult) -> list[str]:
    fit_opts = result.fits[0] if result.fits else None
    boot = next((f.bootstrap for f in result.fits if f.bootstrap), None)
    lines = [
        f"Source: `{os.path.basename(result.results_csv)}`. Units: {result.units.describe()}.",
        f"Fitting: Huber loss (delta = {result.huber_delta:g}) on ln L, summed over runs, right-hand side as a "
        "LogSumExp; scipy BFGS with the exact gradient from a grid of starts over the exponents (amplitudes "
        "set by non-negative least squares at each grid point; the grid is listed per fit below).",
    ]
    if boot:
        lines.append(f"Uncertainty: {boot.n_samples} bootstrap resamples of the runs (seed {boot.seed}), "
                     f"{100 * boot.ci:.0f}% percentile intervals.")
    if fit_opts is None:
        lines.append("No form could be fitted.")
    return lines


def loo_markdown(result: AnalysisResult) -> str:
    lines = ["# Scaling-law fits: leave-one-out comparison", ""] + _header(result) + [""]
    lines += ["## Forms by leave-one-out RMS (nats)", "",
              "Chosen by LOO RMS. Beside it, a robust criterion: the mean Huber loss of the held-out errors, "
              "delta = 1.345 x 1.4826 x their median |error| over the forms (quadratic for ordinary errors, "
              "linear for a run far outside them, so one bad run cannot decide it). Influential runs: dropping "
              "one changes the choice, or its held-out error is more than 5x the median.", "",
              "| family | subset | form | runs | free params | LOO RMS | held-out Huber (nats^2) | median abs LOO error | "
              "max abs LOO error | in-sample RMS | chosen | influential runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    chosen = {(s.subset, s.chosen) for s in result.selections}
    by_subset = {(s.family, s.subset): s for s in result.selections}
    for f in sorted(result.fits, key=lambda f: (f.family, f.subset, f.loo.rms if f.loo else 0)):
        free = sum(not p.fixed for p in f.params)
        sel = by_subset.get((f.family, f.subset))
        mark = "**yes**" if (f.subset, f.form) in chosen else ""
        if sel is not None and sel.robust_chosen == f.form and not sel.criteria_agree:
            mark += " (robust choice)"
        named = ", ".join(sel.influential) if sel is not None and (f.subset, f.form) in chosen else ""
        median = f.loo.median_abs if f.loo else None
        huber = sel.loo_huber.get(f.form) if sel is not None else None
        lines.append(f"| {f.family} | {f.subset} | `{f.form}` | {f.n_points} | {free} | {g(f.loo.rms)} | "
                     f"{g(huber)} | {g(median)} | {g(f.loo.max_abs)} | {g(f.rms_in_sample)} | {mark.strip()} | "
                     f"{named or '-'} |")
    for s in result.selections:
        if s.margin == s.margin:
            lines.append(f"\n{s.family}, {s.subset}: `{s.chosen}` chosen, LOO RMS lower than the runner-up "
                         f"by {s.margin:.2g} nats.")
        if s.verdict:
            lines.append(f"Criteria and influence: {s.verdict}")
    lines += _influence_sections(result)
    unidentified = result.identification_notes()
    if unidentified:
        lines += ["", "## Parameters the runs do not identify", "",
                  "Checks: the design (distinct values per variable against the form's exponents and offset), "
                  "the starts (same objective, different parameters), the Hessian's condition and the bootstrap "
                  "interval. Read these parameters as undetermined, and anything built on them (the joint law's "
                  "fixed E, D*, compute-optimal, the advice) with the same caution.", ""]
        lines += [f"- {line}" for line in unidentified]
    lines += ["", "## Parameters (value with its uncertainty)", "",
              "Bootstrap intervals for the forms chosen by leave-one-out and those D* uses; jackknife standard "
              "errors (from the leave-one-out refits) for every form. Wide intervals at the same objective "
              "mean the runs do not pin the parameter down (E trades off against the exponents).", ""]
    for f in result.fits:
        lines += _fit_section(f)
    if result.effective_exponents:
        lines += ["## Effective D2 exponent a2 - a3 ln D1 (D1 in tokens)", "",
                  "| form | subset | D1 (tokens) | exponent | interval |", "|---|---|---|---|---|"]
        for e in result.effective_exponents:
            lines.append(f"| `{e.form}` | {e.subset} | {g(e.d1)} | {g(e.exponent)} | {_ci(e.ci_low, e.ci_high)} |")
        lines.append("")
    if result.skipped:
        lines += ["## Skipped forms", "", "| form | subset | reason |", "|---|---|---|"]
        lines += [f"| `{s.form}` | {s.subset} | {s.reason} |" for s in result.skipped]
        lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines.append(f"{result.n_bfgs_runs} BFGS runs in all (full fits, leave-one-out and bootstrap refits).")
    return "\n".join(lines) + "\n"


def _influence_sections(result: AnalysisResult) -> list[str]:
    """Per run of each compared subset: its held-out error under every form and the choice without it."""
    lines = []
    for s in result.selections:
        if not s.points:
            continue
        forms = list(s.points[0].loo_error)
        lines += ["", f"### Leave-one-out error per run: {s.family}, {s.subset}", "",
                  "Held-out error (predicted - observed, nats) under each form; \"chosen without it\": the form "
                  "LOO RMS picks when that run's held-out errors are dropped from the comparison.", "",
                  "| run | " + " | ".join(f"`{f}`" for f in forms) + " | chosen without it | influential |",
                  "|---|" + "---|" * len(forms) + "---|---|"]
        for p in s.points:
            lines.append(f"| {p.run_id} | " + " | ".join(f"{p.loo_error[f]:+.3g}" for f in forms)
                         + f" | `{p.chosen_without}` | {'**yes**' if p.influential else ''} |")
    return lines


def _fit_section(f: LawFit) -> list[str]:
    s = f.starts
    grid = "; ".join(f"{k} in {{{', '.join(f'{v:g}' for v in vals)}}}" for k, vals in s.grid.items())
    lines = [f"### `{f.form}`: {f.subset}", "", f"{f.formula}  ({f.units.describe()})", "",
             "| parameter | value | bootstrap interval | bootstrap std | jackknife SE | spread over agreeing starts | "
             "identified |",
             "|---|---|---|---|---|---|---|"]
    for p in f.params:
        spread = "fixed" if p.fixed else g(s.param_spread.get(p.name), 2)
        lines.append(f"| {p.name} | {g(p.value, 5)} | {_ci(p.ci_low, p.ci_high)} | {g(p.std, 2)} | "
                     f"{g(p.jackknife_se, 2)} | {spread} | {'yes' if p.identified else '**no**'} |")
    lines += ["", f"Starts: {s.n_grid_points} grid points ({grid}); BFGS from the best {s.n_bfgs_runs}; "
                  f"{s.n_agreeing} reached the best objective {s.best_objective:.6g} (worst {s.worst_objective:.6g}); "
                  f"{s.n_converged} met the gradient tolerance, the rest stopped on line-search precision."]
    if f.bootstrap:
        lines.append(f"Bootstrap: {f.bootstrap.n_samples - f.bootstrap.n_failed} of {f.bootstrap.n_samples} "
                     f"resamples fitted.")
    lines += [f"Note: {n}" for n in f.notes]
    line = f.identification_line()
    if line:
        lines.append(f"Not identified: {line.split(': ', 1)[1]}")
    return lines + [""]


def dstar_markdown(result: AnalysisResult) -> str:
    lines = ["# D*: when upcycling stops paying", "",
             "D*(N1) solves L_moe(D) = L_upc(D1 = D, D2 = D): an MoE trained from scratch on D tokens matches an "
             "MoE upcycled from a dense model of size N1 trained on D tokens and then trained D more. Below the "
             "first crossing upcycling is predicted better. Solved numerically (log grid plus Brent) over "
             f"{range_text(DSTAR_RANGE)}; the paper's closed form is "
             "D* ~= 4 (N1/1e9)^(-0.7 + 0.04 ln(N1/1e9)) billion tokens. Units: D in tokens, N1 in parameters, "
             "losses in nats.", ""]
    lines += ["## With the paper's published joint-law parameters", "",
              f"Source: {published.SOURCE}.", "",
              f"- dense: L = {published.DENSE['A']} D^-{published.DENSE['a']} + {published.DENSE['B']} "
              f"N^-{published.DENSE['b']} + {published.E_SHARED}",
              f"- MoE from scratch: L = {published.MOE['A']} D^-{published.MOE['a']} + {published.MOE['B']} "
              f"N1^-{published.MOE['b']} + {published.E_SHARED}",
              f"- upcycled: L = {published.UPCYCLED['A']} D1^-{published.UPCYCLED['a1']} "
              f"D2^(-{published.UPCYCLED['a2']} + {published.UPCYCLED['a3']} ln D1) + {published.UPCYCLED['B']} "
              f"N1^-{published.UPCYCLED['b']} + {published.E_SHARED}", ""]
    lines += _dstar_tables(result.dstar_paper, with_ci=False)
    lines += ["## With the fitted laws", ""]
    if result.dstar_fitted is None:
        lines += ["Not available: needs the joint law (two or more model sizes) and the dense + MoE fit "
                  "(see loo.md, skipped forms).", ""]
    else:
        lines += [f"Laws: {result.dstar_fitted.source}.", ""]
        lines += [f"**Caution**: {w}." for w in result.dstar_fitted.warnings]
        lines += [""] if result.dstar_fitted.warnings else []
        lines += _dstar_tables(result.dstar_fitted, with_ci=True)
    lines += ["## Compute-optimal upcycling", "",
              f"Minimise L(D1, D2, N1) at fixed sunk D1 subject to C2 = 6 N2 D2 with N2 = ratio * N1 "
              f"(ratio = N2/N1 of the configuration; {result.n2_over_n1:.4g} in this table, 1.75 for the paper's "
              "8 experts top-2).", "",
              "| laws | D1 (tokens) | C2 (FLOPs) | N2/N1 | N1* (parameters) | interval | D2* (tokens) | interval | "
              "loss (nats) | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result.compute_optimal:
        n1_ci = _ci(*c.n1_ci) if c.n1_ci else "-"
        d2_ci = _ci(*c.d2_ci) if c.d2_ci else "-"
        lines.append(f"| {c.laws} | {g(c.d1)} | {g(c.c2)} | {g(c.n2_over_n1)} | {g(c.n1)} | {n1_ci} | {g(c.d2)} | "
                     f"{d2_ci} | {g(c.loss)} | {c.note} |")
    return "\n".join(lines) + "\n"


def _dstar_tables(rep: DStarReport, with_ci: bool) -> list[str]:
    head = "| N1 (parameters) | D* numeric (tokens) |"
    sep = "|---|---|"
    if with_ci:
        head += " interval |"
        sep += "---|"
    head += " all crossings (tokens) | closed form (tokens) | numeric / closed | closest gap (nats) at D (tokens) |"
    sep += "---|---|---|---|"
    lines = [head, sep]
    for r in rep.rows:
        row = f"| {g(r.n1, 3)} | {g(r.dstar, 3) if r.dstar is not None else 'none in ' + range_text(DSTAR_RANGE)} |"
        if with_ci:
            row += f" {_ci(r.ci_low, r.ci_high)} |"
        row += (f" {', '.join(g(x, 3) for x in r.numeric) or '-'} | {g(r.closed_form, 3)} | {g(r.ratio, 3)} | "
                f"{r.closest_gap:.1e} at {g(r.closest_at, 3)} |")
        lines.append(row)
    lines += ["", f"Where and by how much they differ: {rep.summary}", "",
              "Sensitivity: D* after nudging one exponent of the upcycled law (all else fixed).", "",
              "| N1 (parameters) | parameter | change | D* (tokens) | D* / unchanged D* |", "|---|---|---|---|---|"]
    for s in rep.sensitivity:
        lines.append(f"| {g(s.n1, 3)} | {s.param} | {s.delta:+g} | {g(s.dstar, 3) if s.dstar is not None else 'none'} "
                     f"| {g(s.ratio_to_base, 3)} |")
    return lines + [""]


def write_loo_md(path: str | os.PathLike, result: AnalysisResult) -> None:
    write_text_atomic(path, loo_markdown(result))


def write_dstar_md(path: str | os.PathLike, result: AnalysisResult) -> None:
    write_text_atomic(path, dstar_markdown(result))
