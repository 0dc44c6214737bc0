"""The report's opening: what the study is and what of it has run."""
from __future__ import annotations

from megatron_upcycle.sweep.plan import fmt_tokens
from megatron_upcycle.sweep.report.context import ReportContext


def model_line(ctx: ReportContext) -> list[str]:
    """One line per dense size: layers, width, N1 (parameters, from the plan's exact counts)."""
    from megatron_upcycle.config.presets import load_model_config

    lines = []
    for name in ctx.plan.experiment.dense_models:
        cfg = load_model_config(name)
        n1 = next((r.active_params for r in ctx.plan.runs if r.model == name and r.kind == "dense"), None)
        n1_text = f", N1 = {n1:,} non-embedding parameters" if n1 else ""
        lines.append(f"  - `{name}`: {cfg.num_layers} layers, d = {cfg.hidden_size}, vocabulary {cfg.vocab_size}, "
                     f"context {cfg.seq_length} tokens{n1_text}")
    return lines


def summary_section(ctx: ReportContext) -> list[str]:
    plan, exp = ctx.plan, ctx.plan.experiment
    saving = plan.independent_tokens / max(plan.total_tokens, 1)
    budgets = [r for r in plan.runs if r.stage == "branch"]
    seeds = exp.seeds
    seed_text = f"seed(s) {', '.join(map(str, seeds.runs))}"
    if seeds.extra:
        seed_text += (f"; noise probe with {seeds.extra} more seeds ({', '.join(map(str, exp.noise_seeds()))}) at "
                      f"D1 = {fmt_tokens(seeds.d1)}, D2 = {fmt_tokens(seeds.d2)} tokens")
    lines = [
        f"- experiment `{exp.name}`: {len(exp.dense_models)} dense size(s)",
        *model_line(ctx),
        f"- MoE: {', '.join(f'{m.experts} experts top-{m.topk}' for m in exp.moe) or 'none'}; upcycled from the "
        f"{exp.upcycle_from} dense checkpoint",
        f"- D1 budgets: {', '.join(fmt_tokens(d) for d in exp.d1.values())} tokens; D2 budgets: "
        f"{', '.join(fmt_tokens(d) for d in exp.d2.values())} tokens; decay fraction {exp.decay_fraction}",
        f"- {seed_text}",
        f"- {len(plan.runs)} runs, {plan.total_tokens:,} training tokens, {plan.total_flops:.3g} FLOPs (6 N D); "
        f"every budget as an independent run would take {plan.independent_tokens:,} tokens ({saving:.2f}x more)",
        f"- {len(ctx.rows)} of {len(budgets)} planned budgets finished (results.csv)",
    ]
    if ctx.wall_seconds is not None:
        lines.append(f"- wall time of this invocation: {ctx.wall_seconds / 60:.1f} minutes")
    return ["## What ran", "\n".join(lines)]
