"""The main job: ``make demo`` / ``python -m megatron_upcycle.demo``.

Runs yaml/experiments/cpu_demo.yaml (a miniature upcycling study on the embedded
corpus: three dense sizes, a noise probe) through the local executor, collects
results.csv and writes the study report, ``<root>/report/REPORT.md`` with its
figures (the same report as ``upcycle sweep report``). Interrupted and re-run, it
continues where it stopped: finished runs are skipped. The last line printed is
``demo_wall_minutes: X``.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from megatron_upcycle.resources import experiment_preset

EXPERIMENT = experiment_preset("cpu_demo")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=str(EXPERIMENT))
    parser.add_argument("--root", default="demo_out",
                        help="output root (default: demo_out/ in the current directory)")
    parser.add_argument("--max-parallel", type=int, default=None, help="concurrent runs (default: cores)")
    return parser.parse_args(argv)


def run_demo(args) -> int:
    from megatron_upcycle.cli.sweep import local_executor
    from megatron_upcycle.sweep.collect import write_results_csv
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.materialize import to_dag, write_run_dirs
    from megatron_upcycle.sweep.plan import build_plan, format_plan
    from megatron_upcycle.sweep.report import write_report

    start = time.perf_counter()
    experiment = load_experiment(args.experiment)
    plan = build_plan(experiment, args.root)
    print(format_plan(plan), flush=True)
    write_run_dirs(plan)
    report = local_executor(args.max_parallel).run(to_dag(plan, cpu_only=True))
    if not report.ok:
        for run_id, failure in report.failed.items():
            print(f"demo: run {run_id} failed: {failure.describe()}", file=sys.stderr)
        for run_id, holder in report.elsewhere.items():
            print(f"demo: run {run_id} is running in another process ({holder}); run `make demo` again when "
                  "it has finished", file=sys.stderr)
        if report.interrupted:
            print("demo: interrupted; run `make demo` again to continue where it stopped", file=sys.stderr)
        return 1
    results, rows = write_results_csv(plan.root)
    print(f"collected {rows} results into {results}", flush=True)
    _measure_inference(plan)
    path = write_report(plan, results, plan.root / "report", wall_seconds=time.perf_counter() - start)
    print(f"report: {path}")
    print(f"demo_wall_minutes: {(time.perf_counter() - start) / 60:.1f}")
    return 0


def _measure_inference(plan) -> None:
    """MoE / dense serving speed of the study's final models, for the report's "Inference
    cost" section (reused when a re-run finds it). A model that cannot be exported is
    said in one line; the report then falls back to the analytic prediction."""
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.inference.report import measure_study_inference

    print("demo: measuring inference cost of the final dense and upcycled models", flush=True)
    try:
        measure_study_inference(plan)
    except UserError as exc:
        print(f"demo: inference measurement skipped: {exc}", flush=True)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_upcycle.exit_codes import run_entry

    return run_entry("demo", lambda: run_demo(args), log_dir=Path(args.root) / "logs")


if __name__ == "__main__":
    sys.exit(main())
