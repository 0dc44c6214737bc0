"""Check group 2: the engine trains, resumes bit-exactly and branches, in the backend's precision.

A tiny dense model runs as a WSD *stable* run serving one budget of 22 steps: it
trains 20 steps (the budget's decay starts there), saves a safety checkpoint at
18 and the budget checkpoint at 20. Then, with the real engine each time:
  - a second run directory holding only that run's step-18 checkpoint resumes and
    must compute the same loss at step 19 (the next step) as the uninterrupted run;
  - a decay branch resumes the step-20 budget checkpoint and decays to 22.
A tiny MoE (8 experts, top-2, the backend's dispatcher) trains 20 steps from scratch.
On GPU the engine's components are Megatron DDP, the distributed optimizer and bf16.
"""
from __future__ import annotations

import math
import shutil

from megatron_upcycle.selftest import runs
from megatron_upcycle.selftest.report import Failed, Outcome

BUDGET_STEPS = 22  # decay = round(0.1 x 22) = 2 steps: the stable run stops at 20
SAFETY_STEP = 18
MOE = {"num_experts": 8, "topk": 2}


def tokens_per_step(ctx) -> int:
    return ctx.shared["global_batch_size"] * runs.TINY_MODEL["seq_length"]


def tiny_model(ctx) -> str:
    if "tiny_model" not in ctx.shared:
        ctx.shared["tiny_model"] = runs.write_model(ctx, "selftest-tiny", runs.TINY_MODEL)
    return ctx.shared["tiny_model"]


def dense_config(ctx, **extra) -> dict:
    return runs.run_config(
        ctx, kind="dense", model=tiny_model(ctx), global_batch_size=ctx.shared["global_batch_size"],
        micro_batch_size=runs.MICRO_BATCH,
        schedule={"mode": "stable", "save_budgets": [BUDGET_STEPS * tokens_per_step(ctx)],
                  "safety_interval_iters": SAFETY_STEP, "keep_safety": 1}, **extra)


def moe_config(ctx, **extra) -> dict:
    return runs.run_config(
        ctx, kind="moe", model=tiny_model(ctx), moe=dict(MOE), global_batch_size=ctx.shared["global_batch_size"],
        micro_batch_size=runs.MICRO_BATCH, schedule={"train_tokens": runs.STEPS * tokens_per_step(ctx)}, **extra)


def judge_learning(outcome: runs.RunOutcome, steps: int) -> dict:
    """Loss finite at every step and decreasing (mean of the last 5 steps below the first 5)."""
    losses = outcome.losses
    if sorted(losses) != list(range(1, steps + 1)):
        raise Failed(f"expected losses for steps 1..{steps}, got {sorted(losses)}")
    values = [losses[i] for i in sorted(losses)]
    bad = [i for i, v in zip(sorted(losses), values) if not math.isfinite(v)]
    if bad:
        raise Failed(f"non-finite loss at steps {bad}")
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    if not last < first:
        raise Failed(f"loss did not decrease: mean of steps 1-5 {first:.4f}, of the last 5 {last:.4f}")
    val = outcome.result["val_loss"]
    if not math.isfinite(val):
        raise Failed(f"validation loss is {val}")
    return {"loss_first": values[0], "loss_last": values[-1], "loss_first5_mean": first, "loss_last5_mean": last,
            "val_loss": val, "tokens_per_second": outcome.result["tokens_per_second"],
            "backend": outcome.result["backend"], "world_size": outcome.result["world_size"]}


def _components(ctx) -> str:
    if ctx.on_gpu:
        return "bf16, Megatron DDP + distributed optimizer"
    return "fp32, Megatron DDP + FP32Optimizer"


def train_dense(ctx) -> Outcome:
    outcome = runs.train(ctx, "dense", dense_config(ctx))
    ctx.shared["dense"] = outcome
    data = judge_learning(outcome, runs.STEPS) if ctx.is_main else {}
    detail = (f"{runs.STEPS} steps ({_components(ctx)}), loss {data.get('loss_first', 0):.4f} -> "
              f"{data.get('loss_last', 0):.4f}, val {data.get('val_loss', 0):.4f}, "
              f"{data.get('tokens_per_second', 0):,.0f} tokens/s")
    return Outcome(detail, data)


def train_moe(ctx) -> Outcome:
    outcome = runs.train(ctx, "moe", moe_config(ctx))
    ctx.shared["moe"] = outcome
    if not ctx.is_main:
        return Outcome("")
    data = judge_learning(outcome, runs.STEPS)
    aux = outcome.field("aux_loss")
    if not aux or not all(math.isfinite(v) for v in aux.values()):
        raise Failed(f"no finite load-balancing loss logged (got {sorted(aux.values())[:3]})")
    data["aux_loss_last"] = aux[max(aux)]
    loads = outcome.field("expert_load_max")
    data["expert_load_max_last"] = loads[max(loads)] if loads else None
    detail = (f"8 experts top-2, dispatcher {ctx.backend.moe_token_dispatcher}, {runs.STEPS} steps "
              f"({_components(ctx)}), loss {data['loss_first']:.4f} -> {data['loss_last']:.4f}, "
              f"aux {data['aux_loss_last']:.4f}, {data['tokens_per_second']:,.0f} tokens/s")
    return Outcome(detail, data)


def checkpoint_resume(ctx) -> Outcome:
    """Save -> load -> identical next-step loss: a run directory holding only the dense run's
    step-18 checkpoint resumes there, as after a crash or a requeue."""
    from megatron_upcycle.checkpoint import Manifest

    dense = ctx.shared["dense"].run_dir
    resumed = ctx.run_dir("dense-resumed")
    problem = None
    if ctx.is_main:
        record = Manifest(dense.checkpoints).at_iteration(SAFETY_STEP)
        if record is None:
            problem = f"the dense run has no checkpoint at step {SAFETY_STEP}"
        else:
            shutil.copytree(dense.checkpoint(SAFETY_STEP), resumed.checkpoint(SAFETY_STEP))
            Manifest(resumed.checkpoints).add(record)
    problem = ctx.broadcast(problem)  # every rank stops, or none
    if problem:
        raise Failed(problem)
    outcome = runs.train(ctx, resumed.name, dense_config(ctx))
    if not ctx.is_main:
        return Outcome("")
    reference, got = ctx.shared["dense"].losses, outcome.losses
    if sorted(got) != list(range(SAFETY_STEP + 1, runs.STEPS + 1)):
        raise Failed(f"the resumed run logged steps {sorted(got)}, expected {SAFETY_STEP + 1}..{runs.STEPS}")
    step = SAFETY_STEP + 1
    if got[step] != reference[step]:
        raise Failed(f"step {step} loss after resume {got[step]!r} != uninterrupted {reference[step]!r}")
    later = {i: abs(got[i] - reference[i]) for i in got if i > step}
    worst = max(later.values(), default=0.0)
    # On CPU every kernel is deterministic: all later steps match too. On GPU the backward
    # reductions may run in another order, so later steps are reported, not required.
    if not ctx.on_gpu and worst != 0.0:
        raise Failed(f"steps after {step} differ after resume by up to {worst:.3g} (CPU must be bit-exact)")
    detail = (f"resumed at step {SAFETY_STEP}: step {step} loss {got[step]:.6f} identical; later steps "
              f"max |delta| {worst:.3g}" + (" (GPU: reported)" if ctx.on_gpu else " (bit-exact)"))
    return Outcome(detail, {"next_step": step, "next_step_loss": got[step], "later_max_abs_delta": worst})


def _listing(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir.path)) for p in run_dir.path.rglob("*"))


def decay_branch(ctx) -> Outcome:
    dense = ctx.shared["dense"]
    before = _listing(dense.run_dir) if ctx.is_main else []
    budget = BUDGET_STEPS * tokens_per_step(ctx)
    config = runs.run_config(ctx, kind="branch", parent=str(dense.run_dir.path), schedule={"train_tokens": budget})
    outcome = runs.train(ctx, "dense-branch", config)
    if not ctx.is_main:
        return Outcome("")
    losses, lrs, result = outcome.losses, outcome.field("lr"), outcome.result
    if sorted(losses) != list(range(runs.STEPS + 1, BUDGET_STEPS + 1)):
        raise Failed(f"the branch logged steps {sorted(losses)}, expected only the decay "
                     f"{runs.STEPS + 1}..{BUDGET_STEPS}")
    if not all(math.isfinite(v) for v in losses.values()) or not math.isfinite(result["val_loss"]):
        raise Failed(f"non-finite loss in the branch: {losses}, val {result['val_loss']}")
    peak = result["peak_lr"]
    if not math.isclose(lrs[BUDGET_STEPS], 0.1 * peak, rel_tol=1e-6):
        raise Failed(f"the branch ended at lr {lrs[BUDGET_STEPS]:.4g}, expected 10% of the peak {peak:.4g}")
    if result["phase"] != "complete" or result["D1"] != budget:
        raise Failed(f"branch result phase {result['phase']!r}, D1 {result['D1']}; expected complete, {budget}")
    if _listing(dense.run_dir) != before:
        raise Failed("the branch changed its parent's run directory")
    stable_val = dense.result["val_loss"]
    detail = (f"decayed steps {runs.STEPS}->{BUDGET_STEPS} from the stable step-{runs.STEPS} checkpoint, "
              f"lr {peak:.2g} -> {lrs[BUDGET_STEPS]:.2g}, val loss stable {stable_val:.4f} -> decayed "
              f"{result['val_loss']:.4f}, D1 {budget:,} tokens, parent untouched")
    return Outcome(detail, {"val_loss_stable": stable_val, "val_loss_decayed": result["val_loss"],
                            "lr_end": lrs[BUDGET_STEPS], "budget_tokens": budget})
