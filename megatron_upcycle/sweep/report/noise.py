"""Run-to-run noise: the spread of the seed repeats (experiment ``seeds.extra``) against the
fits' leave-one-out RMS: a law that predicts held-out runs better than reruns of the same
run agree with each other is following noise."""
from __future__ import annotations

import numpy as np

from megatron_upcycle.sweep.report.context import ReportContext


def repeat_groups(ctx: ReportContext) -> dict[str, list[str]]:
    """First-seed run id -> it and its repeats, those in results.csv."""
    have = {r["run_id"] for r in ctx.rows}
    groups: dict[str, list[str]] = {}
    for run in ctx.plan.runs:
        if run.repeat_of and run.run_id in have and run.repeat_of in have:
            groups.setdefault(run.repeat_of, [run.repeat_of]).append(run.run_id)
    return groups


def _loo_for(ctx: ReportContext, row: dict) -> list[tuple[str, float]]:
    """LOO RMS of the headline fits (chosen D1-D2 form, not every candidate) holding this run (nats)."""
    from megatron_upcycle.sweep.report.fits import headline_fits

    if ctx.analysis is None:
        return []
    return [(f"`{f.form}` ({f.subset})", f.loo.rms) for f in headline_fits(ctx.analysis)
            if f.loo and row["run_id"] in f.run_ids]


def noise_section(ctx: ReportContext) -> list[str]:
    groups = repeat_groups(ctx)
    exp = ctx.plan.experiment
    if not groups:
        why = ("the experiment has no noise probe (`seeds: {runs: [...], extra: 2}` adds one)" if not exp.seeds.extra
               else "the seed repeats have not finished")
        return ["## Run-to-run noise", f"Not measured: {why}. Without it a fit's LOO RMS has no floor to be "
                "compared with."]
    loss = {r["run_id"]: float(r["val_loss"]) for r in ctx.rows}
    row_of = {r["run_id"]: r for r in ctx.rows}
    lines = ["| run (first seed) | kind | seeds | losses (nats) | seed std (nats) | range (nats) |",
             "|---|---|---:|---|---:|---:|"]
    verdicts = []
    for main, ids in groups.items():
        values = np.array([loss[i] for i in ids])
        std = float(np.std(values, ddof=1))
        lines.append(f"| `{main}` | {row_of[main]['kind']} | {len(ids)} | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{std:.4f} | {np.ptp(values):.4f} |")
        for name, rms in _loo_for(ctx, row_of[main]):
            word = ("**below the seed noise: the law follows noise (over-fitted); trust its intervals, not its "
                    "point estimates**" if rms < std else "at or above the seed noise, as a law that does not "
                    "over-fit should be")
            verdicts.append(f"- {name}: LOO RMS {rms:.4f} vs seed std {std:.4f} of `{main}`: {word}.")
    return ["## Run-to-run noise",
            f"The probe reruns {len(groups)} points with {exp.seeds.extra} more seeds (the upcycled rerun starts "
            "from the first seed's conversion, so only its training order differs). The reruns are rows of "
            "results.csv and enter the fits like any run.", "\n".join(lines), "\n".join(verdicts)]
