"""Benchmark: every scaling-law form, with leave-one-out and bootstrap, on a 100-run table.

Synthetic table from the paper's Table 2 laws (plus an illustrative configuration
sweep), 0.3% noise, seed 0: 20 dense, 20 MoE-from-scratch, 48 upcycled
(3 models x 4 D1 x 4 D2) and 12 configuration runs. Prints the BFGS run count
(the machine is shared, so seconds alone say little) and, last,
``fit_suite_seconds: X``. Goal: X <= 30 on the 2-core development machine.
By default the bootstrap runs for the forms chosen by leave-one-out and those
D* uses (8 of the 20 fits); --bootstrap-all runs it for every form.

    .venv/bin/python bench/fit_suite.py [--bootstrap 100] [--workers N] [--bootstrap-all]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--bootstrap-all", action="store_true",
                        help="bootstrap every form (default: the LOO-chosen ones and those D* uses)")
    args = parser.parse_args()

    from megatron_upcycle.scaling import AnalysisOptions, FitOptions, analyze
    from megatron_upcycle.scaling.synthetic import SyntheticSpec, synthetic_rows, write_results_csv

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = os.path.join(tmp, "results.csv")
        rows = synthetic_rows(SyntheticSpec(noise=0.003, seed=0))
        write_results_csv(csv_path, rows)
        start = time.perf_counter()
        result = analyze(csv_path, os.path.join(tmp, "out"),
                         AnalysisOptions(fit=FitOptions(n_bootstrap=args.bootstrap), workers=args.workers,
                                         bootstrap_all=args.bootstrap_all))
        seconds = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    print(f"runs in table: {len(rows)}")
    booted = sum(f.bootstrap is not None for f in result.fits)
    print(f"fits: {len(result.fits)} (all with LOO), skipped: {len(result.skipped)}, "
          f"bootstrapped: {booted} x {args.bootstrap} resamples (others: jackknife from LOO)")
    for s in result.selections:
        robust = "" if s.criteria_agree else f" (held-out Huber chooses {s.robust_chosen})"
        print(f"  {s.family} [{s.subset}]: {s.chosen}{robust}; influential runs: {len(s.influential)}")
    flagged = [f for f in result.fits if f.unidentified()]
    print(f"fits with parameters not identified: {len(flagged)} of {len(result.fits)} "
          f"({', '.join(sorted({p for f in flagged for p in f.unidentified()}))})")
    print(f"bfgs_runs: {result.n_bfgs_runs} ({result.n_bfgs_iterations} iterations)")
    print(f"cpu_seconds (user, incl. workers): {cpu:.1f}")
    print(f"fit_suite_seconds: {seconds:.1f}")


if __name__ == "__main__":
    main()
