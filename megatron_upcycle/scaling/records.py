"""Typed records for fit results: what fits.json holds, field by field.

Parameters are always named (``{"A": ..., "a1": ...}``), never positional
vectors, and every record that carries parameters carries the ``Units`` they
refer to. ``io.py`` turns these into JSON and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_upcycle.scaling.laws import LAWS, Law, Units, predict


@dataclass
class ParamEstimate:
    """One fitted parameter with its bootstrap uncertainty (None before the bootstrap)."""

    name: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    std: float | None = None  # bootstrap standard deviation
    jackknife_se: float | None = None  # from the leave-one-out refits; every fitted form has it
    fixed: bool = False  # held at a value from another fit (the joint law's E)
    identified: bool = True  # False: the runs do not pin it down (LawFit.identification says why)


@dataclass
class IdentificationFlag:
    """One parameter the runs do not pin down, and which check says so.

    source: "design" (too few distinct values of a variable for the form, checked
    before fitting), "starts" (starts at the same objective disagree), "hessian"
    (the objective is flat along a combination of parameters), "bootstrap" (the
    interval is wider than twice the value) or "fixed" (held at a value from a fit
    where it is itself not identified).
    """

    param: str
    source: str
    detail: str


@dataclass
class StartsSummary:
    """How the multi-start BFGS went: the grid, the runs and whether they agree."""

    grid: dict[str, list[float]]  # exponent start values; amplitudes set by NNLS per grid point
    n_grid_points: int
    n_bfgs_runs: int  # BFGS runs for the full-data fit (best-ranked grid points)
    n_converged: int  # runs scipy reported as converged
    n_agreeing: int  # runs whose final objective matches the best one
    best_objective: float  # sum of Huber(delta) losses on log L at the optimum
    worst_objective: float
    # Largest |difference| of each parameter among agreeing runs: a wide spread at the
    # same objective means the data do not pin that parameter down.
    param_spread: dict[str, float]


@dataclass
class LooSummary:
    """Leave-one-out errors, predicted minus observed loss (nats), one per held-out run."""

    rms: float
    max_abs: float
    errors: dict[str, float]  # run_id -> error
    n_bfgs_runs: int
    jackknife_se: dict[str, float] = field(default_factory=dict)  # parameter -> jackknife standard error
    median_abs: float | None = None  # median |LOO error|: a robust criterion beside the RMS (nats)


@dataclass
class BootstrapSummary:
    n_samples: int
    n_failed: int
    seed: int
    ci: float
    n_bfgs_runs: int
    samples: dict[str, list[float]]  # parameter name -> value in each successful sample


@dataclass
class LawFit:
    """A fitted form on one subset of the results table."""

    form: str
    family: str
    formula: str
    subset: str  # which rows, in words ("upcycled runs, model 0.1B, E=8 k=2")
    units: Units
    n_points: int
    huber_delta: float
    params: list[ParamEstimate]
    rms_in_sample: float  # nats
    starts: StartsSummary
    run_ids: list[str]
    fitted: dict[str, float] = field(default_factory=dict)  # run_id -> in-sample predicted loss (nats)
    loo: LooSummary | None = None
    bootstrap: BootstrapSummary | None = None
    n1: float | None = None  # dense size N1 (parameters) when the subset is one model
    notes: list[str] = field(default_factory=list)
    identification: list[IdentificationFlag] = field(default_factory=list)  # empty: every parameter identified

    def unidentified(self) -> list[str]:
        """Names of the parameters some check says the runs do not pin down, in parameter order."""
        flagged = {f.param for f in self.identification}
        return [p.name for p in self.params if p.name in flagged]

    def identification_line(self) -> str | None:
        """One line: which parameters are not identified and why (None when all are)."""
        names = self.unidentified()
        if not names:
            return None
        groups: dict[tuple[str, str], list[str]] = {}
        for flag in self.identification:
            groups.setdefault((flag.source, flag.detail), []).append(flag.param)
        reasons = [f"{source} ({', '.join(dict.fromkeys(params))}): {detail}"
                   for (source, detail), params in groups.items()]
        return f"`{self.form}` [{self.subset}]: {', '.join(names)} not identified; " + "; ".join(reasons)

    @property
    def law(self) -> Law:
        return LAWS[self.form]

    @property
    def values(self) -> dict[str, float]:
        return {p.name: p.value for p in self.params}

    def param(self, name: str) -> ParamEstimate:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def predict(self, **columns) -> np.ndarray:
        """Loss at raw-unit columns (tokens, parameters): scaled to the fit's units here."""
        return predict(self.law, self.values, scale_columns(columns, self.units))

    def bootstrap_values(self) -> list[dict[str, float] | None]:
        """Each bootstrap sample as named parameters, None where its refit failed
        (kept so that samples stay aligned by index); empty without a bootstrap."""
        if not self.bootstrap or not self.bootstrap.samples:
            return []
        names = list(self.bootstrap.samples)
        out = []
        for i in range(len(self.bootstrap.samples[names[0]])):
            values = {n: self.bootstrap.samples[n][i] for n in names}
            ok = all(v is not None and np.isfinite(v) for v in values.values())
            out.append(values if ok else None)
        return out


def scale_columns(columns: dict, units: Units) -> dict[str, np.ndarray]:
    """Raw tokens / parameters -> the units a parameter set refers to."""
    from megatron_upcycle.scaling.laws import COLUMN_KIND

    out = {}
    for name, value in columns.items():
        kind = COLUMN_KIND.get(name)
        value = np.asarray(value, dtype=float)
        if kind == "D":
            value = value / units.tokens_per_unit
        elif kind == "N":
            value = value / units.parameters_per_unit
        out[name] = value
    return out


@dataclass
class SkippedForm:
    form: str
    subset: str
    reason: str


@dataclass
class PointInfluence:
    """One run's part in a family's choice: its held-out error under each form and the
    choice when it is removed from the comparison."""

    run_id: str
    loo_error: dict[str, float]  # form -> held-out error (predicted - observed, nats)
    chosen_without: str  # the form LOO RMS chooses when this run's held-out errors are dropped
    influential: bool  # removing it changes the choice, or its error is far outside the others'


@dataclass
class Selection:
    """The form chosen by leave-one-out RMS among the candidates of one family on one subset,
    beside the robust choice (mean Huber loss of the held-out errors) and the runs that decide it."""

    family: str
    subset: str
    chosen: str
    loo_rms: dict[str, float]  # form -> LOO RMS (nats)
    margin: float  # second-best LOO RMS minus the best (nats)
    loo_median_abs: dict[str, float] = field(default_factory=dict)  # form -> median |LOO error| (nats)
    loo_huber: dict[str, float] = field(default_factory=dict)  # form -> mean Huber loss of held-out errors
    huber_delta: float | None = None  # nats: 1.345 x 1.4826 x median |held-out error| over all forms
    robust_chosen: str | None = None  # the form with the smallest held-out Huber loss
    points: list[PointInfluence] = field(default_factory=list)
    influential: list[str] = field(default_factory=list)  # run_ids, most influential first
    verdict: str = ""  # one sentence: do the criteria agree, which runs decide the choice

    @property
    def criteria_agree(self) -> bool:
        return self.robust_chosen is None or self.robust_chosen == self.chosen


@dataclass
class DStarRow:
    """D*(N1) solved numerically next to the paper's closed form (tokens)."""

    n1: float
    numeric: list[float]  # every crossing L_moe(D) = L_upc(D, D) in the search range
    dstar: float | None  # the first crossing: below it upcycling wins
    closed_form: float
    ratio: float | None  # dstar / closed_form
    closest_gap: float  # min over D of |L_moe - L_upc| (nats): tiny = nearly tangent
    closest_at: float
    ci_low: float | None = None
    ci_high: float | None = None

    def crossing_text(self, d_range: tuple[float, float]) -> str:
        """D* in words: the value, or what happens when the curves do not cross in ``d_range``."""
        if self.dstar is not None:
            return f"{self.dstar:.3g} tokens"
        span = range_text(d_range)
        if self.numeric:
            return f"no crossing where upcycling stops paying in {span} (an MoE from scratch is better below " \
                   f"{self.numeric[0]:.3g} tokens)"
        return f"no crossing in {span} (closest approach {self.closest_gap:.1e} nats at {self.closest_at:.3g} tokens)"


def range_text(d_range: tuple[float, float]) -> str:
    """(1e6, 1e15) -> "1e6-1e15 tokens"."""
    def short(x: float) -> str:
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{short(d_range[0])}-{short(d_range[1])} tokens"


@dataclass
class DStarSensitivity:
    """How D* at one N1 moves when one upcycled-law exponent is nudged."""

    n1: float
    param: str
    delta: float
    dstar: float | None
    ratio_to_base: float | None


@dataclass
class DStarReport:
    source: str  # "paper Table 2 (published, rounded)" or "fitted: joint + dense_moe_shared_E"
    units: Units
    rows: list[DStarRow]
    sensitivity: list[DStarSensitivity]
    summary: str  # where and by how much numeric and closed form differ
    warnings: list[str] = field(default_factory=list)  # laws built on parameters the runs do not identify


@dataclass
class AdviceOption:
    strategy: str  # "upcycle", "moe_from_scratch", "dense_cpt"
    predicted_loss: float | None  # nats
    ci_low: float | None
    ci_high: float | None
    tokens: float | None  # tokens this strategy trains on with the budget
    note: str


@dataclass
class Advice:
    recommendation: str
    reason: str
    n1: float
    d1: float
    budget: str  # "1e10 tokens" or "6e19 FLOPs"
    options: list[AdviceOption]
    win_fraction: float | None  # share of bootstrap samples in which the recommendation wins
    laws: str  # which fits produced the predictions
    units: Units = field(default_factory=Units)
    warnings: list[str] = field(default_factory=list)  # laws built on parameters the runs do not identify


@dataclass
class ComputeOptimal:
    """Compute-optimal N1 and D2 for an upcycling budget C2 = 6 N2 D2, N2 = ratio * N1."""

    laws: str  # "paper" or "fitted joint"
    c2: float  # FLOPs
    d1: float  # tokens
    n2_over_n1: float
    n1: float | None  # parameters
    d2: float | None  # tokens
    loss: float | None
    note: str
    n1_ci: list[float] | None = None  # bootstrap interval [low, high] (fitted laws only)
    d2_ci: list[float] | None = None


@dataclass
class EffectiveExponent:
    """The D2 exponent a2 - a3 ln D1 of a fitted form at one D1 (tokens)."""

    form: str
    subset: str
    d1: float
    exponent: float
    ci_low: float | None
    ci_high: float | None


@dataclass
class AnalysisResult:
    """What ``analyze`` produced: fits, skipped forms, selections, derived quantities, files."""

    results_csv: str
    out_dir: str
    units: Units
    huber_delta: float
    fits: list[LawFit]
    skipped: list[SkippedForm]
    selections: list[Selection]
    dstar_fitted: DStarReport | None
    dstar_paper: DStarReport
    compute_optimal: list[ComputeOptimal]
    effective_exponents: list[EffectiveExponent]
    n2_over_n1: float
    files: list[str]
    n_bfgs_runs: int
    n_bfgs_iterations: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    read_notes: list[str] = field(default_factory=list)  # how the table was read (renamed columns, units, kinds)

    def identification_notes(self) -> list[str]:
        """One line per fit with parameters the runs do not identify (for reports and the CLI)."""
        return [line for line in (f.identification_line() for f in self.fits) if line]

    def influence_lines(self) -> list[str]:
        """One sentence per selection: whether RMS and the robust criterion agree, which runs decide."""
        return [f"{s.family}, {s.subset}: {s.verdict}" for s in self.selections if s.verdict]

    def fit(self, form: str, subset_contains: str = "") -> LawFit | None:
        for f in self.fits:
            if f.form == form and subset_contains in f.subset:
                return f
        return None
