"""The advisor at each of the study's sizes: upcycle, MoE from scratch or dense CPT, from
the study's own laws (joint and shared-E with 2+ sizes, the one-size laws otherwise)."""
from __future__ import annotations

from megatron_upcycle.errors import UserError
from megatron_upcycle.sweep.report.context import ReportContext


def _size_budget(ctx: ReportContext, n1: float) -> tuple[float, float] | None:
    """(D1, extra tokens) for the advice at size n1: the largest D1 and D2 the study ran."""
    dense = [float(r["D1"]) for r in ctx.rows if r["kind"] == "dense" and float(r["N1"]) == n1]
    extra = [float(r["D2"]) for r in ctx.rows if r["kind"] == "upcycled" and float(r["N1"]) == n1]
    if not dense or not extra:
        return None
    return max(dense), max(extra)


def advice_lines(ctx: ReportContext) -> list[str]:
    from megatron_upcycle.scaling import advise_from_result

    sizes = ctx.dense_sizes()
    if not sizes:
        return ["No advice: the table has no dense runs."]
    table = ["| N1 (parameters) | D1 (tokens) | strategy | predicted loss (nats) | 95% interval | tokens | note |",
             "|---:|---:|---|---:|---|---:|---|"]
    verdicts, laws = [], set()
    for n1 in sizes:
        budget = _size_budget(ctx, n1)
        if budget is None:
            verdicts.append(f"- N1 = {n1:,.0f}: no advice, no upcycled runs at this size.")
            continue
        d1, tokens = budget
        try:
            advice = advise_from_result(ctx.analysis, n1, d1, tokens=tokens)
        except UserError as exc:
            verdicts.append(f"- N1 = {n1:,.0f}: no advice from the fitted laws: {exc}")
            continue
        laws.add(advice.laws)
        verdicts.append(f"- N1 = {n1:,.0f}, D1 = {d1:,.0f} tokens, {advice.budget}: **{advice.recommendation}**: "
                        f"{advice.reason}.")
        for o in advice.options:
            loss = "n/a" if o.predicted_loss is None else f"{o.predicted_loss:.4f}"
            ci = "" if o.ci_low is None else f"[{o.ci_low:.4f}, {o.ci_high:.4f}]"
            toks = "" if o.tokens is None else f"{o.tokens:,.0f}"
            table.append(f"| {n1:,.0f} | {d1:,.0f} | {o.strategy} | {loss} | {ci} | {toks} | {o.note} |")
    out = verdicts
    if len(table) > 2:
        out += ["", *table, "", "Laws used: " + "; ".join(sorted(laws)) + "."]
    return out


def advice_section(ctx: ReportContext) -> list[str]:
    if ctx.analysis is None:
        return ["## Advice", f"No advice: no law was fitted ({ctx.analysis_error})."]
    return ["## Advice at this study's sizes",
            "For each dense model after its largest D1, with the largest D2 of the study as the extra budget "
            "(every option trains that many tokens).", "\n".join(advice_lines(ctx))]
