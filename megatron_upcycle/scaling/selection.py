"""Leave-one-out errors and choosing a form by them.

Each run is left out in turn, the form is refitted to the others and the
held-out loss predicted; the RMS of those errors, in nats, ranks the forms of a
family fitted to the same rows. Refits start from the distinct optima the
full-data multi-start fit found (``FitOptions.loo_starts`` of them), which is
where a leave-one-out optimum lies unless one run moves the fit to another
basin; the grid itself is not rerun per left-out point.

One bad run can decide the choice: the RMS is dominated by the largest held-out
error, so a run 5% off moves it more than every other run together. ``select``
therefore also ranks the forms by the mean Huber loss of their held-out errors,
with delta = 1.345 x a robust scale of all of them (1.4826 x the median |error|
pooled over the forms): quadratic, like the RMS, for ordinary errors, linear for
a run far outside them. It says when the two criteria disagree, and for each run records its held-out error under every
form and the form RMS chooses once that run's held-out errors are dropped from
the comparison (the other refits still saw it: an exact double leave-one-out
would cost n times the refits). A run is *influential* when dropping it changes
the choice or its held-out error is more than ``OUTLIER_RATIO`` times the median
|error| of the chosen form.
"""
from __future__ import annotations

import numpy as np

from megatron_upcycle.scaling.fitting import FitOutcome, LawFitter
from megatron_upcycle.scaling.records import LawFit, LooSummary, PointInfluence, Selection

OUTLIER_RATIO = 5.0  # |held-out error| / median |held-out error|; a normal sample of 25 rarely passes 4
HUBER_K = 1.345  # the usual Huber tuning constant: 95% of the RMS's efficiency on normal errors


def leave_one_out(fitter: LawFitter, outcome: FitOutcome) -> LooSummary:
    """Held-out errors, plus the jackknife standard error of every parameter (free with the refits)."""
    before = fitter.n_bfgs_runs
    warm = outcome.warm_starts[: fitter.options.loo_starts]
    errors: dict[str, float] = {}
    params: dict[str, list[float]] = {p: [] for p in fitter.law.params}
    for i in range(fitter.n):
        weights = np.ones(fitter.n)
        weights[i] = 0.0
        values, log_pred = fitter.refit(warm, weights)
        errors[fitter.data.run_ids[i]] = float(np.exp(log_pred[i]) - fitter.data.loss[i])
        for p, v in values.items():
            params[p].append(v)
    err = np.array(list(errors.values()))
    n = fitter.n
    # Jackknife: se^2 = (n - 1) / n * sum_i (theta_(i) - mean)^2.
    jackknife = {p: float(np.sqrt((n - 1) / n * np.sum((np.asarray(v) - np.mean(v)) ** 2)))
                 for p, v in params.items()}
    return LooSummary(rms=float(np.sqrt(np.mean(err**2))), max_abs=float(np.max(np.abs(err))), errors=errors,
                      n_bfgs_runs=fitter.n_bfgs_runs - before, jackknife_se=jackknife,
                      median_abs=float(np.median(np.abs(err))))


def select(fits: list[LawFit]) -> Selection | None:
    """The form with the smallest LOO RMS among fits of one family on one subset, beside the
    form with the smallest median |LOO error| and each run's influence on the choice."""
    scored = [f for f in fits if f.loo is not None and np.isfinite(f.loo.rms)]
    if not scored:
        return None
    scored.sort(key=lambda f: f.loo.rms)
    margin = scored[1].loo.rms - scored[0].loo.rms if len(scored) > 1 else float("nan")
    chosen = scored[0].form
    forms = [f.form for f in scored]
    run_ids = [r for r in scored[0].run_ids if all(r in f.loo.errors for f in scored)]
    errors = np.array([[f.loo.errors[r] for r in run_ids] for f in scored])  # (forms, runs)
    median_abs = {f.form: float(np.median(np.abs(e))) for f, e in zip(scored, errors)}
    delta = HUBER_K * 1.4826 * float(np.median(np.abs(errors))) if errors.size else 0.0
    huber = {f.form: held_out_huber(e, delta) for f, e in zip(scored, errors)}
    robust = min(huber, key=huber.get) if delta > 0 else chosen
    points = []
    typical = median_abs[chosen]
    for j, run_id in enumerate(run_ids):
        rest = np.delete(errors, j, axis=1)
        without = forms[int(np.argmin(np.sqrt(np.mean(rest**2, axis=1))))] if rest.shape[1] else chosen
        far = typical > 0 and abs(errors[0, j]) > OUTLIER_RATIO * typical
        points.append(PointInfluence(run_id=run_id, loo_error={f: float(errors[i, j]) for i, f in enumerate(forms)},
                                     chosen_without=without, influential=bool(without != chosen or far)))
    influential = sorted((p for p in points if p.influential),
                         key=lambda p: (p.chosen_without == chosen, -abs(p.loo_error[chosen])))
    selection = Selection(family=scored[0].family, subset=scored[0].subset, chosen=chosen,
                          loo_rms={f.form: f.loo.rms for f in fits if f.loo is not None}, margin=float(margin),
                          loo_median_abs=median_abs, loo_huber=huber, huber_delta=delta,
                          robust_chosen=robust, points=points,
                          influential=[p.run_id for p in influential])
    selection.verdict = verdict(selection)
    return selection


def held_out_huber(errors: np.ndarray, delta: float) -> float:
    """Mean Huber loss of held-out errors (nats^2 scale): r^2/2 inside delta, delta (|r| - delta/2) outside."""
    a = np.abs(np.asarray(errors, dtype=float))
    if delta <= 0:
        return float(np.mean(0.5 * a * a))
    return float(np.mean(np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))))


def point_text(selection: Selection, run_id: str) -> str:
    """Why one run is influential, in a few words."""
    p = next(p for p in selection.points if p.run_id == run_id)
    error = p.loo_error[selection.chosen]
    typical = selection.loo_median_abs.get(selection.chosen, 0.0)
    parts = [f"held-out error {error:+.3g} nats"]
    if typical > 0 and abs(error) >= 2 * typical:
        parts[0] += f" ({abs(error) / typical:.0f}x the median)"
    if p.chosen_without != selection.chosen:
        parts.append(f"without it RMS chooses {p.chosen_without}")
    return f"{run_id} ({', '.join(parts)})"


def verdict(selection: Selection) -> str:
    """One sentence: do LOO RMS and the held-out Huber loss agree, and which runs decide the choice."""
    s = selection
    if s.criteria_agree:
        text = f"LOO RMS and the held-out Huber loss both choose {s.chosen}"
    else:
        text = (f"the criteria disagree: LOO RMS chooses {s.chosen}, the held-out Huber loss (robust to a few "
                f"runs) chooses {s.robust_chosen}")
    if s.influential:
        shown = s.influential[:5]
        more = f" and {len(s.influential) - len(shown)} more" if len(s.influential) > len(shown) else ""
        text += "; influential runs: " + "; ".join(point_text(s, r) for r in shown) + more
    else:
        text += "; no single run changes the choice"
    return text + "."
