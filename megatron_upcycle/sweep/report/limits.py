"""What this study can and cannot show, computed from the study: sizes, points per law,
the intervals the fits got, the token range, the noise."""
from __future__ import annotations

import numpy as np

from megatron_upcycle.sweep.report.context import ReportContext
from megatron_upcycle.sweep.report.fits import headline_fits
from megatron_upcycle.sweep.report.summary import model_line


def _interval_lines(result) -> list[str]:
    lines = []
    for fit in headline_fits(result):
        free = [p for p in fit.params if not p.fixed]
        wide = [p for p in free if p.ci_low is not None and p.value and
                (p.ci_low <= 0 <= p.ci_high or p.ci_high - p.ci_low > abs(p.value))]
        if "a3" in fit.values and fit.param("a3").ci_low is not None:
            a3 = fit.param("a3")
            resolved = not (a3.ci_low <= 0.0 <= a3.ci_high)
            lines.append(f"- `{fit.form}` ({fit.subset}): the interaction a3 = {a3.value:.3g} "
                         f"[{a3.ci_low:.3g}, {a3.ci_high:.3g}] is {'resolved' if resolved else '**not** resolved'} "
                         "(interval " + ("excludes" if resolved else "includes") + " 0).")
        ratio = fit.n_points / max(len(free), 1)
        text = (f"- `{fit.form}` ({fit.subset}): {fit.n_points} runs for {len(free)} free parameters "
                f"({ratio:.1f} per parameter)")
        if wide:
            text += ("; intervals wider than the value or spanning 0: " + ", ".join(p.name for p in wide)
                     + " (these are not pinned down)")
        lines.append(text + ".")
    return lines


def limits_section(ctx: ReportContext) -> list[str]:
    exp = ctx.plan.experiment
    sizes = ctx.dense_sizes()
    tokens = [float(r[c]) for r in ctx.rows for c in ("D1", "D2") if r.get(c)]
    lines = []
    if sizes:
        spread = max(sizes) / min(sizes)
        lines.append(f"- {len(sizes)} dense size(s), N1 from {min(sizes):,.0f} to {max(sizes):,.0f} parameters "
                     f"({spread:.2g}x):" if len(sizes) > 1 else
                     f"- One dense size (N1 = {sizes[0]:,.0f} parameters): the N terms of Chinchilla, the joint law "
                     "and D*(N1) need two or more; the one-size laws stand in at this size only.")
        lines += model_line(ctx) if len(sizes) > 1 else []
    if tokens:
        lo, hi = min(tokens), max(tokens)
        lines.append(f"- Token budgets from {lo:,.0f} to {hi:,.0f} ({hi / lo:.2g}x): D* and the advice outside this "
                     "range, and at the paper's N1, are extrapolations of the fitted laws.")
    if ctx.analysis is not None:
        lines += _interval_lines(ctx.analysis)
    if not exp.seeds.extra:
        lines.append(f"- Run-to-run noise not measured ({len(exp.seeds.runs)} seed(s), no noise probe).")
    cpt = [r for r in ctx.rows if r["kind"] == "cpt"]
    if cpt:
        lines.append(f"- {len(cpt)} dense-CPT runs check the advisor's assumption that CPT follows the dense law at "
                     "D1 + D2 (see Notes in the fits); CPT is not fitted on its own.")
    losses = np.array([float(r["val_loss"]) for r in ctx.rows]) if ctx.rows else np.array([])
    if losses.size:
        lines.append(f"- Validation losses span {losses.min():.3f}-{losses.max():.3f} nats on a fixed held-out set "
                     f"of the study's data ({exp.training.eval_tokens:,} tokens).")
    return ["## What a study of this size can and cannot show", "\n".join(lines)]
