"""torchrun worker of the parallel checks: one TP=2 or EP=2 run of the engine over 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 -m megatron_upcycle.selftest.parallel_worker \\
        --work WORK --mode tp2-dense|ep2-moe --global-batch-size 8

The run directory (``WORK/runs/<mode>``) holds what the parent judges: metrics.jsonl
and result.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.selftest.parallel_worker")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--mode", required=True, choices=["tp2-dense", "ep2-moe"])
    parser.add_argument("--global-batch-size", required=True, type=int)
    args = parser.parse_args(argv)

    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed
    from megatron_upcycle.selftest import runs
    from megatron_upcycle.selftest.context import SEED, Context, world_from_env
    from megatron_upcycle.selftest.parallel import MODES

    quiet_megatron()
    rank, world = world_from_env()
    backend = select_backend()
    ctx = Context(out=args.work, work=args.work, quick=False, backend=backend, why_backend="", rank=rank,
                  world=world)
    ctx.shared["global_batch_size"] = args.global_batch_size
    init_distributed(backend, ParallelConfig(), SEED)
    try:
        runs.train(ctx, args.mode, MODES[args.mode](ctx))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
