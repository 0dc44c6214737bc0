"""Entry point of every training run (dense, moe, upcycle, branch, cpt).

    torchrun --nproc_per_node N -m megatron_upcycle.train --config RUN.yaml [--run-dir DIR] [a.b=value ...]

Exit codes (megatron_upcycle.exit_codes): 0 done (result.json written), 2 bad input,
3 non-finite loss, 73 the run directory is in use, 74 disk full or read-only,
75 saved on SIGTERM/SIGUSR1 and should be requeued. Re-running the same command
resumes from the run's latest checkpoint; a finished run exits 0 at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's directory)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of the run YAML")
    return parser.parse_args(argv)


def train(args) -> int:
    from megatron_upcycle.config.loading import apply_overrides, from_dict, read_yaml
    from megatron_upcycle.config.run import RunConfig
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.rundir import RunDir
    from megatron_upcycle.train.loop import requested_identity

    quiet_megatron()
    run_dir = RunDir(args.run_dir if args.run_dir else Path(args.config).resolve().parent)
    data = apply_overrides(read_yaml(args.config), args.overrides)
    cfg = from_dict(RunConfig, data, where=Path(args.config).name)
    # Before "already done": a config pointed at another run's finished directory is refused.
    run_dir.check_owner(requested_identity(cfg))
    if run_dir.is_done():
        print(f"[{run_dir.name}] already done ({run_dir.result.name} exists)")
        return 0
    from megatron_upcycle.train.loop import Trainer

    Trainer(cfg, run_dir.path).train()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_upcycle.exit_codes import run_entry
    from megatron_upcycle.parallel import destroy_distributed

    log_dir = Path(args.run_dir or Path(args.config).resolve().parent) / "logs"
    try:
        code = run_entry("train", lambda: train(args), log_dir=log_dir)
    finally:
        destroy_distributed()
    report_exit_status(code)
    return code


def report_exit_status(code: int) -> None:
    """Tell launch/train.sh the real exit code: torchrun reports every failure as 1.

    Every rank of a node ends the same way (requeue, non-finite loss and a busy run
    directory are agreed collectively), so local rank 0 speaks for the node."""
    import os

    path = os.environ.get("UPCYCLE_EXIT_STATUS_FILE")
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        from megatron_upcycle.atomic import write_text_atomic

        try:
            write_text_atomic(path, f"{code}\n")
        except OSError:
            pass  # the launcher then falls back to torchrun's code


if __name__ == "__main__":
    sys.exit(main())
