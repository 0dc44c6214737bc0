"""Which fitted parameters the runs actually pin down.

A thin table can make the optimiser return a confident-looking number that the
data do not determine (two token budgets: Chinchilla's a comes out 0.28 against a
true 0.088, and that E then sits inside the joint law). Four checks, each a
list of ``IdentificationFlag`` on the ``LawFit``:

- design (before fitting): a power-law term A x^-a beside a free offset E is
  seen only through contrasts between distinct x values, since its level trades
  against E; with the offset free, some variable of each term needs at least 3
  distinct values among the rows the term applies to (A, the exponent and E).
  Two values leave a one-parameter family of exact fits. A product term
  (A D1^-a1 D2^-a2) is pinned by any one of its variables with 3 values.
- starts: BFGS runs from different grid points reach the same objective with
  parameters more than 1% apart (a flat valley).
- hessian: the Gauss-Newton Hessian of the Huber objective at the optimum,
  Jacobi-scaled, has condition number above 1e10; the parameters that load on
  its flat directions are flagged. (Identified fits here measure 1e5-1e7; the
  two-budget table 1e15 and more.)
- bootstrap: the percentile interval is wider than twice the value. Interaction
  coefficients (a3, b3) are exempt: whether they are resolved (interval excludes
  0) is reported on its own, and their value may be 0.

A law that takes a parameter from a fit where it is not identified (the joint
law's fixed E) carries a "fixed" flag, so that D*, compute-optimal and the
advisor can say what they rest on.
"""
from __future__ import annotations

import numpy as np

from megatron_upcycle.scaling.datasets import FitData
from megatron_upcycle.scaling.fitting import FitOutcome, LawFitter
from megatron_upcycle.scaling.laws import Law
from megatron_upcycle.scaling.records import IdentificationFlag, LawFit

SPREAD_TOLERANCE = 0.01  # relative spread of a parameter among starts at the same objective
CONDITION_LIMIT = 1e10  # Jacobi-scaled Gauss-Newton Hessian
FLAT_LOADING = 0.2  # |component| of a flat eigenvector that implicates a parameter
VANISHED_SHARE = 1e-4  # a term below this share of the loss has no curvature to test


def _offset(law: Law, fixed: dict[str, float]) -> str | None:
    """The free constant term's amplitude (E), None when there is none or it is fixed."""
    for term in law.terms:
        if not term.powers and term.amplitude not in fixed:
            return term.amplitude
    return None


def _present(term, data: FitData) -> np.ndarray:
    if term.where is None:
        return np.ones(len(data), dtype=bool)
    flag = data.columns[term.where.lstrip("!")]
    return flag == 0 if term.where.startswith("!") else flag == 1


def design_flags(law: Law, data: FitData, fixed: dict[str, float] | None = None) -> list[IdentificationFlag]:
    """Terms whose variables take too few distinct values to separate them from the offset."""
    fixed = fixed or {}
    offset = _offset(law, fixed)
    if offset is None:
        return []
    flags = []
    for term in law.terms:
        if not term.powers:
            continue
        rows = _present(term, data)
        cols = list(dict.fromkeys(f[2:] for _, feature, _ in term.powers for f in feature.split("*")))
        counts = {c: len(np.unique(data.columns[c][rows])) for c in cols}
        if max(counts.values()) >= 3:
            continue
        exps = list(dict.fromkeys(name for name, _, _ in term.powers if name not in fixed))
        params = [p for p in [term.amplitude, *exps] if p not in fixed] + [offset]
        among = ""
        if term.where is not None:
            among = " among the MoE-from-scratch runs" if not term.where.startswith("!") else " among the dense runs"
        values = " and ".join(f"{c} has {n}" for c, n in counts.items())
        detail = (f"{values} distinct value{'s' if max(counts.values()) > 1 else ''}{among}, "
                  f"{', '.join(params[:-1])} and the offset {offset} need 3")
        flags += [IdentificationFlag(param=p, source="design", detail=detail) for p in params]
    return flags


def numeric_flags(fitter: LawFitter, outcome: FitOutcome) -> list[IdentificationFlag]:
    """The starts' spread at the best objective and the Hessian's condition at the optimum."""
    flags = []
    starts = outcome.starts
    if starts.n_agreeing >= 2:
        for name, spread in starts.param_spread.items():
            value = outcome.values[name]
            scale = max(abs(value), 1e-3)
            if spread > SPREAD_TOLERANCE * scale:
                flags.append(IdentificationFlag(
                    param=name, source="starts",
                    detail=f"starts that reach the same objective disagree by more than "
                           f"{100 * SPREAD_TOLERANCE:g}%"))
    names = [p for p in fitter.law.params if p not in fitter.fixed]
    J, weights, shares = fitter.jacobian(outcome.theta[fitter.free])
    H = J.T @ (J * weights[:, None])
    scale = np.sqrt(np.diag(H))
    live = scale > 0
    for k, term in enumerate(fitter.law.terms):  # a vanished term (E -> 0) is a boundary, not a flat valley
        if shares[k] < VANISHED_SHARE:
            for p in [term.amplitude, *(n for n, _, _ in term.powers)]:
                if p in names:
                    live[names.index(p)] = False
    if live.sum() >= 2 and np.isfinite(H).all():
        Hs = H[np.ix_(live, live)] / np.outer(scale[live], scale[live])
        eig, vec = np.linalg.eigh(Hs)
        top = eig[-1]
        condition = top / eig[0] if eig[0] > 0 else np.inf
        if condition > CONDITION_LIMIT:
            live_names = [n for n, ok in zip(names, live) if ok]
            flat = vec[:, eig < top / CONDITION_LIMIT]
            loaded = [n for n, row in zip(live_names, np.abs(flat).max(axis=1)) if row > FLAT_LOADING]
            detail = f"the objective is flat along a combination of them (scaled Hessian condition {condition:.1e})"
            flags += [IdentificationFlag(param=n, source="hessian", detail=detail) for n in loaded]
    return flags


def interaction_params(law: Law) -> set[str]:
    return {name for t in law.terms for name, feature, _ in t.powers if "*" in feature}


def bootstrap_flags(fit: LawFit) -> list[IdentificationFlag]:
    """Parameters whose bootstrap interval is wider than twice their value."""
    if fit.bootstrap is None:
        return []
    exempt = interaction_params(fit.law)
    flags = []
    for p in fit.params:
        if p.fixed or p.name in exempt or p.ci_low is None or p.ci_high is None:
            continue
        if p.ci_high - p.ci_low > 2 * abs(p.value):
            flags.append(IdentificationFlag(
                param=p.name, source="bootstrap",
                detail=f"{100 * fit.bootstrap.ci:.0f}% bootstrap interval wider than twice the value"))
    return flags


def fixed_flags(fit: LawFit, source: LawFit) -> list[IdentificationFlag]:
    """Flags for parameters ``fit`` holds at ``source``'s values where ``source`` does not identify them."""
    unidentified = set(source.unidentified())
    return [IdentificationFlag(param=p.name, source="fixed",
                               detail=f"{p.name} is fixed from `{source.form}`, where it is not identified")
            for p in fit.params if p.fixed and p.name in unidentified]


def apply(fit: LawFit, flags: list[IdentificationFlag]) -> None:
    """Add ``flags`` to the fit (no duplicates) and mark its parameters."""
    seen = {(f.param, f.source, f.detail) for f in fit.identification}
    for flag in flags:
        if (flag.param, flag.source, flag.detail) not in seen:
            fit.identification.append(flag)
            seen.add((flag.param, flag.source, flag.detail))
    flagged = {f.param for f in fit.identification}
    for p in fit.params:
        p.identified = p.name not in flagged


def law_warning(fit: LawFit, role: str) -> str | None:
    """A sentence for a quantity built on ``fit`` (role: "the upcycled law"), None when all is identified."""
    names = fit.unidentified()
    if not names:
        return None
    fixed = [f for f in fit.identification if f.source == "fixed"]
    text = f"{role} (`{fit.form}`): {', '.join(names)} not identified by the runs"
    if fixed:
        text += " (" + "; ".join(dict.fromkeys(f.detail for f in fixed)) + ")"
    return text
