"""``upcycle eval MODEL --tasks T1,T2 --out DIR`` and ``upcycle eval prepare-tasks [--out DIR]``."""
from __future__ import annotations

PREPARE = "prepare-tasks"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="downstream evaluation with lm-evaluation-harness, offline (or: eval prepare-tasks)",
        description="Evaluate MODEL (a Hugging Face directory, or a Megatron checkpoint exported to a temporary "
        "one) with EleutherAI lm-evaluation-harness; nothing is downloaded. Writes DIR/eval.json (task, metric, "
        "value, stderr, n and the core average) and DIR/lm_eval_results.json. Shipped tasks: code_next_line, "
        "code_identifier, code_closure (from the embedded corpus's validation files). "
        f"`upcycle eval {PREPARE} [--out DIR]` writes the shipped tasks as harness YAMLs + JSONL.",
    )
    parser.add_argument("model", metavar="MODEL", help=f"checkpoint (iter_* directory) or HF directory; or {PREPARE}")
    parser.add_argument("--tasks", default=None, help="comma-separated harness task names")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task")
    parser.add_argument("--out", default=None, help="output directory; must not exist")
    parser.add_argument("--task-dir", action="append", default=[], help="another directory of harness task YAMLs")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                        help="auto: vllm on a GPU when installed, else hf")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="hf backend device (default: cuda when present, else cpu)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megatron_upcycle.cli.args import check_at_least, check_output_dir
    from megatron_upcycle.errors import UserError

    if args.model == PREPARE:
        from megatron_upcycle.evaluation.task_files import default_task_dir, prepare_tasks

        out = check_output_dir(args.out, "--out", must_not_exist=True) if args.out else default_task_dir()
        prepare_tasks(out)
        print(f"wrote the shipped tasks to {out} (use with --task-dir {out}, or lm_eval --include_path {out})")
        return 0
    from megatron_upcycle.evaluation.evaluate import EvalRequest, evaluate_to_new_dir, format_summary, parse_tasks

    if args.tasks is None:
        raise UserError("--tasks is required, e.g. --tasks code_next_line,code_identifier,code_closure")
    if args.out is None:
        raise UserError("--out DIR is required (a new directory for eval.json)")
    check_output_dir(args.out, "--out", must_not_exist=True)
    check_at_least("--batch-size", args.batch_size, 1)
    request = EvalRequest(model=args.model, tasks=parse_tasks(args.tasks), num_fewshot=args.num_fewshot,
                          limit=args.limit, task_dirs=tuple(args.task_dir), backend=args.backend,
                          batch_size=args.batch_size, device=args.device)
    summary = evaluate_to_new_dir(args.out, request, log=lambda m: print(m, flush=True))
    print(format_summary(summary))
    print(f"wrote {args.out}/eval.json ({summary['seconds']:.1f} s)")
    return 0
