"""``upcycle convert --dense CKPT --out DIR --experts E --topk K [options]``: dense -> MoE checkpoint."""
from __future__ import annotations

import json
import sys

from megatron_upcycle.upcycle.groups import hide_gpus_in_fresh_process


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="dense checkpoint -> MoE checkpoint (offline, CPU, streamed, verified)",
        description="Upcycle a dense torch_dist checkpoint into an MoE one and check it computes the "
        "dense function (docs/converter.md).",
    )
    p.add_argument("--dense", required=True, help="dense checkpoint directory (an iter_* directory)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--model", default=None,
                   help="model preset or YAML; required for Megatron-LM checkpoints without upcycle_meta.json")
    arch = p.add_argument_group("MoE architecture")
    arch.add_argument("--experts", type=int, required=True, help="number of routed experts E")
    arch.add_argument("--topk", type=int, default=None, help="experts per token k (default 2, or E if E < 2)")
    arch.add_argument("--granularity", type=int, default=1,
                      help="g: split each MLP copy into g experts of ffn/g neurons (E a multiple of g)")
    arch.add_argument("--moe-layers", default="all", help="'all', 'every_other' or indices such as 0,2,5")
    arch.add_argument("--shared-expert", action="store_true", help="keep the dense MLP as an always-on expert")
    arch.add_argument("--router-pre-softmax", action="store_true",
                      help="softmax-then-top-k routing (the default for --topk 1, which Megatron requires); "
                      "function preserving only with --router-std zero")
    arch.add_argument("--aux-loss-coeff", type=float, default=1e-3, help="load-balancing loss coefficient")
    init = p.add_argument_group("initialisation")
    init.add_argument("--init", choices=("copy", "noise", "drop"), default="copy",
                      help="copy: exact copies (default); noise: copies + Gaussian noise; drop: Drop-Upcycling")
    init.add_argument("--noise-scale", type=float, default=0.01, help="noise std relative to each matrix's std")
    init.add_argument("--drop-fraction", type=float, default=0.5,
                      help="Drop-Upcycling: fraction r of each expert's neurons re-initialised")
    init.add_argument("--router-std", default="paper",
                      help="'paper' (sqrt(2/(5 d_model))), 'zero', or a standard deviation")
    init.add_argument("--shared-expert-weight", type=float, default=0.5,
                      help="share alpha of the output taken by the shared expert (routed experts: 1 - alpha)")
    init.add_argument("--seed", type=int, default=1234, help="seed of every random draw")
    init.add_argument("--carry-moments", action="store_true",
                      help="copy the dense Adam moments into every expert (needs optimizer state)")
    check = p.add_argument_group("verification")
    check.add_argument("--no-verify", action="store_true", help="skip the dense-vs-MoE check after writing")
    check.add_argument("--require-exact", action="store_true",
                       help="fail unless max |delta logit| <= tolerance, even for inits that perturb")
    check.add_argument("--tolerance", type=float, default=1e-5, help="max |delta logit| allowed (fp32)")
    check.add_argument("--verify-batch-size", type=int, default=2)
    check.add_argument("--verify-seq-length", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def check_args(args) -> None:
    """The command-line values, before any checkpoint is read (the converter checks the rest)."""
    from megatron_upcycle.cli.args import check_at_least, check_output_dir

    check_output_dir(args.out, "--out")  # an existing --out is the converter's own check and message
    check_at_least("--verify-batch-size", args.verify_batch_size, 1)
    check_at_least("--verify-seq-length", args.verify_seq_length, 1)
    check_at_least("--tolerance", args.tolerance, 0)


def run(args) -> int:
    check_args(args)
    hide_gpus_in_fresh_process()
    from megatron_upcycle.cli.model import parse_moe_layers
    from megatron_upcycle.config import MoEConfig, load_model_config
    from megatron_upcycle.upcycle import UpcycleOptions, convert_dense_to_moe

    topk = args.topk if args.topk is not None else min(2, max(args.experts, 1))
    moe = MoEConfig(
        num_experts=args.experts,
        topk=topk,
        aux_loss_coeff=args.aux_loss_coeff,
        layers=parse_moe_layers(args.moe_layers),
        router_pre_softmax=True if args.router_pre_softmax else None,  # None: k = 1 needs it
        granularity=args.granularity,
        shared_expert=args.shared_expert,
    )
    options = UpcycleOptions(
        init=args.init,
        noise_scale=args.noise_scale,
        drop_fraction=args.drop_fraction,
        router_init=args.router_std,
        seed=args.seed,
        shared_expert_weight=args.shared_expert_weight,
        carry_moments=args.carry_moments,
    )
    model = load_model_config(args.model) if args.model else None
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    result = convert_dense_to_moe(
        args.dense, args.out, moe, options, model=model, verify=not args.no_verify,
        require_exact=True if args.require_exact else None, tolerance=args.tolerance,
        verify_batch_size=args.verify_batch_size, verify_seq_length=args.verify_seq_length,
        log=say,
    )
    gib = result.tensor_bytes / 2**30
    if args.json:
        print(json.dumps({
            "status": result.status, "out": str(result.out), "tensor_bytes": result.tensor_bytes,
            "write_seconds": result.write_seconds,
            "verification": result.report.to_dict() if result.report else None,
        }, indent=2))
    else:
        if result.report is not None:
            print(result.report.format())
        print(f"wrote {gib:.3f} GiB of tensors in {result.write_seconds:.1f} s")
    if result.status == "failed":
        print(f"upcycle: error: verification failed; the output is kept for inspection at {result.out} "
              "(not a finished checkpoint)", file=sys.stderr)
        return 1
    if not args.json:
        note = "" if result.status == "ok" else " (not verified: run `upcycle verify`)"
        print(f"converted: {result.out}{note}")
    return 0
