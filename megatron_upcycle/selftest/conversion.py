"""Check group 4: the trained dense model upcycled to 8 experts top-2, verified, exported.

  convert        the real converter (``upcycle.convert_dense_to_moe``: streaming, then its own
                 fp32 CPU verification, max |delta logit| <= 1e-5 x max(1, max |logit|));
  verify-device  the converted MoE run by the engine's backend on this node's device:
                 on CPU, fp32 with the converter's tolerance; on GPU, bf16 against an fp32
                 reference on the same GPU (tolerance below);
  export-hf      the MoE exported as a Hugging Face MixtralForCausalLM, loaded by transformers
                 and compared with the Megatron MoE's fp32 logits.
The converter and the exporter run on CPU by design (offline, GPUs hidden). A lone CPU
process calls them here; anywhere else (a GPU process, a torchrun job) rank 0 runs them
in a fresh CPU process, ``python -m megatron_upcycle.selftest.offline``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_upcycle.selftest import training
from megatron_upcycle.selftest.report import Failed, Outcome

EXPERTS, TOPK = 8, 2
# bf16 keeps 8 significant bits: one rounding is up to 2^-8 relative. The dense model run
# in bf16 on this GPU differs from its fp32 self by e_dense (the bf16 noise floor of this
# model); an exact conversion only adds the router's weighting and summing of k identical
# expert outputs, one more bf16 rounding per MoE layer. So the bf16 MoE may differ from the
# fp32 dense reference by at most 2 e_dense + 2^-8 x max(1, max |logit|).
BF16_UNIT_ROUNDOFF = 2.0 ** -8
VERIFY_BATCH, VERIFY_SEQ = 4, 64


def _offline(ctx, mode: str, *args: str) -> dict:
    """Run ``offline.py MODE ARGS`` in this process (a lone CPU one) or in a fresh CPU process."""
    from megatron_upcycle.selftest import offline

    if ctx.lone and not ctx.on_gpu:
        return offline.MODES[mode](*args)
    problem = None
    result: dict = {}
    if ctx.is_main:
        result_file = ctx.work / f"offline-{mode}.json"
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MEGATRON_UPCYCLE_FORCE_CPU="1",
                   PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # a lone process, not a member of this job
        log = ctx.out / f"selftest-offline-{mode}.log"
        with log.open("w") as handle:
            proc = subprocess.run([sys.executable, "-m", "megatron_upcycle.selftest.offline", mode,
                                   str(result_file), *args], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                  timeout=900)
        if proc.returncode != 0 or not result_file.exists():
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            problem = f"the CPU process exited {proc.returncode}: {lines[-1][:200] if lines else ''} (log: {log})"
        else:
            result = json.loads(result_file.read_text())
    problem = ctx.broadcast(problem)
    if problem:
        raise Failed(problem)
    return ctx.broadcast(result)


def convert(ctx) -> Outcome:
    dense = ctx.shared["dense"].run_dir.checkpoint(training.runs.STEPS)
    out = ctx.work / f"moe-{EXPERTS}x-top{TOPK}"
    report = _offline(ctx, "convert", str(dense), str(out), str(EXPERTS), str(TOPK))
    ctx.shared["dense_checkpoint"], ctx.shared["converted"] = dense, out
    if report["status"] != "ok":
        raise Failed(f"converter status {report['status']}: max |delta logit| {report['logit_max_abs']:.3g} "
                     f"(max |logit| {report['logit_scale']:.3g}), output {report['out']}")
    bound = report["tolerance"] * max(1.0, report["logit_scale"])
    detail = (f"step-{training.runs.STEPS} dense -> {EXPERTS} experts top-{TOPK} (copy init, paper router), "
              f"converter's fp32 check: max |delta logit| {report['logit_max_abs']:.2e} <= {bound:.2g}, "
              f"KL max {report['kl_max']:.2e} nats, top-1 agreement {report['top1_agreement']:.3f}")
    return Outcome(detail, report)


def _load(checkpoint: Path, moe, backend):
    from megatron_upcycle.checkpoint import load_checkpoint, read_meta
    from megatron_upcycle.models import build_gpt_model

    meta = read_meta(checkpoint)
    model = build_gpt_model(meta.model, moe, backend)
    load_checkpoint(checkpoint, model, load_rng=False)
    return model.eval()


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None).float()


def verify_device(ctx) -> Outcome:
    """The converted MoE on this device with the engine's backend (every rank computes, rank 0 judges)."""
    from megatron_upcycle.checkpoint import read_meta
    from megatron_upcycle.parallel import ParallelConfig
    from megatron_upcycle.verify import DEFAULT_TOLERANCE

    ctx.use_layout(ParallelConfig())
    dense_ckpt, moe_ckpt = ctx.shared["dense_checkpoint"], ctx.shared["converted"]
    moe_cfg = read_meta(moe_ckpt).moe
    model_cfg = read_meta(dense_ckpt).model
    device = "cuda" if ctx.on_gpu else "cpu"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (VERIFY_BATCH, VERIFY_SEQ), generator=gen).to(device)
    backend = ctx.backend
    fp32 = dataclasses.replace(backend, bf16=False)
    reference = _logits(_load(dense_ckpt, None, fp32), tokens)
    moe_logits = _logits(_load(moe_ckpt, moe_cfg, backend), tokens)
    scale = float(reference.abs().max())
    moe_err = float((moe_logits - reference).abs().max())
    agreement = float((moe_logits.argmax(-1) == reference.argmax(-1)).float().mean())
    data = {"device": device, "precision": "bf16" if backend.bf16 else "fp32", "logit_max_abs": moe_err,
            "logit_scale": scale, "top1_agreement": agreement, "dispatcher": backend.moe_token_dispatcher}
    if backend.bf16:
        dense_err = float((_logits(_load(dense_ckpt, None, backend), tokens) - reference).abs().max())
        bound = 2 * dense_err + BF16_UNIT_ROUNDOFF * max(1.0, scale)
        data.update(dense_bf16_logit_max_abs=dense_err, tolerance=bound,
                    tolerance_rule="2 x max|dense bf16 - dense fp32| + 2^-8 x max(1, max|logit|)")
        what = (f"bf16 MoE vs fp32 dense reference on {device}: max |delta logit| {moe_err:.3g} <= {bound:.3g} "
                f"(2 x the dense model's own bf16 error {dense_err:.3g} + 2^-8 x max(1, max |logit| {scale:.3g}))")
    else:
        bound = DEFAULT_TOLERANCE * max(1.0, scale)
        data.update(tolerance=bound, tolerance_rule="1e-5 x max(1, max|logit|), the converter's own (fp32)")
        what = f"fp32 MoE vs fp32 dense on {device}: max |delta logit| {moe_err:.3g} <= {bound:.3g} (the converter's own)"
    if not (math.isfinite(moe_err) and moe_err <= bound):
        raise Failed(f"{what}: exceeded" if math.isfinite(moe_err) else f"non-finite MoE logits on {device}")
    return Outcome(f"{what}, dispatcher {backend.moe_token_dispatcher}, top-1 agreement {agreement:.3f}", data)


def export_hf(ctx) -> Outcome:
    out = ctx.work / f"hf-moe-{EXPERTS}x-top{TOPK}"
    report = _offline(ctx, "export", str(ctx.shared["converted"]), str(out))
    if not report["passed"]:
        raise Failed(f"{report['architecture']} logits differ from Megatron's by {report['logit_max_abs']:.3g} "
                     f"> {report['tolerance']:.3g}; loading: {report['loading_problems'] or 'clean'}")
    detail = (f"{report['architecture']} written and loaded by transformers {report['transformers']} with no "
              f"missing/unexpected keys; max |delta logit| vs Megatron {report['logit_max_abs']:.2e} <= "
              f"{report['tolerance']:.2g} (fp32, CPU)")
    return Outcome(detail, report)
