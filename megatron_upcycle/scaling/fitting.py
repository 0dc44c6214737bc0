"""Multi-start BFGS on a Huber loss of log L, with an exact gradient.

The objective is sum_i w_i Huber_delta(log L_pred,i - log L_obs,i) with
log L_pred a LogSumExp of terms linear in the parameters (laws.py). What shapes
this module:

- At delta = 1e-3 the Huber loss is tiny (a residual of 1e-3 costs 5e-7), so a
  mean over points with scipy's default gradient tolerance stops far from the
  optimum (trap 2). We minimise the *sum* divided by delta**2 (a residual of
  delta costs 1/2), give BFGS the analytic gradient and a tight gtol, and
  compare final objective values across starts, not only parameters.
- The parameters have wildly different scales (log-amplitudes ~ 1-5, the
  interaction coefficient ~ 1e-3 multiplying ln D1 ln D2 ~ 500). Each BFGS run
  works in whitened coordinates phi = R theta, R from a QR factorisation of the
  (IRLS-weighted) Gauss-Newton Jacobian at its start point. That is an exact
  linear change of variables: the law and its optimum are unchanged, only the
  optimiser's view of them is better conditioned.
- With noise well above delta the objective is close to an L1 fit, and E trades
  off against the exponents (trap 3): optima often sit on the boundary E -> 0
  (log E -> -inf). Refits for leave-one-out and the bootstrap therefore also
  start from a "revived" copy of the optimum (``_revive``).

Starts: a grid over the exponents (stated in every output); at each grid
point the amplitudes (A, B, F, E) are set by non-negative least squares, which
is exact for them given the exponents. BFGS runs from the ``max_starts``
best-ranked grid points (8 by default; the output states how many).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, nnls

from megatron_upcycle.scaling.datasets import FitData
from megatron_upcycle.scaling.laws import Law, Units, design, to_natural
from megatron_upcycle.scaling.records import StartsSummary, scale_columns


@dataclass(frozen=True)
class FitOptions:
    """How to fit; the defaults are what `upcycle fit` uses."""

    huber_delta: float = 1e-3  # on ln L
    units: Units = field(default_factory=Units)  # raw tokens and parameters (trap 1)
    max_starts: int = 8  # BFGS runs for a full fit: from the best-ranked grid points
    loo_starts: int = 1  # warm starts for each leave-one-out refit (distinct optima of the full fit)
    bootstrap_starts: int = 1  # warm starts for each bootstrap refit
    # On the gradient of sum(Huber) / delta**2 in whitened coordinates, where the
    # curvature is ~1/delta**2: 1e-6 leaves parameter errors ~1e-12.
    gtol: float = 1e-6
    maxiter: int = 5000
    n_bootstrap: int = 100  # resamples per bootstrapped fit
    seed: int = 0
    ci: float = 0.95  # percentile interval


@dataclass
class FitOutcome:
    theta: np.ndarray  # full internal vector (log amplitudes, exponents), fixed ones included
    values: dict[str, float]  # named natural parameters
    objective: float  # sum of Huber losses on log L
    starts: StartsSummary
    warm_starts: list[np.ndarray]  # distinct optima (free internal parameters), best first


class NotFittable(ValueError):
    """The subset cannot determine the form (too few runs or too few distinct values)."""


def fittable_reason(law: Law, data: FitData, fixed: dict[str, float] | None = None) -> str | None:
    """Why ``law`` cannot be fitted to ``data`` (None when it can)."""
    n_free = len([p for p in law.params if p not in (fixed or {})])
    n = len(data)
    if n < n_free + 1:
        return (f"needs at least {n_free + 1} runs ({n_free} free parameters + 1 to leave out), "
                f"this subset has {n}")
    for col in law.columns:
        values = data.columns.get(col)
        if values is None or np.isnan(values).any():
            return f"column {col} is missing on some of these runs"
        if col != "is_moe" and data.distinct(col) < 2:
            return f"needs at least 2 distinct {col} values, this subset has 1 ({values[0]:.4g})"
    if "is_moe" in law.columns:
        flags = data.columns["is_moe"]
        for label, rows in (("dense", flags == 0), ("MoE-from-scratch", flags == 1)):
            if rows.sum() < 3:
                return f"needs at least 3 {label} runs, this subset has {int(rows.sum())}"
            for col in (c for c in ("D", "N") if c in law.columns):
                if len(np.unique(data.columns[col][rows])) < 2:
                    return f"needs at least 2 distinct {col} values among the {label} runs"
    return None


class LawFitter:
    """Fits one form to one subset; reused for the leave-one-out and bootstrap refits."""

    def __init__(self, law: Law, data: FitData, options: FitOptions, fixed: dict[str, float] | None = None):
        reason = fittable_reason(law, data, fixed)
        if reason:
            raise NotFittable(reason)
        self.law, self.data, self.options = law, data, options
        self.fixed = dict(fixed or {})
        self.free = np.array([p not in self.fixed for p in law.params])
        self.design = design(law, scale_columns(data.columns, options.units))
        self.log_y = np.log(data.loss)
        self.n = len(data)
        self.K = len(law.terms)
        F = self.design.F
        present = np.isfinite(self.design.c)
        stacked = F[present][:, self.free]
        _, R = np.linalg.qr(stacked)
        diag = np.abs(np.diag(R))
        if diag.min() <= 1e-10 * diag.max():
            raise NotFittable("parameters are not identifiable from these runs (features are collinear)")
        self.R_features = R
        self.F_free = F[..., self.free].reshape(self.K * self.n, -1)
        self.n_bfgs_runs = 0
        self.n_bfgs_iterations = 0

    # -- objective ------------------------------------------------------------

    def offsets(self, fixed: dict[str, float] | None = None) -> np.ndarray:
        """c plus the contribution of fixed parameters: (terms, rows)."""
        fixed = self.fixed if fixed is None else fixed
        c = self.design.c.copy()
        if fixed:
            theta_fixed = np.array([np.log(fixed[p]) if p in self.law.amplitudes else fixed[p]
                                    for p in self.law.params if p in fixed])
            with np.errstate(invalid="ignore"):
                c = c + self.design.F[..., ~self.free] @ theta_fixed
        return c

    def _value_grad(self, phi: np.ndarray, G: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        """sum_i w_i Huber(r_i) / delta**2 and its gradient in whitened coordinates (G = F R^-1)."""
        delta = self.options.huber_delta
        T = (G @ phi).reshape(self.K, self.n)
        T += c
        top = T.max(axis=0)
        T -= top
        e = np.exp(T)
        S = e.sum(axis=0)
        r = top + np.log(S) - self.log_y  # ln L_pred - ln L_obs
        psi = np.clip(r, -delta, delta)  # Huber'(r)
        # Huber(r) = psi (r - psi / 2): r^2 / 2 inside delta, delta (|r| - delta / 2) outside.
        f = float(w @ (psi * (r - 0.5 * psi))) / delta**2
        psi *= w / (delta**2 * S)
        e *= psi  # softmax weight of each term times Huber'(r), per row
        return f, e.ravel() @ G

    def log_predict(self, theta_free: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        c = self.offsets() if c is None else c
        T = (self.F_free @ theta_free).reshape(self.K, self.n) + c
        top = T.max(axis=0)
        return top + np.log(np.exp(T - top).sum(axis=0))

    def jacobian(self, theta_free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At ``theta_free``: d ln L / d theta (rows, free params), the IRLS weights of the Huber
        loss (1 inside delta, delta/|r| outside) and each term's median share of the loss."""
        c = self.offsets()
        T = (self.F_free @ theta_free).reshape(self.K, self.n) + c
        top = T.max(axis=0)
        e = np.exp(T - top)
        S = e.sum(axis=0)
        r = top + np.log(S) - self.log_y
        delta = self.options.huber_delta
        weights = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        J = np.einsum("kn,knp->np", e / S, self.F_free.reshape(self.K, self.n, -1))
        shares = np.array([np.median((e / S)[k][np.isfinite(c[k])]) if np.isfinite(c[k]).any() else 0.0
                           for k in range(self.K)])
        return J, weights, shares

    def _whitening(self, theta: np.ndarray, c: np.ndarray, w: np.ndarray) -> np.ndarray:
        """R with phi = R theta making the objective ~ |phi - phi*|^2 / 2 near theta.

        Gauss-Newton with IRLS weights: residuals of ln L move by J dtheta with
        J = sum_k softmax_k F_k, and Huber_delta(r) curves like r^2 / 2 inside
        delta and like (delta / |r|) r^2 / 2 outside, so the Hessian of
        sum Huber / delta^2 is about J' W J / delta^2 with W = w min(1, delta/|r|).
        A small multiple of the term features keeps R invertible where a term has
        vanished (its exponent then has no curvature at all).
        """
        delta = self.options.huber_delta
        T = (self.F_free @ theta).reshape(self.K, self.n) + c
        top = T.max(axis=0)
        e = np.exp(T - top)
        S = e.sum(axis=0)
        r = top + np.log(S) - self.log_y
        irls = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        J = np.einsum("kn,knp->np", e / S, self.F_free.reshape(self.K, self.n, -1))
        M = np.vstack([J * np.sqrt(irls)[:, None], 1e-3 * self.R_features])
        _, R = np.linalg.qr(M)
        return R / delta

    def _bfgs(self, theta0: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, bool]:
        """One BFGS run from theta0 (free internal parameters); returns (objective, theta, converged)."""
        self.n_bfgs_runs += 1
        R = self._whitening(theta0, c, w)
        Rinv = np.linalg.inv(R)
        G = self.F_free @ Rinv
        res = minimize(self._value_grad, R @ theta0, args=(G, c, w), jac=True, method="BFGS",
                       options={"gtol": self.options.gtol, "maxiter": self.options.maxiter})
        self.n_bfgs_iterations += int(res.nit)
        return float(res.fun), Rinv @ res.x, bool(res.success)

    # -- starts ---------------------------------------------------------------

    def grid(self) -> dict[str, tuple[float, ...]]:
        return {p: tuple(self.law.start_grid.get(p, (0.1,))) for p in self.law.exponents if p not in self.fixed}

    def grid_starts(self, c: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """(objective, theta_free) at every grid point, amplitudes by NNLS; best first."""
        free_names = [p for p in self.law.params if p not in self.fixed]
        amp_terms = [k for k, t in enumerate(self.law.terms) if t.amplitude not in self.fixed]
        fixed_terms = [k for k, t in enumerate(self.law.terms) if t.amplitude in self.fixed]
        grid = self.grid()
        y = self.data.loss
        w = np.ones(self.n)
        out = []
        for point in itertools.product(*grid.values()):
            theta = np.zeros(len(free_names))
            for name, value in zip(grid, point):
                theta[free_names.index(name)] = value
            with np.errstate(over="ignore", invalid="ignore"):
                base = np.exp((self.F_free @ theta).reshape(self.K, self.n) + c)  # amplitudes at 1
            rest = y - base[fixed_terms].sum(axis=0)
            cols = base[amp_terms].T / y[:, None]
            if not np.isfinite(cols).all():
                continue
            amps, _ = nnls(cols, rest / y)
            for k, amp in zip(amp_terms, amps):
                typical = np.median(base[k][base[k] > 0]) if (base[k] > 0).any() else 1.0
                floor = 1e-3 * np.median(y) / typical
                theta[free_names.index(self.law.terms[k].amplitude)] = np.log(max(amp, floor))
            f, _ = self._value_grad(theta, self.F_free, c, w)
            if np.isfinite(f):
                out.append((f, theta))
        out.sort(key=lambda item: item[0])
        return out

    # -- fits -----------------------------------------------------------------

    def fit(self) -> FitOutcome:
        c = self.offsets()
        w = np.ones(self.n)
        starts = self.grid_starts(c)
        chosen = starts[: self.options.max_starts]
        runs = [self._bfgs(theta, c, w) for _, theta in chosen]
        runs.sort(key=lambda run: run[0])
        best_f = runs[0][0]
        tol = 1e-9 + 1e-6 * abs(best_f)
        agreeing = [run for run in runs if run[0] - best_f <= tol]
        naturals = [to_natural(self.law, self._full(run[1])) for run in agreeing]
        spread = {p: float(max(v[p] for v in naturals) - min(v[p] for v in naturals))
                  for p in self.law.params if p not in self.fixed}
        warm: list[np.ndarray] = []
        warm_preds: list[np.ndarray] = []
        for _, theta_free, _ in runs:
            pred = self.log_predict(theta_free, c)
            if all(np.max(np.abs(pred - p)) > 1e-6 for p in warm_preds):
                warm.append(theta_free)
                warm_preds.append(pred)
            if len(warm) >= max(self.options.loo_starts, self.options.bootstrap_starts):
                break
        theta = self._full(runs[0][1])
        delta2 = self.options.huber_delta**2
        summary = StartsSummary(
            grid={k: list(v) for k, v in self.grid().items()},
            n_grid_points=int(np.prod([len(v) for v in self.grid().values()])),
            n_bfgs_runs=len(runs),
            n_converged=sum(run[2] for run in runs),
            n_agreeing=len(agreeing),
            best_objective=best_f * delta2,
            worst_objective=runs[-1][0] * delta2,
            param_spread=spread,
        )
        return FitOutcome(theta=theta, values=to_natural(self.law, theta), objective=best_f * delta2,
                          starts=summary, warm_starts=warm)

    def refit(self, warm: list[np.ndarray], weights: np.ndarray,
              fixed: dict[str, float] | None = None) -> tuple[dict[str, float], np.ndarray]:
        """Refit with row weights (0 = left out, counts = bootstrap) from the warm starts.

        Returns the named natural parameters and log L predicted on every row.
        """
        c = self.offsets(fixed)
        best = None
        starts = list(warm)
        revived = self._revive(warm[0], c)
        if revived is not None:
            starts.append(revived)
        for theta0 in starts:
            run = self._bfgs(theta0, c, weights)
            if best is None or run[0] < best[0]:
                best = run
        theta_free = best[1]
        theta = self._full(theta_free, fixed)
        return to_natural(self.law, theta), self.log_predict(theta_free, c)

    def _revive(self, theta: np.ndarray, c: np.ndarray, dead: float = 1e-4, alive: float = 0.02):
        """theta with every term below ``dead`` of the loss raised to ``alive`` (None if none is).

        A full-data optimum on a boundary (E -> 0 is common: E trades off against the
        exponents) has log E far below zero, where the term and its gradient are
        exponentially small: a refit started there cannot bring E back even when its
        resample wants it, and the bootstrap would report E's interval as a point. So
        refits also start from this revived point and keep the better optimum.
        """
        names = [p for p in self.law.params if p not in self.fixed]
        T = (self.F_free @ theta).reshape(self.K, self.n) + c
        top = T.max(axis=0)
        log_l = top + np.log(np.exp(T - top).sum(axis=0))
        out = theta.copy()
        for k, term in enumerate(self.law.terms):
            present = np.isfinite(c[k])
            if term.amplitude in self.fixed or not present.any():
                continue
            share = np.median(T[k, present] - log_l[present])
            if share < np.log(dead):
                out[names.index(term.amplitude)] += np.log(alive) - share
        return None if np.array_equal(out, theta) else out

    def _full(self, theta_free: np.ndarray, fixed: dict[str, float] | None = None) -> np.ndarray:
        fixed = self.fixed if fixed is None else fixed
        out = np.empty(len(self.law.params))
        out[self.free] = theta_free
        for i, p in enumerate(self.law.params):
            if p in fixed:
                out[i] = np.log(fixed[p]) if p in self.law.amplitudes else fixed[p]
        return out
