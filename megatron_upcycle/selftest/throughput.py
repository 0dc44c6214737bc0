"""Check group 5: training throughput and MFU of the paper's 0.1B dense and 8x0.1B MoE.

The engine's own Trainer (model, DDP, optimizer, data, the real ``train_step``) runs a
few warm-up steps, then timed steps; the device is synchronised around the timed ones.

  tokens/s = global batch x seq length x timed steps / seconds (all ranks together)
  MFU      = 6 N D / (seconds x peak x devices), N = active non-embedding parameters (the
             paper's C = 6 N D); ``mfu_full`` counts the output layer and attention as well.

GPU: Table 3's 0.1B (15 layers, d 640, 8 heads, vocab 32000, seq 1024) and its 8-expert
top-2 MoE, against the device's stated dense bf16 peak (PEAK_BF16: H100 SXM and H200
989 TFLOP/s; an unknown device gets no MFU, said so). CPU: there is no stated peak; MFU
is against this machine's measured fp32 matmul rate, and the model keeps the 0.1B layer
shape but 1 of its 15 layers (seq 1024; 256 with --quick) so that it fits 2 cores' minutes.

Standalone (the GPU script's longer MFU measurement)::

    python -m megatron_upcycle.selftest.throughput --out mfu.json [--warmup 3 --steps 10]
"""
from __future__ import annotations

import time

import torch

from megatron_upcycle.selftest import runs
from megatron_upcycle.selftest.report import Failed, Outcome

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s.
PEAK_BF16 = [
    ("H200", 989e12, "H200 (SXM/NVL) dense bf16, 989 TFLOP/s"),
    ("GH200", 989e12, "GH200 dense bf16, 989 TFLOP/s"),
    ("H100 PCIe", 756e12, "H100 PCIe dense bf16, 756 TFLOP/s"),
    ("H100 NVL", 835e12, "H100 NVL dense bf16, 835 TFLOP/s"),
    ("H100", 989e12, "H100 SXM dense bf16, 989 TFLOP/s"),
    ("A100", 312e12, "A100 dense bf16, 312 TFLOP/s"),
]
MOE = {"num_experts": 8, "topk": 2}
# (global batch, micro batch) in sequences of 1024 tokens per step.
GPU_BATCH = {"dense": (64, 8), "moe": (64, 4)}
CPU_BATCH = {"dense": (1, 1), "moe": (1, 1)}


def device_peak(ctx) -> tuple[float | None, str]:
    """(peak FLOP/s per device, what it is)."""
    if ctx.on_gpu:
        name = torch.cuda.get_device_name(0)
        for key, peak, label in PEAK_BF16:
            if key in name:
                return peak, label
        return None, f"no stated bf16 peak known for '{name}': MFU not reported"
    flops = measured_matmul_flops()
    return flops, f"CPU: no stated peak; this machine's measured fp32 matmul rate, {flops / 1e9:.1f} GFLOP/s"


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def model_spec(ctx) -> tuple[str, str]:
    """(model preset or YAML, what it is)."""
    if ctx.on_gpu:
        return "0.1B", "Table 3 0.1B, 15 layers, seq 1024"
    from megatron_upcycle.config.loading import to_dict
    from megatron_upcycle.config.presets import load_model_config

    spec = to_dict(load_model_config("0.1B"))
    seq = 256 if ctx.quick else 1024
    spec.update(name="0.1B-1layer", num_layers=1, seq_length=seq)
    return runs.write_model(ctx, "selftest-0.1B-1layer", spec), f"0.1B layer shape, 1 of 15 layers, seq {seq} (CPU)"


def measure(ctx, kind: str, warmup: int, steps: int) -> dict:
    """Time ``steps`` engine steps of the 0.1B (kind dense) or 8x0.1B (kind moe) after ``warmup``."""
    from megatron_upcycle.counts import training_flops_per_token

    model, what = model_spec(ctx)
    gbs, mbs = (GPU_BATCH if ctx.on_gpu else CPU_BATCH)[kind]
    gbs *= ctx.world
    iters = warmup + steps + 1
    seq = 1024 if ctx.on_gpu else (256 if ctx.quick else 1024)
    config = runs.run_config(
        ctx, kind=kind, model=model, global_batch_size=gbs, micro_batch_size=mbs,
        optim={"warmup_iters": 1}, schedule={"train_tokens": iters * gbs * seq, "log_interval_iters": 10**6},
        **({"moe": dict(MOE)} if kind == "moe" else {}))
    with runs.own_signal_handlers():  # no requeue machinery here: SIGTERM stops the measurement
        trainer, _ = runs.build_trainer(ctx, f"throughput-{kind}", config)
    try:
        sync = torch.cuda.synchronize if ctx.on_gpu else (lambda: None)
        losses = [trainer.train_step(i) for i in range(warmup)]
        sync()
        start = time.perf_counter()
        step_seconds = []
        for i in range(warmup, warmup + steps):
            t = time.perf_counter()
            losses.append(trainer.train_step(i))
            sync()
            step_seconds.append(time.perf_counter() - t)
        seconds = time.perf_counter() - start
        counts, model_cfg = trainer.counts, trainer.run.model
        memory = torch.cuda.max_memory_allocated() if ctx.on_gpu else None
    finally:
        trainer.close()
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        raise Failed(f"non-finite loss during the timed steps: {losses}")
    tokens = gbs * seq * steps
    n_active = counts["active_non_embedding"]
    flops_6nd = 6 * n_active * tokens
    flops_full = training_flops_per_token(model_cfg, n_active)["full"] * tokens
    peak, peak_label = device_peak(ctx)
    devices = ctx.world
    return {
        "model": what, "kind": kind, "experts": MOE["num_experts"] if kind == "moe" else None,
        "topk": MOE["topk"] if kind == "moe" else None, "N_active_non_embedding": n_active,
        "N_non_embedding": counts["non_embedding"], "global_batch_size": gbs, "micro_batch_size": mbs,
        "seq_length": seq, "warmup_steps": warmup, "timed_steps": steps, "tokens_timed": tokens,
        "seconds": seconds, "step_seconds": step_seconds, "tokens_per_second": tokens / seconds,
        "tokens_per_second_per_device": tokens / seconds / devices, "devices": devices,
        "peak_flops_per_device": peak, "peak": peak_label,
        "mfu": flops_6nd / (seconds * peak * devices) if peak else None,
        "mfu_full": flops_full / (seconds * peak * devices) if peak else None,
        "max_memory_allocated_bytes": memory, "backend": ctx.backend.describe(), "losses": losses,
    }


def steps_for(ctx) -> tuple[int, int]:
    if ctx.on_gpu:
        return (2, 3) if ctx.quick else (3, 5)
    return (1, 2)


def throughput_check(kind: str):
    def check(ctx) -> Outcome:
        warmup, steps = steps_for(ctx)
        data = measure(ctx, kind, warmup, steps)
        mfu = (f"MFU {100 * data['mfu']:.1f}% (6ND; {100 * data['mfu_full']:.1f}% with logits and attention) "
               f"at {data['peak']}") if data["mfu"] is not None else data["peak"]
        name = "0.1B dense" if kind == "dense" else "8x0.1B MoE top-2"
        detail = (f"{name} ({data['model']}), {data['global_batch_size']} x {data['seq_length']} tokens/step, "
                  f"{steps} timed steps after {warmup} warm-up: {data['tokens_per_second']:,.0f} tokens/s, {mfu}")
        return Outcome(detail, data)

    return check


def main(argv=None) -> int:
    """The longer MFU measurement: both models, more timed steps, one JSON file."""
    import argparse
    import tempfile
    from pathlib import Path

    from megatron_upcycle.atomic import write_json_atomic
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed
    from megatron_upcycle.selftest.context import SEED, Context, world_from_env
    from megatron_upcycle.selftest.environment import why_backend

    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.selftest.throughput")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    quiet_megatron()
    rank, world = world_from_env()
    backend = select_backend()
    work = Path(tempfile.mkdtemp(prefix="upcycle-mfu-"))
    ctx = Context(out=work, work=work, quick=False, backend=backend, why_backend=why_backend(backend, False),
                  rank=rank, world=world)
    init_distributed(backend, ParallelConfig(), SEED)
    try:
        results = {kind: measure(ctx, kind, args.warmup, args.steps) for kind in ("dense", "moe")}
    finally:
        destroy_distributed()
    if rank == 0:
        write_json_atomic(args.out, {"backend": backend.describe(), "backend_reason": ctx.why_backend, **results})
        for kind, data in results.items():
            mfu = f"{100 * data['mfu']:.1f}%" if data["mfu"] is not None else "n/a"
            print(f"mfu_{kind}: {mfu} ({data['tokens_per_second']:,.0f} tokens/s, {data['peak']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
