"""The fixed battery of ``upcycle selftest``, in order, with what each check needs first."""
from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from pathlib import Path

from megatron_upcycle.errors import UserError
from megatron_upcycle.selftest import conversion, environment, parallel, throughput, training
from megatron_upcycle.selftest.report import Battery

# (name, check, checks that must pass first)
CHECKS = [
    ("environment", environment.environment, ()),
    ("train-dense", training.train_dense, ()),
    ("train-moe", training.train_moe, ()),
    ("checkpoint-resume", training.checkpoint_resume, ("train-dense",)),
    ("decay-branch", training.decay_branch, ("train-dense",)),
    ("convert-8x-top2", conversion.convert, ("train-dense",)),
    ("verify-on-device", conversion.verify_device, ("convert-8x-top2",)),
    ("export-hf", conversion.export_hf, ("convert-8x-top2",)),
    ("parallel-tp2-dense", parallel.parallel_check("tp2-dense"), ("train-dense",)),
    ("parallel-ep2-moe", parallel.parallel_check("ep2-moe"), ("train-moe",)),
    ("throughput-dense-0.1B", throughput.throughput_check("dense"), ()),
    ("throughput-moe-8x0.1B", throughput.throughput_check("moe"), ()),
]


def _choose_device(device: str | None) -> bool:
    """Set the process up for --cpu / --gpu before torch looks for CUDA; returns forced_cpu."""
    if device == "cpu":
        # Hidden before torch initialises CUDA: the CPU path then runs as on a CPU machine.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["MEGATRON_UPCYCLE_FORCE_CPU"] = "1"
        return True
    import torch

    if device == "gpu" and not torch.cuda.is_available():
        raise UserError("--gpu: torch sees no CUDA device here (torch "
                        f"{torch.__version__}, CUDA build {torch.version.cuda}); use --cpu or a GPU node")
    return os.environ.get("MEGATRON_UPCYCLE_FORCE_CPU", "0") == "1"


def run_selftest(out: str | os.PathLike, quick: bool = False, device: str | None = None) -> int:
    """Run the battery; returns 0 when nothing failed, 1 otherwise."""
    forced_cpu = _choose_device(device)
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed
    from megatron_upcycle.selftest.context import SEED, Context, prepare_work_dir, world_from_env

    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    quiet_megatron()
    # torch DCP warns on every save and load that ShardedTensor (Megatron's format) is deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    rank, world = world_from_env()
    backend = select_backend()
    ctx = Context(out=out, work=out / "work", quick=quick, backend=backend,
                  why_backend=environment.why_backend(backend, forced_cpu), rank=rank, world=world)
    ctx.shared["global_batch_size"] = 8 * world  # 8 sequences per data-parallel group of ranks
    init_distributed(backend, ParallelConfig(), SEED)
    try:
        prepare_work_dir(ctx.work, ctx.is_main)
        ctx.barrier()
        battery = Battery(out, ctx.is_main, {
            "command": "upcycle selftest " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["selftest"] else None,
            "quick": quick, "device": backend.device, "backend": backend.describe(),
            "backend_reason": ctx.why_backend, "world_size": world, "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if ctx.is_main:
            print(f"upcycle selftest{' --quick' if quick else ''}: {backend.describe()}, world size {world}; "
                  f"results in {out}", flush=True)
        for name, check, needs in CHECKS:
            def guarded(c, check=check, needs=needs):
                battery.require(*needs)
                return check(c)

            battery.run(name, guarded, ctx, abort_on_error=world > 1)
    finally:
        destroy_distributed()
    if ctx.is_main:
        path = battery.write()
        print(battery.summary(), flush=True)
        print(f"results: {path}", flush=True)
    return 1 if battery.counts()["FAIL"] else 0
