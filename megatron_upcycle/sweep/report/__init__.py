"""One report for every study: ``write_report(plan, results_csv, out_dir)`` writes REPORT.md
and its figures from the plan and results.csv (``upcycle sweep report EXP.yaml``; the demo
calls it). The report is the sections of SECTIONS, in order; each takes the ReportContext
(plan, rows, out_dir, the analysis result) and returns Markdown chunks.

Modules, one job each: context (what sections read), summary, results (table), curves
(Figure 3), fits (laws, Figure 1, predicted vs observed), dstar (observed, fitted, paper's;
Figure 4/6), advice, noise (seed spread against LOO RMS), limits, figures (drawing helpers).
Sections that belong to another package are written ``(plan, rows, out_dir) -> list[str]``
and wrapped with ``plain``: inference cost (megatron_upcycle.inference.report) and downstream
quality (megatron_upcycle.evaluation.report).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.evaluation.report import downstream_section
from megatron_upcycle.inference.report import inference_section
from megatron_upcycle.sweep.plan import Plan
from megatron_upcycle.sweep.report.advice import advice_section
from megatron_upcycle.sweep.report.context import ReportContext, build_context
from megatron_upcycle.sweep.report.curves import curves_section
from megatron_upcycle.sweep.report.dstar import dstar_section
from megatron_upcycle.sweep.report.fits import fits_section
from megatron_upcycle.sweep.report.limits import limits_section
from megatron_upcycle.sweep.report.noise import noise_section
from megatron_upcycle.sweep.report.results import results_section
from megatron_upcycle.sweep.report.summary import summary_section

Section = Callable[[ReportContext], list[str]]


def plain(section: Callable[[Plan, list[dict], Path], list[str]]) -> Section:
    """A section written as ``(plan, rows, out_dir) -> list[str]`` as a SECTIONS entry."""
    def run(ctx: ReportContext) -> list[str]:
        return section(ctx.plan, ctx.rows, ctx.out_dir)

    run.__name__ = getattr(section, "__name__", "section")
    return run


SECTIONS: list[Section] = [
    summary_section,
    results_section,
    curves_section,
    fits_section,
    dstar_section,
    advice_section,
    noise_section,
    plain(inference_section),
    plain(downstream_section),
    limits_section,
]


def render(ctx: ReportContext, sections: list[Section] | None = None) -> str:
    chunks = [f"# Upcycling study: {ctx.plan.experiment.name}",
              "All D are tokens, all N are parameters, losses are validation cross-entropy in nats."]
    for section in SECTIONS if sections is None else sections:
        chunks += section(ctx)
    return "\n\n".join(chunks) + "\n"


def write_report(plan: Plan, results_csv: str | Path, out_dir: str | Path, wall_seconds: float | None = None,
                 sections: list[Section] | None = None, fit_options=None) -> Path:
    """Fit, draw and write ``out_dir/REPORT.md`` (figures beside it, fits under out_dir/fits)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = build_context(plan, Path(results_csv), out_dir, wall_seconds=wall_seconds, fit_options=fit_options)
    path = out_dir / "REPORT.md"
    write_text_atomic(path, render(ctx, sections))
    return path


__all__ = ["SECTIONS", "ReportContext", "Section", "build_context", "plain", "render", "write_report"]
