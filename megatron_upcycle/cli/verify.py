"""``upcycle verify --dense CKPT --moe CKPT``: does the MoE compute the dense function?"""
from __future__ import annotations

import json
import sys

from megatron_upcycle.upcycle.groups import hide_gpus_in_fresh_process


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="run one batch through a dense and an MoE checkpoint: per-layer and logit deltas, KL",
    )
    p.add_argument("--dense", required=True, help="dense checkpoint directory")
    p.add_argument("--moe", required=True, help="MoE checkpoint directory (e.g. from `upcycle convert`)")
    p.add_argument("--model", default=None, help="dense model preset or YAML (Megatron-LM checkpoints)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |delta logit| allowed (fp32)")
    exact = p.add_mutually_exclusive_group()
    exact.add_argument("--require-exact", dest="require_exact", action="store_const", const=True, default=None,
                       help="fail when max |delta logit| > tolerance (default: when the converter "
                            "recorded the conversion as function preserving)")
    exact.add_argument("--report-only", dest="require_exact", action="store_const", const=False,
                       help="only report the drift, never fail")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_upcycle.cli.args import check_at_least

    # Checked before either checkpoint is loaded.
    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--seq-length", args.seq_length, 1)
    check_at_least("--tolerance", args.tolerance, 0)
    hide_gpus_in_fresh_process()
    from megatron_upcycle.config import load_model_config
    from megatron_upcycle.verify import verify_checkpoints

    model = load_model_config(args.model) if args.model else None
    report = verify_checkpoints(
        args.dense, args.moe, model=model, batch_size=args.batch_size, seq_length=args.seq_length,
        seed=args.seed, tolerance=args.tolerance, require_exact=args.require_exact,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if not report.passed:
        print(f"upcycle: error: max |delta logit| {report.logit_max_abs:.3e} > tolerance {report.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0
