"""``analyze(results.csv, out_dir)``: every form, LOO selection, bootstrap, D*, plots, reports.

Writes out_dir/fits.json, loo.md, dstar.md and plots/*.png and returns the
typed ``AnalysisResult``. A form that the table cannot support (too few runs,
one model size for the joint law, ...) is skipped with its reason recorded,
unless the caller named it explicitly in ``AnalysisOptions.forms``. Parameters
the runs do not identify are flagged on each fit (identification.py), and a fit
that holds a parameter from such a fit (the joint law's E) is flagged with it.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_upcycle.errors import UserError
from megatron_upcycle.scaling import datasets, derived, identification
from megatron_upcycle.scaling.bootstrap import bootstrap, estimates, merge
from megatron_upcycle.scaling.datasets import FitData
from megatron_upcycle.scaling.fitting import FitOptions, FitOutcome, LawFitter, NotFittable, fittable_reason
from megatron_upcycle.scaling.io import read_results, write_fits_json
from megatron_upcycle.scaling.laws import LAWS
from megatron_upcycle.scaling.records import AnalysisResult, LawFit, Selection, SkippedForm
from megatron_upcycle.scaling.selection import leave_one_out, select

FAMILY_FORMS = {
    "d1d2": ("d1d2_mult_int", "d1d2_mult", "d1d2_add_int", "d1d2_add"),
    "config": ("config_add", "config_add_int", "config_mult", "config_mult_int"),
}
COMPUTE_BUDGETS = (1e19, 1e20, 1e21, 1e22)  # FLOPs for the compute-optimal table
PAPER_COMPUTE_D1 = 1e10  # tokens: the sunk dense budget used with the paper's parameters


@dataclass(frozen=True)
class AnalysisOptions:
    fit: FitOptions = field(default_factory=FitOptions)
    forms: tuple[str, ...] | None = None  # None: every form; named forms must be fittable
    plots: bool = True
    workers: int | None = None  # processes for the independent fits; None: min(2, CPUs)
    bootstrap_all: bool = False  # bootstrap every form, not only the chosen ones and those D* uses
    dstar_n1: tuple[float, ...] = derived.PAPER_N1
    columns: dict[str, str] | None = None  # the table's header names -> the contract's (``--columns``)
    tokens_unit: str = "tokens"  # unit of the table's D1, D2, tokens columns (``--tokens-unit``)


@dataclass
class _Task:
    form: str
    data: FitData | None
    skip_reason: str | None = None
    n1: float | None = None


def _plan(table) -> list[_Task]:
    tasks: list[_Task] = []
    for data, kind in ((datasets.dense_data(table), "dense"), (datasets.moe_data(table), "MoE-from-scratch")):
        tasks.append(_Task("chinchilla", data, None if len(data) else f"no {kind} runs in the table"))
        for sized in datasets.by_size(data):  # valid at that size only; the advisor's law at one size
            tasks.append(_Task("one_size", sized, n1=float(sized.columns["N"][0])))
    shared = datasets.shared_data(table)
    tasks.append(_Task("dense_moe_shared_E", shared))
    for sized in datasets.by_size(shared):
        tasks.append(_Task("one_size_shared_E", sized, n1=float(sized.columns["N"][0])))
    groups = datasets.d1d2_data(table)
    if not groups:
        for form in FAMILY_FORMS["d1d2"]:
            tasks.append(_Task(form, None, "no upcycled runs in the table"))
    for data in groups:
        n1 = float(data.columns["N1"][0])
        for form in FAMILY_FORMS["d1d2"]:
            tasks.append(_Task(form, data, n1=n1))
    config = datasets.config_data(table)
    for form in FAMILY_FORMS["config"]:
        tasks.append(_Task(form, config, None if config is not None else "no upcycled runs in the table"))
    joint = datasets.joint_data(table)
    tasks.append(_Task("joint", joint, None if joint is not None else "no upcycled runs in the table"))
    return tasks


@dataclass
class _Done:
    """A finished task: the fit (or why it was skipped), its warm starts and its cost."""

    task: _Task
    fit: LawFit | None = None
    skipped: SkippedForm | None = None
    warm: list = field(default_factory=list)
    runs: int = 0
    iterations: int = 0
    fixed: dict[str, float] | None = None


def _fit_task(task: _Task, options: FitOptions, fixed: dict[str, float] | None = None) -> _Done:
    """Full multi-start fit and leave-one-out of one form on one subset (no bootstrap yet)."""
    subset = task.data.subset if task.data is not None else "-"
    reason = task.skip_reason or fittable_reason(LAWS[task.form], task.data, fixed)
    if reason is None:
        try:
            fitter = LawFitter(LAWS[task.form], task.data, options, fixed=fixed)
        except NotFittable as exc:
            reason = str(exc)
    if reason is not None:
        return _Done(task, skipped=SkippedForm(form=task.form, subset=subset, reason=reason))
    outcome = fitter.fit()
    loo = leave_one_out(fitter, outcome)
    predicted = np.exp(fitter.log_predict(outcome.theta[fitter.free]))
    law = LAWS[task.form]
    fit = LawFit(
        form=law.name, family=law.family, formula=law.formula, subset=task.data.subset, units=options.units,
        n_points=len(task.data), huber_delta=options.huber_delta,
        params=estimates(outcome.values, None, set(fixed or {}), loo.jackknife_se),
        rms_in_sample=float(np.sqrt(np.mean((predicted - task.data.loss) ** 2))), starts=outcome.starts,
        run_ids=list(task.data.run_ids), fitted=dict(zip(task.data.run_ids, predicted.tolist())), loo=loo,
        n1=task.n1,
    )
    identification.apply(fit, identification.design_flags(law, task.data, fixed)
                         + identification.numeric_flags(fitter, outcome))
    if fixed:
        fit.notes.append("fixed: " + ", ".join(f"{k} = {v:.6g}" for k, v in fixed.items())
                         + " (from dense_moe_shared_E; per bootstrap sample from its bootstrap)")
    return _Done(task, fit=fit, warm=outcome.warm_starts, runs=fitter.n_bfgs_runs,
                 iterations=fitter.n_bfgs_iterations, fixed=fixed)


def _bootstrap_share(done: _Done, options: FitOptions, indices: range,
                     fixed_samples: list[dict[str, float]] | None = None):
    """Refit the resamples ``indices`` of one fit's bootstrap (starts: the fit's optima)."""
    fitter = LawFitter(LAWS[done.task.form], done.task.data, options, fixed=done.fixed)
    outcome = FitOutcome(theta=np.empty(0), values=done.fit.values, objective=done.fit.starts.best_objective,
                         starts=done.fit.starts, warm_starts=done.warm)
    part = bootstrap(fitter, outcome, fixed_samples=fixed_samples, indices=indices)
    return part, fitter.n_bfgs_runs, fitter.n_bfgs_iterations


def _bootstrap_all(dones: list[_Done], options: FitOptions, workers: int | None,
                   fixed_samples: dict[int, list[dict[str, float]]] | None = None) -> None:
    """Bootstrap each fit in ``dones`` in place, its resamples split in shares across workers."""
    fixed_samples = fixed_samples or {}
    jobs, owners, costs = [], [], []
    for i, done in enumerate(dones):
        n = options.n_bootstrap
        if i in fixed_samples:
            n = min(n, len(fixed_samples[i]))
        size = 25  # resamples per share: enough shares to balance two workers
        for start in range(0, n, size):
            share = range(start, min(n, start + size))
            jobs.append((done, options, share, fixed_samples.get(i)))
            owners.append(i)
            costs.append(len(done.task.data) * len(LAWS[done.task.form].params) ** 2 * len(share))
    results = _parallel(_bootstrap_share, jobs, workers, costs)
    for i, done in enumerate(dones):
        mine = [r for r, owner in zip(results, owners) if owner == i]
        boot = merge([r[0] for r in mine])
        done.fit.bootstrap = boot
        done.fit.params = estimates(done.fit.values, boot, set(done.fixed or {}), done.fit.loo.jackknife_se)
        identification.apply(done.fit, identification.bootstrap_flags(done.fit))
        done.runs += sum(r[1] for r in mine)
        done.iterations += sum(r[2] for r in mine)


def _parallel(function, jobs: list[tuple], workers: int | None, costs: list[float]) -> list:
    """function(*job) for every job, in forked worker processes when that is safe.

    Each fit seeds its own bootstrap, so results do not depend on the number of
    workers. Fork is used only where it is the platform's way to start processes
    and torch (whose thread pools do not survive fork) is not loaded.
    """
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    can_fork = "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules
    if workers <= 1 or len(jobs) <= 1 or not can_fork:
        return [function(*job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    # Biggest first, so that the last job to finish is a small one.
    order = sorted(range(len(jobs)), key=lambda i: -costs[i])
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {i: pool.submit(function, *jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def _task_cost(task: _Task) -> float:
    if task.data is None or task.skip_reason:
        return 0.0
    return len(task.data) * len(LAWS[task.form].params) ** 2


def _fit_all(tasks: list[_Task], options: AnalysisOptions) -> list[_Done]:
    """Full fits and leave-one-out. All independent but the joint law, which needs E
    from the shared dense + MoE fit (fitted first when the joint law is wanted)."""
    wanted = set(options.forms) if options.forms else set(LAWS)
    if "joint" in wanted:
        wanted.add("dense_moe_shared_E")
    tasks = [t for t in tasks if t.form in wanted]
    independent = [t for t in tasks if t.form != "joint"]
    done = _parallel(_fit_task, [(t, options.fit) for t in independent], options.workers,
                     [_task_cost(t) for t in independent])
    shared = next((d for d in done if d.task.form == "dense_moe_shared_E" and d.fit), None)
    for task in (t for t in tasks if t.form == "joint"):
        if shared is None and task.skip_reason is None:
            task.skip_reason = "needs E from the dense + MoE-from-scratch fit, which was skipped (see above)"
        done.append(_fit_task(task, options.fit, {"E": shared.fit.values["E"]} if shared else None))
    return done


def _select_all(fits: list[LawFit]) -> list[Selection]:
    selections = []
    for family in FAMILY_FORMS:
        for subset in dict.fromkeys(f.subset for f in fits if f.family == family):
            chosen = select([f for f in fits if f.family == family and f.subset == subset])
            if chosen is not None:
                selections.append(chosen)
    return selections


def _bootstrap_chosen(done: list[_Done], chosen_by_subset: dict[str, str], options: AnalysisOptions) -> None:
    """Bootstrap the forms chosen by leave-one-out and those the derived quantities use
    (every form with ``bootstrap_all``); the rest keep their jackknife errors."""
    fit_opts = options.fit

    def wanted(d: _Done) -> bool:
        if d.fit is None or fit_opts.n_bootstrap <= 0:
            return False
        return (options.bootstrap_all or d.fit.family not in FAMILY_FORMS
                or chosen_by_subset.get(d.fit.subset) == d.fit.form)

    to_boot = [d for d in done if wanted(d)]
    shared = [d for d in to_boot if d.task.form == "dense_moe_shared_E"]
    _bootstrap_all(shared, fit_opts, options.workers)  # first: the joint law takes E from its samples
    rest = [d for d in to_boot if d.task.form != "dense_moe_shared_E"]
    fixed = {i: [{"E": e} for e in shared[0].fit.bootstrap.samples["E"]]
             for i, d in enumerate(rest) if d.task.form == "joint" and shared}
    _bootstrap_all(rest, fit_opts, options.workers, fixed)
    shared_fit = next((d.fit for d in done if d.task.form == "dense_moe_shared_E" and d.fit), None)
    for d in done:  # after the bootstraps: the shared fit's E is final only now
        if d.fit is not None and d.fixed and shared_fit is not None:
            identification.apply(d.fit, identification.fixed_flags(d.fit, shared_fit))
    for d in done:
        if d.fit is not None and d.fit.bootstrap is None and fit_opts.n_bootstrap > 0:
            d.fit.notes.append("no bootstrap (not chosen by leave-one-out); the jackknife standard errors "
                               "from the leave-one-out refits give its uncertainty")


def _cpt_check(table, fits: list[LawFit]) -> list[str]:
    """Dense-CPT runs are not fitted: the advisor predicts CPT with the dense law at D1 + D2.
    Where the table has CPT runs, say how well that assumption holds on them."""
    cpt = table.rows("cpt")
    if not cpt.any():
        return []
    shared = next((f for f in fits if f.form == "dense_moe_shared_E"), None)
    dense = next((f for f in fits if f.form == "chinchilla" and f.subset.startswith("dense")), None)
    if shared is None and dense is None:
        return [f"{int(cpt.sum())} dense-CPT runs not used: no dense law was fitted to check them against"]
    d = table.col("D1")[cpt] + table.col("D2")[cpt]
    n = table.col("N1")[cpt]
    if shared is not None:
        predicted = shared.predict(D=d, N=n, is_moe=np.zeros_like(d))
        source = "dense half of dense_moe_shared_E"
    else:
        predicted = dense.predict(D=d, N=n)
        source = "dense chinchilla fit"
    err = predicted - table.col("val_loss")[cpt]
    return [f"{int(cpt.sum())} dense-CPT runs: the {source} at D = D1 + D2 predicts them with RMS error "
            f"{np.sqrt(np.mean(err ** 2)):.4g} nats (mean {np.mean(err):+.4g}); the advisor assumes this holds"]


def analyze(results_csv_path: str | os.PathLike, out_dir: str | os.PathLike,
            options: AnalysisOptions | None = None) -> AnalysisResult:
    """Fit, select, bootstrap and report; write fits.json, loo.md, dstar.md, plots/*.png."""
    options = options or AnalysisOptions()
    start = time.perf_counter()
    if options.forms:
        unknown = [f for f in options.forms if f not in LAWS]
        if unknown:
            raise UserError(f"unknown form(s) {', '.join(unknown)}; known: {', '.join(LAWS)}")
    table = read_results(results_csv_path, columns=options.columns, tokens_unit=options.tokens_unit)
    name = Path(results_csv_path).name
    done = _fit_all(_plan(table), options)
    fits = [d.fit for d in done if d.fit is not None]
    skipped = [d.skipped for d in done if d.skipped is not None]
    for form in options.forms or ():
        if not any(f.form == form for f in fits):
            why = "; ".join(f"{s.subset}: {s.reason}" for s in skipped if s.form == form) or "not planned"
            raise UserError(f"form {form} cannot be fitted to {name}: {why}")
    if not fits:
        why = "; ".join(f"{s.form} ({s.subset}): {s.reason}" for s in skipped[:4])
        raise UserError(f"no scaling-law form could be fitted to {name}: {why}")
    selections = _select_all(fits)
    chosen_by_subset = {s.subset: s.chosen for s in selections}
    _bootstrap_chosen(done, chosen_by_subset, options)

    ratio, ratio_note = datasets.n2_over_n1(table)
    notes = [f"N2/N1 = {ratio:.4g}: {ratio_note}"] + _cpt_check(table, fits)
    row_of = {r: i for i, r in enumerate(table.run_id)}
    exponents = []
    for fit in fits:
        if fit.family == "joint" or (fit.family == "d1d2" and chosen_by_subset.get(fit.subset) == fit.form):
            d1_values = sorted(set(table.col("D1")[[row_of[r] for r in fit.run_ids]].tolist()))
            exponents.extend(derived.effective_exponents(fit, d1_values))
    dstar_fitted, compute = None, []
    units = options.fit.units
    if units.tokens_per_unit == 1.0 and units.parameters_per_unit == 1.0:
        pred = derived.fitted_predictors(fits, ratio, selections=chosen_by_subset)
        if pred.upcycled is not None and pred.moe is not None and pred.upcycled_form == "joint":
            dstar_fitted = derived.dstar_report(pred, options.dstar_n1, ci=options.fit.ci)
        joint = next((f for f in fits if f.form == "joint"), None)
        if joint is not None:
            d1 = float(np.median(table.col("D1")[table.rows("upcycled")]))
            compute += [derived.compute_optimal(joint.values, c, d1, ratio, samples=joint.bootstrap_values(),
                                                ci=options.fit.ci) for c in COMPUTE_BUDGETS]
            caution = identification.law_warning(joint, "the upcycled law")
            for c in compute if caution else ():
                c.note += f"; caution, {caution}"
    else:
        notes.append(f"derived quantities (D*, compute-optimal, advice) need raw units; fits are in "
                     f"{units.describe()}")
    paper = derived.paper_predictors()
    dstar_paper = derived.dstar_report(paper, options.dstar_n1)
    compute += [derived.compute_optimal(paper.upcycled, c, PAPER_COMPUTE_D1, paper.n2_over_n1, laws="paper")
                for c in COMPUTE_BUDGETS]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = AnalysisResult(
        results_csv=str(results_csv_path), out_dir=str(out), units=options.fit.units,
        huber_delta=options.fit.huber_delta, fits=fits, skipped=skipped, selections=selections,
        dstar_fitted=dstar_fitted, dstar_paper=dstar_paper, compute_optimal=compute,
        effective_exponents=exponents, n2_over_n1=ratio, files=[], n_bfgs_runs=sum(d.runs for d in done),
        n_bfgs_iterations=sum(d.iterations for d in done), seconds=0.0, notes=notes, read_notes=list(table.notes),
    )
    from megatron_upcycle.scaling import report

    files = [out / "loo.md", out / "dstar.md"]
    report.write_loo_md(files[0], result)
    report.write_dstar_md(files[1], result)
    if options.plots:
        from megatron_upcycle.scaling import plots

        files += plots.write_all(out / "plots", result, table)
    files.append(out / "fits.json")
    result.files = [str(f) for f in files]
    result.seconds = time.perf_counter() - start
    write_fits_json(out / "fits.json", result)
    return result
