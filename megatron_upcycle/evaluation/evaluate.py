"""One evaluation: a model (HF directory or Megatron checkpoint) x tasks -> eval.json.

``evaluate_into(run_dir, ...)`` writes the harness's JSON and then eval.json, each
atomically, into an existing directory (a sweep's eval run); ``evaluate_to_new_dir``
(``upcycle eval --out``) fills a staging directory renamed into place at the end,
so an interrupted evaluation leaves no output directory at all.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.atomic import staged_directory, write_json_atomic
from megatron_upcycle.errors import UserError
from megatron_upcycle.rundir import RunDir


@dataclass
class EvalRequest:
    model: str
    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    task_dirs: tuple[str, ...] = ()    # more harness task directories (the shipped one is always included)
    backend: str = "auto"
    batch_size: int = 16
    device: str | None = None


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [t for t in names if t]
    if not names:
        raise UserError("--tasks names no task; give e.g. --tasks code_next_line,code_identifier,code_closure")
    return list(dict.fromkeys(names))


def check_request(request: EvalRequest) -> None:
    from megatron_upcycle.evaluation.model_source import check_source

    if request.limit is not None and request.limit < 1:
        raise UserError(f"--limit must be >= 1, got {request.limit}")
    if request.num_fewshot is not None and request.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {request.num_fewshot}")
    check_source(request.model)


def evaluate_into(out_dir: str | os.PathLike, request: EvalRequest, log=print) -> dict:
    """Run ``request``; write lm_eval_results.json, then eval.json (last) into ``out_dir``; return eval.json's body."""
    from megatron_upcycle.evaluation.offline import go_offline

    go_offline()  # before datasets / huggingface_hub are imported: they read the switches at import
    try:
        import lm_eval
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed: pip install -e '.[eval]' (lm-eval 0.4)") from None

    from megatron_upcycle.evaluation.aggregate import eval_summary
    from megatron_upcycle.evaluation.harness import load_tasks, run_harness
    from megatron_upcycle.evaluation.model_source import hf_model_dir
    from megatron_upcycle.evaluation.task_files import ensure_task_dir

    check_request(request)
    names = parse_tasks(request.tasks)
    task_dirs = [ensure_task_dir(), *(Path(d) for d in request.task_dirs)]
    manager, loaded = load_tasks(names, task_dirs)
    out = RunDir(out_dir)
    start = time.perf_counter()
    with hf_model_dir(request.model, work_dir=out.path, log=log) as hf_dir:
        log(f"evaluating {request.model} on {', '.join(names)}"
            + (f" (limit {request.limit} per task)" if request.limit else ""))
        results = run_harness(hf_dir, loaded, manager, request.num_fewshot, request.limit,
                              backend=request.backend, batch_size=request.batch_size, device=request.device)
    seconds = time.perf_counter() - start
    summary = {
        "model": str(request.model), "tasks": names, "num_fewshot": request.num_fewshot, "limit": request.limit,
        "backend": results["backend"], "lm_eval_version": lm_eval.__version__, "seconds": round(seconds, 3),
        **eval_summary(results),
    }
    write_json_atomic(out.harness_results, json.loads(json.dumps(results, default=str)))
    write_json_atomic(out.eval_result, summary)
    return summary


def evaluate_to_new_dir(out_dir: str | os.PathLike, request: EvalRequest, log=print) -> dict:
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    check_request(request)  # before creating anything
    with staged_directory(out) as staging:
        summary = evaluate_into(staging, request, log=log)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'task':<22} {'metric':<18} {'value':>8} {'stderr':>8} {'n':>6}"]
    for row in summary["rows"]:
        stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
        lines.append(f"{row['task']:<22} {row['metric']:<18} {row['value']:>8.4f} {stderr:>8} {row['n'] or '':>6}")
    if summary.get("core_left_out"):
        lines.append(f"(no chance level known, left out of the core average: {', '.join(summary['core_left_out'])})")
    return "\n".join(lines)
