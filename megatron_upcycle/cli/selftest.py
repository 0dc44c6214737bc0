"""``upcycle selftest [--quick] [--gpu|--cpu] [--out DIR]``: the engine's battery on this node."""
from __future__ import annotations

DESCRIPTION = """\
Run a fixed battery on this node with the engine's real components: environment and
backend; tiny dense and MoE training (20 steps, the backend's precision); checkpoint
resume (identical next-step loss) and a decay branch; TP=2 dense and EP=2 MoE (2 GPUs,
or 2 gloo processes on CPU; skipped with the reason otherwise); dense -> 8 experts top-2
conversion verified on the device and exported to Hugging Face; 0.1B dense and 8x0.1B MoE
throughput and MFU. One line per check (PASS/FAIL/SKIP, seconds, detail), then
'selftest: N passed, M failed, K skipped'; exit 1 when any check failed. DIR/selftest.json
holds every result (rewritten atomically after each check), DIR/selftest.log the engine's
output and tracebacks, DIR/work the runs.

Several processes or nodes: start it under torchrun (or srun + torchrun), e.g.
  srun -N2 --ntasks-per-node=1 torchrun --nnodes 2 --nproc_per_node 8 \\
       --rdzv_backend c10d --rdzv_endpoint $MASTER:29500 -m megatron_upcycle.cli selftest --quick --out DIR
Every rank runs the battery (DIR on a filesystem all nodes see); rank 0 prints and writes.
"""


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "selftest", help="check that training, checkpoints, conversion and export work on this node",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a reduced battery (fewer timed steps; on CPU the throughput model at seq 256)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="device", action="store_const", const="gpu",
                        help="require the GPU path (fails at once without CUDA)")
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="the CPU path, GPUs hidden (gloo, fp32, local spec)")
    parser.add_argument("--out", default="selftest-out", help="results directory (default: %(default)s)")
    parser.set_defaults(run=run, device=None)


def run(args) -> int:
    from megatron_upcycle.cli.args import check_output_dir
    from megatron_upcycle.selftest.battery import run_selftest

    check_output_dir(args.out, "--out")
    return run_selftest(args.out, quick=args.quick, device=args.device)
