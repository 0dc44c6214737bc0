"""A conversion as a sweep run: ``python -m megatron_upcycle.sweep.convert_run --config RUN/config.yaml``.

Converts (and verifies) ``dense`` into ``RUN/moe_checkpoint``, then writes
``RUN/result.json`` last, like every run. Re-running after a crash reuses a
finished checkpoint; a failed verification exits 1 and leaves no result.
SIGTERM/SIGUSR1/SIGINT stop the conversion at its next safe point, remove the
partial output and exit 75 (run me again); errors map to exit codes through
megatron_upcycle.exit_codes (a user mistake: one line, exit 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_upcycle.rundir import RunDir

PROG = "convert"


def convert_run(config: str) -> int:
    from megatron_upcycle.checkpoint import read_meta
    from megatron_upcycle.config.loading import from_dict, read_yaml, to_dict
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.upcycle import convert_dense_to_moe
    from megatron_upcycle.upcycle.options import ConvertRunConfig

    quiet_megatron()
    run = RunDir(Path(config).resolve().parent)
    if run.is_done():
        print(f"[{run.name}] already done ({run.result.name} exists)")
        return 0
    cfg = from_dict(ConvertRunConfig, read_yaml(config), where="convert")
    moe, options = cfg.moe, cfg.options
    out = run.moe_checkpoint
    report = None
    if not out.exists():
        result = convert_dense_to_moe(cfg.dense, out, moe, options, log=lambda m: print(m, flush=True))
        if result.status == "failed":
            print(f"{PROG}: error: verification failed; output kept at {result.out}", file=sys.stderr)
            return 1
        report = result.report.summary() if result.report is not None else None
    meta = read_meta(out)
    run.write_result({
        "run_id": run.name,
        "kind": "convert",
        "model_kind": "upcycle",
        "phase": "convert",
        "checkpoint": str(out),
        "dense": cfg.dense,
        "D1": meta.provenance.get("source_tokens"),
        "moe": to_dict(moe),
        "options": to_dict(options),
        "verification": report,
    })
    print(f"[{run.name}] converted {cfg.dense} -> {out}")
    return 0


def main(argv=None) -> int:
    from megatron_upcycle.exit_codes import run_entry

    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.sweep.convert_run")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run_entry(PROG, lambda: convert_run(args.config), log_dir=RunDir(Path(args.config).resolve().parent).logs)


if __name__ == "__main__":
    sys.exit(main())
