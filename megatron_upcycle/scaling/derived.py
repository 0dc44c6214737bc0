"""Quantities derived from the fitted laws: D*, the effective exponent, compute-optimal
upcycling, and the advisor (upcycle, train an MoE from scratch, or continue the dense model).

Conventions: D in tokens, N in parameters, losses in nats. ``Predictors`` holds
named parameter sets in raw units (fits in other units are converted when read).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq

from megatron_upcycle.errors import UserError
from megatron_upcycle.scaling import identification, published
from megatron_upcycle.scaling.bootstrap import interval
from megatron_upcycle.scaling.laws import LAWS, Units, effective_exponent, predict
from megatron_upcycle.scaling.records import (Advice, AdviceOption, ComputeOptimal, DStarReport, DStarRow,
                                              DStarSensitivity, EffectiveExponent, LawFit, range_text,
                                              scale_columns)

# D* is searched for in this token range (a crossing outside it is reported as none).
DSTAR_RANGE = (1e4, 1e15)  # from below CPU-study budgets to beyond any LLM
PAPER_N1 = (1e8, 2e8, 5e8, 1e9, 2e9, 5e9, 1e10)
SENSITIVITY_DELTA = 5e-4


@dataclass
class Predictors:
    """Loss predictors in raw units: dense L(D, N), MoE L(D, N1), upcycled L(D1, D2, N1).

    ``upcycled_form`` is "joint" (any N1) or a d1d2 form valid only at ``upcycled_n1``.
    ``moe_uses_n2``: the MoE law was fitted against N2; it is evaluated at N2 = ratio * N1.
    """

    source: str
    n2_over_n1: float
    dense: dict[str, float] | None = None
    moe: dict[str, float] | None = None
    moe_uses_n2: bool = False
    upcycled: dict[str, float] | None = None
    upcycled_form: str = "joint"
    upcycled_n1: float | None = None
    # "chinchilla" (any N) or "one_size" (valid only at dense_n / moe_n, parameters).
    dense_form: str = "chinchilla"
    dense_n: float | None = None
    moe_form: str = "chinchilla"
    moe_n: float | None = None
    samples: list["Predictors"] = field(default_factory=list)  # bootstrap, aligned by index
    # Sentences for every law here built on parameters the runs do not identify (identification.py).
    warnings: list[str] = field(default_factory=list)

    def dense_loss(self, d, n):
        _check_size(self.dense_form, self.dense_n, n, "dense")
        return predict(LAWS[self.dense_form], self.dense, {"D": np.asarray(d, float), "N": np.asarray(n, float)})

    def moe_loss(self, d, n1):
        n = np.asarray(n1, float) * (self.n2_over_n1 if self.moe_uses_n2 else 1.0)
        _check_size(self.moe_form, self.moe_n, n, "MoE-from-scratch")
        return predict(LAWS[self.moe_form], self.moe, {"D": np.asarray(d, float), "N": n})

    def upcycled_loss(self, d1, d2, n1):
        d1, d2, n1 = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (d1, d2, n1)))
        if self.upcycled_form != "joint" and not np.allclose(n1, self.upcycled_n1, rtol=0.01):
            raise UserError(f"the upcycled law here is a D1-D2 fit of one model (N1 = {self.upcycled_n1:.4g}); "
                            f"it cannot predict N1 = {float(np.ravel(n1)[0]):.4g} (a joint fit needs 2+ model sizes)")
        cols = {"D1": d1, "D2": d2, "N1": n1}
        return predict(LAWS[self.upcycled_form], self.upcycled, cols)


def _check_size(form: str, fitted_n: float | None, n, what: str) -> None:
    if form == "one_size" and not np.allclose(n, fitted_n, rtol=0.01):
        raise UserError(f"the {what} law here is a one-size fit (N = {fitted_n:.4g}); it cannot predict "
                        f"N = {float(np.ravel(n)[0]):.4g} (a Chinchilla fit needs 2+ model sizes)")


def _one_size(fits: list[LawFit], prefix: str, n: float) -> LawFit | None:
    """The one-size fit of the ``prefix`` runs ("dense" or "MoE") at size n (parameters)."""
    return next((f for f in fits if f.form == "one_size" and f.subset.startswith(prefix) and f.n1 is not None
                 and abs(f.n1 - n) <= 0.01 * n), None)


def paper_predictors(n2_over_n1: float = 1.75) -> Predictors:
    """The paper's Table 2 laws (published, rounded)."""
    return Predictors(source=published.SOURCE, n2_over_n1=n2_over_n1, dense=dict(published.DENSE),
                      moe=dict(published.MOE), upcycled=dict(published.UPCYCLED))


def _raw(fit: LawFit, values: dict[str, float]) -> dict[str, float]:
    """Parameters of a fit in other units -> raw tokens / parameters (multiplicative forms only)."""
    u = fit.units
    if u.tokens_per_unit == 1.0 and u.parameters_per_unit == 1.0:
        return dict(values)
    raise UserError(f"fit {fit.form} is in {u.describe()}; derived quantities need raw tokens and parameters")


def _split_shared(values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    dense = {"A": values["A_dense"], "a": values["a_dense"], "B": values["B_dense"], "b": values["b_dense"],
             "E": values["E"]}
    moe = {"A": values["A_moe"], "a": values["a_moe"], "B": values["B_moe"], "b": values["b_moe"], "E": values["E"]}
    return dense, moe


def _split_one_size(values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    return ({"A": values["A_dense"], "a": values["a_dense"], "E": values["E"]},
            {"A": values["A_moe"], "a": values["a_moe"], "E": values["E"]})


def fitted_predictors(fits: list[LawFit], n2_over_n1: float, n1: float | None = None,
                      selections: dict[str, str] | None = None) -> Predictors:
    """Predictors from fitted laws: shared-E dense/MoE (else separate Chinchilla fits) and the
    joint law (else the chosen D1-D2 form of the model with this N1)."""
    by_form = {}
    for f in fits:
        by_form.setdefault(f.form, []).append(f)
    pred = Predictors(source="", n2_over_n1=n2_over_n1)
    parts = []
    used: list[tuple[LawFit, str]] = []  # (fit, its role) for the identification warnings
    dense_samples: list = []
    moe_samples: list = []
    if "dense_moe_shared_E" in by_form:
        shared = by_form["dense_moe_shared_E"][0]
        pred.dense, pred.moe = _split_shared(_raw(shared, shared.values))
        pred.moe_uses_n2 = "N = N2" in shared.subset
        pairs = [_split_shared(v) if v else (None, None) for v in shared.bootstrap_values()]
        dense_samples, moe_samples = [p[0] for p in pairs], [p[1] for p in pairs]
        parts.append("dense_moe_shared_E")
        used.append((shared, "the dense and MoE-from-scratch laws"))
    else:
        for f in by_form.get("chinchilla", []):
            if f.subset.startswith("dense"):
                pred.dense = _raw(f, f.values)
                dense_samples = f.bootstrap_values()
                parts.append("chinchilla (dense)")
                used.append((f, "the dense law"))
            elif f.subset.startswith("MoE"):
                pred.moe = _raw(f, f.values)
                pred.moe_uses_n2 = "N = N2" in f.subset
                moe_samples = f.bootstrap_values()
                parts.append("chinchilla (MoE)")
                used.append((f, "the MoE-from-scratch law"))
    shared_one = next((f for f in fits if f.form == "one_size_shared_E" and f.n1 is not None
                       and abs(f.n1 - n1) <= 0.01 * n1), None) if n1 is not None else None
    if shared_one is not None and pred.dense is None and pred.moe is None:
        pred.dense, pred.moe = _split_one_size(_raw(shared_one, shared_one.values))
        pred.dense_form = pred.moe_form = "one_size"
        pred.dense_n = pred.moe_n = shared_one.n1
        pairs = [_split_one_size(v) if v else (None, None) for v in shared_one.bootstrap_values()]
        dense_samples, moe_samples = [p[0] for p in pairs], [p[1] for p in pairs]
        parts.append(f"one_size_shared_E [{shared_one.subset}]")
        used.append((shared_one, "the one-size dense and MoE-from-scratch laws"))
    if n1 is not None and pred.dense is None:
        f = _one_size(fits, "dense", n1)
        if f is not None:
            pred.dense, pred.dense_form, pred.dense_n = _raw(f, f.values), "one_size", f.n1
            dense_samples = f.bootstrap_values()
            parts.append(f"one_size [{f.subset}]")
            used.append((f, "the one-size dense law"))
    if n1 is not None and pred.moe is None:
        # The MoE runs' N is N1 (or N2 = ratio N1 when N1 was not recorded).
        f = next((f for f in fits if f.subset.startswith("MoE") and _one_size(
            [f], "MoE", n1 * (n2_over_n1 if "N = N2" in f.subset else 1.0)) is not None), None)
        if f is not None:
            pred.moe, pred.moe_form, pred.moe_n = _raw(f, f.values), "one_size", f.n1
            pred.moe_uses_n2 = "N = N2" in f.subset
            moe_samples = f.bootstrap_values()
            parts.append(f"one_size [{f.subset}]")
            used.append((f, "the one-size MoE-from-scratch law"))
    upc_samples: list = []
    if "joint" in by_form:
        joint = by_form["joint"][0]
        pred.upcycled, pred.upcycled_form = _raw(joint, joint.values), "joint"
        upc_samples = joint.bootstrap_values()
        parts.append("joint")
        used.append((joint, "the upcycled law"))
    elif n1 is not None:
        candidates = [f for f in fits if f.family == "d1d2" and f.n1 is not None
                      and (not selections or selections.get(f.subset) == f.form)]
        match = [f for f in candidates if abs(f.n1 - n1) <= 0.01 * n1]
        if candidates and not match:
            sizes = ", ".join(f"{f.n1:.4g}" for f in candidates)
            raise UserError(f"no upcycled law for N1 = {n1:.4g}: without a joint law (it needs 2+ model sizes) "
                            f"the fits cannot predict N1 other than the D1-D2 fits' models, N1 = {sizes}")
        if match:
            f = match[0]
            pred.upcycled, pred.upcycled_form, pred.upcycled_n1 = _raw(f, f.values), f.form, f.n1
            upc_samples = f.bootstrap_values()
            parts.append(f"{f.form} [{f.subset}]")
            used.append((f, "the upcycled law"))
    pred.source = "fitted: " + ", ".join(parts) if parts else "fitted: none"
    pred.warnings = [w for w in (identification.law_warning(f, role) for f, role in used) if w]
    # Samples are aligned by index (the joint law's sample i used the shared fit's E of
    # sample i); a law without a bootstrap contributes its point estimate; a failed
    # refit (None) drops that index.
    count = max(len(dense_samples), len(moe_samples), len(upc_samples))
    for i in range(count):
        laws = [(samples[i] if i < len(samples) else point) if point is not None else None
                for samples, point in ((dense_samples, pred.dense), (moe_samples, pred.moe),
                                       (upc_samples, pred.upcycled))]
        if any(law is None and point is not None
               for law, point in zip(laws, (pred.dense, pred.moe, pred.upcycled))):
            continue
        pred.samples.append(Predictors(
            source="bootstrap", n2_over_n1=n2_over_n1, dense=laws[0], moe=laws[1],
            moe_uses_n2=pred.moe_uses_n2, upcycled=laws[2], upcycled_form=pred.upcycled_form,
            upcycled_n1=pred.upcycled_n1, dense_form=pred.dense_form, dense_n=pred.dense_n,
            moe_form=pred.moe_form, moe_n=pred.moe_n))
    return pred


# ---- D* ------------------------------------------------------------------------

def solve_dstar(pred: Predictors, n1: float, d_range: tuple[float, float] = DSTAR_RANGE,
                n_grid: int = 1201) -> tuple[list[float], float | None, float, float]:
    """Crossings of L_moe(D) = L_upc(D1 = D, D2 = D) at this N1 (tokens).

    Returns (all crossings, D* = the first crossing where upcycling stops being the
    better choice, min |gap| in nats, where that minimum is). Solved on a log grid,
    each sign change refined with Brent's method in ln D.
    """
    def gap(ln_d):
        d = np.exp(ln_d)
        return pred.moe_loss(d, n1) - pred.upcycled_loss(d, d, n1)

    grid = np.linspace(np.log(d_range[0]), np.log(d_range[1]), n_grid)
    g = gap(grid)
    roots, first = [], None
    for i in np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0):
        root = float(np.exp(brentq(lambda x: float(gap(x)), grid[i], grid[i + 1], xtol=1e-12)))
        roots.append(root)
        # Upcycling better (L_upc < L_moe, gap > 0) below the root, worse above it.
        if first is None and g[i] > 0:
            first = root
    j = int(np.argmin(np.abs(g)))
    return roots, first, float(abs(g[j])), float(np.exp(grid[j]))


def _perturbed(pred: Predictors, name: str, delta: float) -> Predictors:
    upc = dict(pred.upcycled)
    upc[name] = upc[name] + delta
    return Predictors(source=pred.source, n2_over_n1=pred.n2_over_n1, dense=pred.dense, moe=pred.moe,
                      moe_uses_n2=pred.moe_uses_n2, upcycled=upc, upcycled_form=pred.upcycled_form,
                      upcycled_n1=pred.upcycled_n1, dense_form=pred.dense_form, dense_n=pred.dense_n,
                      moe_form=pred.moe_form, moe_n=pred.moe_n)


def dstar_report(pred: Predictors, n1_values=PAPER_N1, ci: float = 0.95,
                 sensitivity_params: tuple[str, ...] = ("a1", "a2"),
                 delta: float = SENSITIVITY_DELTA) -> DStarReport:
    """D*(N1) numerically beside the paper's closed form, with bootstrap intervals and sensitivity."""
    rows = []
    for n1 in n1_values:
        roots, first, closest, at = solve_dstar(pred, n1)
        closed = float(published.closed_form_dstar(n1))
        row = DStarRow(n1=float(n1), numeric=roots, dstar=first, closed_form=closed,
                       ratio=None if first is None else first / closed, closest_gap=closest, closest_at=at)
        if pred.samples:
            # A sample without a crossing means "upcycling wins over the whole range": +inf.
            values = [solve_dstar(s, n1)[1] for s in pred.samples]
            values = np.array([np.inf if v is None else v for v in values])
            tail = 100 * (1 - ci) / 2
            lo, hi = np.percentile(values, [tail, 100 - tail], method="nearest")
            row.ci_low, row.ci_high = float(lo), float(hi)
        rows.append(row)
    sens = []
    for n1 in n1_values:
        base = next(r.dstar for r in rows if r.n1 == n1)
        for name in sensitivity_params:
            for d in (-delta, delta):
                value = solve_dstar(_perturbed(pred, name, d), n1)[1]
                ratio = None if value is None or base is None else value / base
                sens.append(DStarSensitivity(n1=float(n1), param=name, delta=d, dstar=value, ratio_to_base=ratio))
    summary = _dstar_summary(rows, sens, delta)
    if pred.warnings:
        summary = "caution, " + "; ".join(pred.warnings) + ". " + summary
    return DStarReport(source=pred.source, units=Units(), rows=rows, sensitivity=sens, summary=summary,
                       warnings=list(pred.warnings))


def _dstar_summary(rows: list[DStarRow], sens: list[DStarSensitivity], delta: float) -> str:
    crossing = [r for r in rows if r.dstar is not None]
    missing = [r for r in rows if r.dstar is None]
    parts = []
    if crossing:
        worst = max(crossing, key=lambda r: abs(np.log(r.ratio)))
        best = min(crossing, key=lambda r: abs(np.log(r.ratio)))
        lo, hi = min(r.ratio for r in crossing), max(r.ratio for r in crossing)
        parts.append(f"where both exist, numeric D* / closed form ranges from {lo:.2f} to {hi:.2f}; "
                     f"closest at N1 = {best.n1:.3g} ({best.dstar:.3g} vs {best.closed_form:.3g} tokens), "
                     f"farthest at N1 = {worst.n1:.3g} ({worst.dstar:.3g} vs {worst.closed_form:.3g} tokens)")
    span = range_text(DSTAR_RANGE)
    if missing:
        parts.append(f"no crossing in {span} (upcycling predicted better throughout) at N1 = "
                     + ", ".join(f"{r.n1:.3g} (closest approach {r.closest_gap:.1e} nats at {r.closest_at:.3g} tokens; "
                                 f"closed form says {r.closed_form:.3g})" for r in missing))
    moves = [s for s in sens if s.ratio_to_base is not None]
    if moves:
        span = max(max(s.ratio_to_base, 1 / s.ratio_to_base) for s in moves)
        parts.append(f"the crossing is nearly tangent: nudging a1 or a2 of the upcycled law by +/-{delta:g} "
                     f"moves D* by up to {span:.1f}x (a1 and a2 act identically here because D1 = D2 = D "
                     f"enters only through a1 + a2)")
    lost = [s for s in sens if s.dstar is None and any(r.n1 == s.n1 and r.dstar is not None for r in rows)]
    if lost:
        parts.append(f"{len(lost)} nudged parameter sets lose the crossing altogether")
    gained = [s for s in sens if s.dstar is not None and any(r.n1 == s.n1 and r.dstar is None for r in rows)]
    if gained:
        at = sorted({s.n1 for s in gained})
        parts.append(f"at N1 = {', '.join(f'{n:.3g}' for n in at)}, where the unchanged laws do not cross, "
                     f"{len(gained)} of the {len([s for s in sens if s.n1 in at])} nudged parameter sets do")
    return "; ".join(parts) + "."


# ---- effective exponent and compute-optimal ---------------------------------------

def effective_exponents(fit: LawFit, d1_values) -> list[EffectiveExponent]:
    """a2 - a3 ln D1 at each D1 (tokens), with its bootstrap interval."""
    out = []
    ci = fit.bootstrap.ci if fit.bootstrap else 0.95
    scaled = scale_columns({"D1": np.asarray(d1_values, float)}, fit.units)["D1"]
    for d1, d1_scaled in zip(d1_values, scaled):
        value = float(effective_exponent(fit.values, d1_scaled))
        lo, hi = interval([effective_exponent(s, d1_scaled) for s in fit.bootstrap_values() if s], ci)
        out.append(EffectiveExponent(form=fit.form, subset=fit.subset, d1=float(d1), exponent=value,
                                     ci_low=lo, ci_high=hi))
    return out


def compute_optimal(upcycled: dict[str, float], c2: float, d1: float, n2_over_n1: float,
                    laws: str = "fitted joint", samples: list | None = None, ci: float = 0.95) -> ComputeOptimal:
    """Minimise L(D1, D2, N1) = A D1^-a1 D2^-(a2 - a3 ln D1) + B N1^-b + E subject to
    C2 = 6 N2 D2 with N2 = ratio * N1 (D1 fixed, tokens; C2 in FLOPs).

    With a = a2 - a3 ln D1 and A' = A D1^-a1 this is Chinchilla's problem:
    N1* = (b B / (a A'))^(1/(a+b)) (C2 / 6 ratio)^(a/(a+b)), D2* = C2 / (6 ratio N1*).
    """
    p = upcycled
    a = p["a2"] - p.get("a3", 0.0) * np.log(d1)
    b = p["b"]
    a_prime = p["A"] * d1 ** -p["a1"]
    if a <= 0 or b <= 0:
        return ComputeOptimal(laws=laws, c2=c2, d1=d1, n2_over_n1=n2_over_n1, n1=None, d2=None, loss=None,
                              note=f"no interior optimum: effective D2 exponent {a:.4g} and N1 exponent {b:.4g} "
                                   "must both be positive")
    k = c2 / (6 * n2_over_n1)
    n1 = (b * p["B"] / (a * a_prime)) ** (1 / (a + b)) * k ** (a / (a + b))
    d2 = k / n1
    loss = float(published.upcycled_loss(d1, d2, n1, {**p, "a3": p.get("a3", 0.0)}))
    out = ComputeOptimal(laws=laws, c2=c2, d1=d1, n2_over_n1=n2_over_n1, n1=float(n1), d2=float(d2), loss=loss,
                         note=f"effective D2 exponent a2 - a3 ln D1 = {a:.4f}; N1 exponent b = {b:.4f}")
    if samples:
        draws = [compute_optimal(s, c2, d1, n2_over_n1, laws) for s in samples if s]
        n1s = [x.n1 for x in draws if x.n1 is not None]
        if len(n1s) >= 2:
            out.n1_ci = list(interval(n1s, ci))
            out.d2_ci = list(interval([x.d2 for x in draws if x.d2 is not None], ci))
            if len(n1s) < len(draws):
                out.note += f"; {len(draws) - len(n1s)} bootstrap samples have no interior optimum"
    return out


# ---- advisor -------------------------------------------------------------------

STRATEGIES = ("upcycle", "moe_from_scratch", "dense_cpt")


def advise(pred: Predictors, n1: float, d1: float, tokens: float | None = None, flops: float | None = None,
           ci: float = 0.95) -> Advice:
    """Recommend upcycling, an MoE from scratch or dense continued pretraining.

    n1: dense non-embedding parameters; d1: tokens the dense model has seen (sunk);
    budget: extra ``tokens`` (every option trains that many) or extra ``flops``
    (6 N D: the MoE options train C / (6 N2) tokens, dense CPT C / (6 N1)).
    Dense CPT is predicted with the dense law at D1 + extra tokens, i.e. as if the
    continued run had been one run from scratch (WSD makes that close).
    """
    if (tokens is None) == (flops is None):
        raise UserError("give exactly one budget: extra tokens or extra FLOPs")
    for name, value in (("N1", n1), ("D1", d1), ("tokens", tokens), ("FLOPs", flops)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive number, got {value}")
    n2 = pred.n2_over_n1 * n1
    if tokens is not None:
        moe_tokens = cpt_tokens = tokens
        budget = f"{tokens:.3g} extra tokens"
    else:
        moe_tokens, cpt_tokens = flops / (6 * n2), flops / (6 * n1)
        budget = f"{flops:.3g} extra FLOPs (6 N D)"

    def losses(p: Predictors) -> dict[str, float | None]:
        return {
            "upcycle": float(p.upcycled_loss(d1, moe_tokens, n1)) if p.upcycled else None,
            "moe_from_scratch": float(p.moe_loss(moe_tokens, n1)) if p.moe else None,
            "dense_cpt": float(p.dense_loss(d1 + cpt_tokens, n1)) if p.dense else None,
        }

    point = losses(pred)
    available = {k: v for k, v in point.items() if v is not None}
    if not available:
        raise UserError("no law to predict with: the fits have neither an upcycled, an MoE nor a dense law")
    sample_losses = [losses(s) for s in pred.samples]
    notes = {
        "upcycle": f"MoE upcycled from the dense checkpoint, trained {moe_tokens:.3g} tokens (N2 = {n2:.3g})",
        "moe_from_scratch": f"MoE from scratch on {moe_tokens:.3g} tokens (the {d1:.3g} dense tokens are not reused)",
        "dense_cpt": f"dense model continued for {cpt_tokens:.3g} tokens (predicted as one run of "
                     f"{d1 + cpt_tokens:.3g} tokens)",
    }
    token_use = {"upcycle": moe_tokens, "moe_from_scratch": moe_tokens, "dense_cpt": cpt_tokens}
    options = []
    for s in STRATEGIES:
        lo, hi = interval([sl[s] for sl in sample_losses if sl[s] is not None], ci)
        missing = "" if point[s] is not None else " (no law fitted for it)"
        options.append(AdviceOption(strategy=s, predicted_loss=point[s], ci_low=lo, ci_high=hi,
                                    tokens=token_use[s], note=notes[s] + missing))
    best = min(available, key=available.get)
    others = sorted((v, k) for k, v in available.items() if k != best)
    win = None
    if sample_losses:
        wins = [min((v, k) for k, v in sl.items() if v is not None)[1] == best for sl in sample_losses]
        win = float(np.mean(wins))
    reason = f"{best} has the lowest predicted loss, {available[best]:.4f} nats"
    if others:
        reason += "; then " + ", ".join(f"{k} {v:.4f} (+{v - available[best]:.4f})" for v, k in others)
    if win is not None:
        reason += f"; it wins in {100 * win:.0f}% of {len(sample_losses)} bootstrap samples"
    if pred.upcycled and pred.moe and pred.upcycled_form == "joint":
        roots, first, closest, at = solve_dstar(pred, n1)
        row = DStarRow(n1=n1, numeric=roots, dstar=first, closed_form=float(published.closed_form_dstar(n1)),
                       ratio=None, closest_gap=closest, closest_at=at)
        if first is not None:
            reason += (f"; for reference D*(N1) = {first:.3g} tokens (an MoE from scratch on D tokens matches "
                       f"upcycling with D1 = D2 = D; here D1 = {d1:.3g}, D2 = {moe_tokens:.3g})")
        else:
            reason += f"; for reference D*(N1): {row.crossing_text(DSTAR_RANGE)}"
    missing = [s for s in STRATEGIES if point[s] is None]
    if missing:
        reason += f"; not compared (no law): {', '.join(missing)}"
    if pred.warnings:
        reason += "; caution, " + "; ".join(pred.warnings)
    return Advice(recommendation=best, reason=reason, n1=float(n1), d1=float(d1), budget=budget,
                  options=options, win_fraction=win, laws=pred.source, warnings=list(pred.warnings))


def advise_from_result(result, n1: float, d1: float, tokens: float | None = None, flops: float | None = None,
                       n2_over_n1: float | None = None) -> Advice:
    """``advise`` with the laws of an AnalysisResult (from ``analyze`` or fits.json), or the
    paper's published laws when ``result`` is None."""
    if result is None:
        return advise(paper_predictors(n2_over_n1 or 1.75), n1, d1, tokens=tokens, flops=flops)
    chosen = {s.subset: s.chosen for s in result.selections}
    pred = fitted_predictors(result.fits, n2_over_n1 or result.n2_over_n1, n1=n1, selections=chosen)
    ci = next((f.bootstrap.ci for f in result.fits if f.bootstrap), 0.95)
    return advise(pred, n1, d1, tokens=tokens, flops=flops, ci=ci)
