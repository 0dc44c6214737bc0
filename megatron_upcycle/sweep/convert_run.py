"""A conversion as a sweep run: ``python -m megatron_upcycle.sweep.convert_run --config RUN/config.yaml``.

Converts (and verifies) ``dense`` into ``RUN/moe_checkpoint``, then writes
``RUN/result.json`` last, like every run. Re-running after a crash reuses a
finished checkpoint; a failed verification exits 1 and leaves no result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.sweep.convert_run")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    from megatron_upcycle.checkpoint import read_meta
    from megatron_upcycle.config.loading import from_dict, read_yaml, to_dict
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.exit_codes import EXIT_USER_ERROR
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.rundir import RunDir
    from megatron_upcycle.upcycle import convert_dense_to_moe
    from megatron_upcycle.upcycle.options import ConvertRunConfig

    quiet_megatron()
    run_dir = RunDir(Path(args.config).resolve().parent)
    if run_dir.is_done():
        print(f"[{run_dir.name}] already done ({run_dir.result.name} exists)")
        return 0
    try:
        cfg = from_dict(ConvertRunConfig, read_yaml(args.config), where="convert")
        moe, options = cfg.moe, cfg.options
        out = run_dir.moe_checkpoint
        report = None
        if not out.exists():
            result = convert_dense_to_moe(cfg.dense, out, moe, options, log=lambda m: print(m, flush=True))
            if result.status == "failed":
                print(f"convert: error: verification failed; output kept at {result.out}", file=sys.stderr)
                return 1
            report = result.report.summary() if result.report is not None else None
        meta = read_meta(out)
        run_dir.write_result({
            "run_id": run_dir.name,
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
        print(f"[{run_dir.name}] converted {cfg.dense} -> {out}")
        return 0
    except UserError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
