"""What every report section reads: the plan, the results rows, the analysis, where to write."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from megatron_upcycle.errors import UserError
from megatron_upcycle.sweep.plan import Plan


@dataclass
class ReportContext:
    plan: Plan
    rows: list[dict]  # results.csv as dicts (strings, as read)
    out_dir: Path
    results_csv: Path
    analysis: object | None = None  # scaling.AnalysisResult; None when no law could be fitted
    analysis_error: str | None = None  # why not
    wall_seconds: float | None = None
    figures: dict[str, Path] = field(default_factory=dict)  # name -> written PNG, for later sections

    def rows_of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]

    def dense_sizes(self) -> list[float]:
        """N1 (parameters) of every dense model with a finished run, ascending."""
        return sorted({float(r["N1"]) for r in self.rows if r["kind"] == "dense" and r["N1"]})

    def link(self, path: Path, title: str) -> str:
        return f"![{title}]({path.relative_to(self.out_dir).as_posix()})"


def read_rows(results_csv: Path) -> list[dict]:
    with Path(results_csv).open() as handle:
        return list(csv.DictReader(handle))


def study_n1(rows: list[dict]) -> tuple[float, ...]:
    return tuple(sorted({float(r["N1"]) for r in rows if r["kind"] in ("dense", "upcycled") and r["N1"]}))


def build_context(plan: Plan, results_csv: Path, out_dir: Path, wall_seconds: float | None = None,
                  fit_options=None) -> ReportContext:
    """Read the rows and run the analysis once (D* also at the study's own sizes);
    ``fit_options``: a scaling.FitOptions (default: ``upcycle fit``'s)."""
    rows = read_rows(results_csv)
    ctx = ReportContext(plan=plan, rows=rows, out_dir=out_dir, results_csv=Path(results_csv),
                        wall_seconds=wall_seconds)
    if not rows:
        ctx.analysis_error = "results.csv has no finished runs yet"
        return ctx
    from megatron_upcycle.scaling import AnalysisOptions, FitOptions, analyze
    from megatron_upcycle.scaling.derived import PAPER_N1

    options = AnalysisOptions(fit=fit_options or FitOptions(), plots=False,
                              dstar_n1=tuple(sorted(set(PAPER_N1) | set(study_n1(rows)))))
    try:
        ctx.analysis = analyze(results_csv, out_dir / "fits", options)
    except UserError as exc:
        ctx.analysis_error = str(exc)
    return ctx
