"""Scaling laws for upcycling: forms, fitting, selection, bootstrap, D*, advice, reports.

Modules, one job each: ``laws`` (the forms as data), ``io`` (results.csv in,
fits.json out), ``datasets`` (which rows each form is fitted to), ``fitting``
(multi-start BFGS on a Huber loss of log L), ``identification`` (which parameters
the runs pin down), ``selection`` (leave-one-out, robust criterion, influence),
``bootstrap``, ``derived`` (D*, effective exponent, compute-optimal, advisor),
``report`` (Markdown), ``plots`` (PNG), ``analysis`` (``analyze``: all of it).
``published`` holds the paper's Table 2 parameters, ``synthetic`` generates
tables from known laws. Units everywhere: D in tokens, N in parameters, loss in nats.

    from megatron_upcycle.scaling import analyze
    result = analyze("results.csv", "out/")     # AnalysisResult; writes fits.json, loo.md, dstar.md, plots/
    advice = advise_from_result(result, n1=1e9, d1=2e10, tokens=1e10)   # result=None: the paper's laws
"""
from megatron_upcycle.scaling.analysis import AnalysisOptions, analyze
from megatron_upcycle.scaling.derived import (Predictors, advise, advise_from_result, compute_optimal, dstar_report,
                                              fitted_predictors, paper_predictors, solve_dstar)
from megatron_upcycle.scaling.fitting import FitOptions, LawFitter
from megatron_upcycle.scaling.io import read_fits_json, read_results
from megatron_upcycle.scaling.laws import LAWS, Units
from megatron_upcycle.scaling.records import AnalysisResult, LawFit

__all__ = [
    "AnalysisOptions", "AnalysisResult", "FitOptions", "LAWS", "LawFit", "LawFitter", "Predictors", "Units",
    "advise", "advise_from_result", "analyze", "compute_optimal", "dstar_report", "fitted_predictors", "paper_predictors",
    "read_fits_json", "read_results", "solve_dstar",
]
