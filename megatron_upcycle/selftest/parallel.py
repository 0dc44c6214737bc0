"""Check group 3: model parallelism with the engine, TP=2 dense and EP=2 MoE.

Where they run:
  - under torchrun/srun with 2+ ranks: in this job, collectively (data parallel = the rest);
  - one process on a node with 2+ GPUs: a 2-process torchrun job on two GPUs (NCCL, the
    backend's alltoall dispatcher);
  - one process on the CPU path: a 2-process torchrun job over gloo (allgather dispatcher),
    as the test suite does; MoE with TP > 1 needs sequence parallelism and TE/Apex norms,
    so on CPU MoE parallelism is EP, dense is TP;
  - one process on a 1-GPU node: skipped, with the reason.
On CPU the TP=2 dense run is also compared with the single-process run of check group 2:
its weights are initialised on the CPU as full master matrices and then split, so at step 1
(before any update) the loss must agree to fp32 rounding. (EP=2 draws each rank's experts
from its own generator: other weights, no such comparison.)
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from megatron_upcycle.selftest import runs, training
from megatron_upcycle.selftest.context import cuda_devices
from megatron_upcycle.selftest.report import Failed, Outcome, Skip

MODES = {
    "tp2-dense": lambda ctx: training.dense_config(ctx, parallel={"tensor_parallel": 2}),
    "ep2-moe": lambda ctx: training.moe_config(ctx, parallel={"expert_parallel": 2}),
}
REFERENCE = {"tp2-dense": "dense"}
# fp32: the same sums in another order (split matrices, all-reduce, all-gather of tokens).
STEP1_RTOL = 1e-5
WORKER_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:  # torchrun with --master_port 0 hangs: pick a free one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(ctx, mode: str) -> None:
    """Run ``mode`` as a 2-process torchrun job of parallel_worker on this node."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    if not ctx.on_gpu:
        env.update(CUDA_VISIBLE_DEVICES="", MEGATRON_UPCYCLE_FORCE_CPU="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "megatron_upcycle.selftest.parallel_worker", "--work", str(ctx.work), "--mode", mode,
           "--global-batch-size", str(ctx.shared["global_batch_size"])]
    log = ctx.out / f"selftest-{mode}.log"
    with log.open("w") as handle:
        try:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                  timeout=WORKER_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise Failed(f"the 2-process job did not finish in {WORKER_TIMEOUT_S} s (log: {log})") from None
    if proc.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise Failed(f"the 2-process job exited {proc.returncode}: {tail[0][:200] if tail else ''} (log: {log})")


def where(ctx) -> str:
    """'in-process' / 'spawn' / raises Skip."""
    if ctx.world >= 2:
        if ctx.world % 2:
            raise Skip(f"world size {ctx.world} is odd: TP=2 and EP=2 need an even one")
        return "in-process"
    if ctx.on_gpu and cuda_devices() < 2:
        raise Skip(f"{cuda_devices()} GPU visible: TP=2 and EP=2 need 2 (run on a node with 2+ GPUs, "
                   "or under torchrun --nproc_per_node 2)")
    return "spawn"


def parallel_check(mode: str):
    def check(ctx) -> Outcome:
        how = where(ctx)
        if how == "in-process":
            outcome = runs.train(ctx, mode, MODES[mode](ctx))
        else:
            _spawn(ctx, mode)
            run_dir = ctx.run_dir(mode)
            outcome = runs.RunOutcome(run_dir, run_dir.read_result() or {}, runs.read_metrics(run_dir))
        if not ctx.is_main:
            return Outcome("")
        data = training.judge_learning(outcome, runs.STEPS)
        processes = ctx.world if how == "in-process" else 2
        detail = (f"{processes} processes over {'NCCL' if ctx.on_gpu else 'gloo'}"
                  f"{', dispatcher ' + ctx.backend.moe_token_dispatcher if 'moe' in mode else ''}, "
                  f"{runs.STEPS} steps, loss {data['loss_first']:.4f} -> {data['loss_last']:.4f}")
        reference = ctx.shared.get(REFERENCE.get(mode, ""))
        if not ctx.on_gpu and how == "spawn" and reference is not None:
            want, got = reference.losses[1], outcome.losses[1]
            if not math.isclose(got, want, rel_tol=STEP1_RTOL):
                raise Failed(f"step-1 loss {got!r} differs from the 1-process run's {want!r} by more than "
                             f"{STEP1_RTOL:g} relative (same weights, same batch)")
            data["step1_loss_vs_single_process"] = got - want
            detail += f"; step-1 loss = 1-process run's to {abs(got - want):.2g}"
        return Outcome(detail, data)

    return check
