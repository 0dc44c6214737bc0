"""The advisor's serving term: does upcycling still pay once the model serves T tokens?

Total cost = training FLOPs + serving cost of T tokens, the serving cost in
dense-forward-FLOP equivalents: 2 N1 per token for the dense model and r times
that for the MoE, r = the MoE's serving cost per token relative to dense, from
one of three estimates:

- compute-bound: forward FLOPs per token, r = N2 / N1;
- memory-bound: weight bytes read per decode step at batch B, for this family's
  shape (attention 4 d^2, MLP 12 d^2 per layer: N1 = 16 L d^2) with the MoE layer
  reading E (1 - (1 - k/E)^B) experts per step: r = (4 + 12 E (1 - (1 - k/E)^B)) / 16
  (embeddings and the KV cache left out: both are the same for dense and MoE);
- measured: dense / MoE throughput from a ``upcycle bench-inference`` results.json.

At equal total cost, dense continued pretraining (CPT) gets the upcycled run's
training FLOPs plus the serving FLOPs the MoE would have spent beyond dense,
2 N1 T (r - 1), as extra training: D_cpt(T) = (6 N2 D2 + 2 N1 T (r - 1)) / (6 N1)
tokens. Its predicted loss falls with T; the crossover T* is where it reaches the
upcycled loss (solved on log T).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from megatron_upcycle.errors import UserError
from megatron_upcycle.inference.cost import expected_distinct_experts

ESTIMATES = ("compute", "memory", "measured")
T_RANGE = (1.0, 1e22)  # served tokens searched for the crossover
MEASURED_WORKLOADS = ("offline_max_throughput", "online_max_throughput", "decode_batch1")


@dataclass
class ServingEstimate:
    name: str  # compute, memory, measured
    cost_ratio: float  # MoE serving cost per token / dense
    description: str


@dataclass
class ServingAdvice:
    serve_tokens: float
    estimate: ServingEstimate  # the one the recommendation uses
    upcycle_tokens: float  # D2
    upcycle_loss: float
    cpt_tokens: float  # D_cpt at equal total cost, at serve_tokens
    cpt_loss: float
    total_cost: float  # training + serving FLOP equivalents, equal for both
    recommendation: str  # "upcycle" or "dense_cpt"
    crossover_tokens: float | None  # served tokens from which dense CPT wins (0: always; None: never)
    crossovers: dict[str, float | None] = field(default_factory=dict)  # per available estimate
    estimates: list[ServingEstimate] = field(default_factory=list)
    reason: str = ""


def memory_bound_ratio(num_experts: int, topk: int, batch: int) -> float:
    return (4 + 12 * expected_distinct_experts(num_experts, topk, batch)) / 16


def measured_ratio(path: str | Path, model: str | None = None, workload: str | None = None) -> ServingEstimate:
    """Dense / MoE throughput from a bench-inference results.json (one MoE model, one workload)."""
    from megatron_upcycle.inference.results import read_results

    results = read_results(path)
    ratios = results["ratios"]
    if not ratios:
        raise UserError(f"{path}: holds no MoE model to take a ratio from")
    if model is None:
        model = next(iter(ratios))
    if model not in ratios:
        raise UserError(f"{path}: no MoE model '{model}' (it has {', '.join(ratios)})")
    workloads = [workload] if workload else [w for w in MEASURED_WORKLOADS if w in ratios[model]]
    if not workloads or workloads[0] not in ratios[model]:
        raise UserError(f"{path}: model '{model}' has no measured {workload or 'throughput'} ratio")
    ratio = ratios[model][workloads[0]]["ratio"]
    engine = results["engine"]
    return ServingEstimate("measured", 1.0 / ratio,
                           f"measured: {model} / dense {workloads[0].replace('_', ' ')} = {ratio:.3f} with "
                           f"{engine['name']} on {engine.get('device', '?')} ({Path(path)})")


def estimates_for(n2_over_n1: float, num_experts: int, topk: int, batch: int,
                  measured: ServingEstimate | None) -> list[ServingEstimate]:
    out = [
        ServingEstimate("compute", n2_over_n1, f"compute-bound: forward FLOPs per token, N2 / N1 = {n2_over_n1:.3f}"),
        ServingEstimate("memory", memory_bound_ratio(num_experts, topk, batch),
                        f"memory-bound: weight bytes read per decode step at batch {batch}, {num_experts} experts "
                        f"top-{topk} ({expected_distinct_experts(num_experts, topk, batch):.2f} experts read per "
                        f"MoE layer)"),
    ]
    return out + ([measured] if measured else [])


def _losses(pred, n1: float, d1: float, d2: float, ratio: float):
    n2 = pred.n2_over_n1 * n1
    upcycled = float(pred.upcycled_loss(d1, d2, n1))

    def cpt_tokens(t: float) -> float:
        return (6 * n2 * d2 + 2 * n1 * t * (ratio - 1)) / (6 * n1)

    def cpt_loss(t: float) -> float:
        return float(pred.dense_loss(d1 + max(cpt_tokens(t), 0.0), n1))

    return upcycled, cpt_tokens, cpt_loss


def crossover(pred, n1: float, d1: float, d2: float, ratio: float) -> float | None:
    """Served tokens from which dense CPT at equal total cost predicts a loss <= upcycling's."""
    upcycled, _, cpt_loss = _losses(pred, n1, d1, d2, ratio)
    if cpt_loss(0.0) <= upcycled:
        return 0.0
    if ratio <= 1 or cpt_loss(T_RANGE[1]) > upcycled:
        return None

    def gap(log_t):
        return cpt_loss(float(np.exp(log_t))) - upcycled

    return float(np.exp(brentq(gap, np.log(T_RANGE[0]), np.log(T_RANGE[1]), xtol=1e-6)))


def serving_advice(pred, n1: float, d1: float, serve_tokens: float, tokens: float | None = None,
                   flops: float | None = None, estimate: str = "memory", num_experts: int = 8, batch: int = 8,
                   measured: ServingEstimate | None = None) -> ServingAdvice:
    """Upcycling vs dense CPT at equal training + serving cost; ``pred`` is a scaling.Predictors."""
    if pred.upcycled is None or pred.dense is None:
        raise UserError("--serve-tokens needs an upcycled and a dense law (the fits have "
                        f"{'no upcycled' if pred.upcycled is None else 'no dense'} law)")
    if not (np.isfinite(serve_tokens) and serve_tokens >= 0):
        raise UserError(f"--serve-tokens must be >= 0, got {serve_tokens}")
    if estimate not in ESTIMATES:
        raise UserError(f"--serve-estimate must be one of {', '.join(ESTIMATES)}, got '{estimate}'")
    if estimate == "measured" and measured is None:
        raise UserError("--serve-estimate measured needs --serve-ratio-from RESULTS.json")
    n2 = pred.n2_over_n1 * n1
    topk = max(1, round((16 * pred.n2_over_n1 - 4) / 12))  # N2 / N1 = (4 + 12 k) / 16 in this family
    if topk > num_experts:
        raise UserError(f"N2 / N1 = {pred.n2_over_n1:g} means top-{topk} routing, more than --experts {num_experts}")
    d2 = tokens if tokens is not None else flops / (6 * n2)
    options = estimates_for(pred.n2_over_n1, num_experts, topk, batch, measured)
    chosen = next(e for e in options if e.name == estimate)
    upcycled, cpt_tokens, cpt_loss = _losses(pred, n1, d1, d2, chosen.cost_ratio)
    crossings = {e.name: crossover(pred, n1, d1, d2, e.cost_ratio) for e in options}
    cpt_at = cpt_loss(serve_tokens)
    best = "dense_cpt" if cpt_at < upcycled else "upcycle"
    total = 6 * n2 * d2 + 2 * n1 * serve_tokens * chosen.cost_ratio
    t_star = crossings[estimate]
    when = ("dense CPT wins at any serving volume" if t_star == 0 else
            "dense CPT never catches up (its law's floor is above the upcycled loss)" if t_star is None else
            f"dense CPT wins from {t_star:.3g} served tokens")
    reason = (f"at {serve_tokens:.3g} served tokens and equal total cost {total:.3g} FLOP-equivalents, upcycling "
              f"predicts {upcycled:.4f} nats, dense CPT on {cpt_tokens(serve_tokens):.3g} extra tokens {cpt_at:.4f}; "
              f"{when} ({chosen.description}: the MoE costs {chosen.cost_ratio:.3f}x dense per served token)")
    return ServingAdvice(serve_tokens=serve_tokens, estimate=chosen, upcycle_tokens=d2, upcycle_loss=upcycled,
                         cpt_tokens=cpt_tokens(serve_tokens), cpt_loss=cpt_at, total_cost=total, recommendation=best,
                         crossover_tokens=t_star, crossovers=crossings, estimates=options, reason=reason)


def predictors_for(result, n1: float, n2_over_n1: float | None):
    """The loss predictors ``advise_from_result`` uses: fitted when ``result`` is given, else the paper's."""
    from megatron_upcycle.scaling import fitted_predictors, paper_predictors

    if result is None:
        return paper_predictors(n2_over_n1 or 1.75)
    chosen = {s.subset: s.chosen for s in result.selections}
    return fitted_predictors(result.fits, n2_over_n1 or result.n2_over_n1, n1=n1, selections=chosen)


def format_serving(advice: ServingAdvice) -> list[str]:
    def show(t):
        return "never" if t is None else ("always" if t == 0 else f"{t:.3g} tokens")

    lines = [f"serving recommendation: {advice.recommendation} (estimate used: {advice.estimate.name})",
             f"serving reason: {advice.reason}"]
    for e in advice.estimates:
        lines.append(f"  {e.name:<9} MoE/dense cost per served token {e.cost_ratio:.3f}; dense CPT beats upcycling "
                     f"from: {show(advice.crossovers[e.name])}  ({e.description})")
    return lines
