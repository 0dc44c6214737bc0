"""An evaluation as a sweep run: ``python -m megatron_upcycle.evaluation.run --config RUN/config.yaml``.

Evaluates one final model (``checkpoint``, the planner's path of a decayed run's
last checkpoint) and writes ``RUN/eval.json`` last and atomically (with the
harness's JSON before it), then ``result.json`` (phase ``eval``) like every run.
Idempotent: once eval.json exists nothing is evaluated again; the run lock keeps
a second process out. Errors map to exit codes through megatron_upcycle.exit_codes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_upcycle.rundir import RunDir

PROG = "eval"


@dataclass
class EvalRunConfig:
    checkpoint: str                 # the evaluated model's checkpoint (or a Hugging Face directory)
    target: str                     # run id of the evaluated run (results.csv joins on it)
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    limit: int | None = None


def eval_run(config: str) -> int:
    from megatron_upcycle.config.loading import from_dict, read_yaml
    from megatron_upcycle.evaluation.evaluate import EvalRequest, evaluate_into, format_summary
    from megatron_upcycle.sweep.jsonfile import read_json

    run = RunDir(Path(config).resolve().parent)
    if run.is_done():
        print(f"[{run.name}] already done ({run.result.name} exists)")
        return 0
    cfg = from_dict(EvalRunConfig, read_yaml(config), where="eval")
    with run.lock():
        for stale in run.path.glob(".eval-export-*"):  # a temporary export of a killed attempt
            shutil.rmtree(stale, ignore_errors=True)
        summary = read_json(run.eval_result)
        if summary is None:
            request = EvalRequest(model=cfg.checkpoint, tasks=cfg.tasks, num_fewshot=cfg.num_fewshot,
                                  limit=cfg.limit)
            summary = evaluate_into(run.path, request, log=lambda m: print(f"[{run.name}] {m}", flush=True))
            print(format_summary(summary), flush=True)
        run.write_result({"run_id": run.name, "kind": "eval", "phase": "eval", "target": cfg.target,
                          "checkpoint": cfg.checkpoint, "eval": str(run.eval_result),
                          "core_average": summary.get("core_average"), "seconds": summary.get("seconds")})
    print(f"[{run.name}] evaluated {cfg.target}: core average {summary.get('core_average')}")
    return 0


def main(argv=None) -> int:
    from megatron_upcycle.exit_codes import run_entry

    parser = argparse.ArgumentParser(prog="python -m megatron_upcycle.evaluation.run")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run_entry(PROG, lambda: eval_run(args.config), log_dir=RunDir(Path(args.config).resolve().parent).logs)


if __name__ == "__main__":
    sys.exit(main())
