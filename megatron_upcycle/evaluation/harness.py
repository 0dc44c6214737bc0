"""lm-evaluation-harness through its Python API, offline.

Task names are checked against a TaskManager that indexes the shipped task
directory (and the harness's own tasks only when a standard name is asked for:
indexing its ~15k task files takes seconds). Tasks are loaded, data included,
before any model is, so an unknown task or one whose data is not available
offline costs one line and no export.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from megatron_upcycle.errors import UserError
from megatron_upcycle.evaluation.offline import go_offline

BACKENDS = ("auto", "hf", "vllm")


def _quiet_harness() -> None:
    import logging

    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_tasks(names: list[str], task_dirs: list[Path]):
    """(TaskManager, the harness's loaded tasks dict) for ``names``; UserErrors for what cannot run offline."""
    from megatron_upcycle.evaluation.task_files import check_task_dir

    go_offline()
    _quiet_harness()
    local: set[str] = set()
    for task_dir in task_dirs:
        local |= set(check_task_dir(task_dir))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(d) for d in task_dirs],
                          include_defaults=any(name not in local for name in names))
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            # the shipped names first: matching against the harness's ~15k names takes seconds
            close = difflib.get_close_matches(name, sorted(local), n=3) or difflib.get_close_matches(
                name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped tasks: {', '.join(sorted(local))}"
            raise UserError(f"unknown task '{name}'{hint}")
    loaded = {"tasks": {}, "groups": {}}
    for name in names:
        try:
            one = manager.load([name])
        except Exception as exc:  # datasets raises many kinds; all mean "cannot read this task's data here"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            if name in local:
                raise UserError(f"task '{name}': cannot load its data ({type(exc).__name__}: {first})") from None
            raise UserError(f"task '{name}': its data is not available offline (nothing is downloaded; cache "
                            f"it with `datasets` on a machine with network first): {type(exc).__name__}: "
                            f"{first}") from None
        for key in ("tasks", "groups"):
            loaded[key].update(one.get(key, {}))
    return manager, loaded


def pick_backend(backend: str) -> str:
    if backend != "auto":
        if backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                raise UserError("--backend vllm: vllm is not installed (pip install vllm)") from None
        return backend
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def model_args(backend: str, hf_dir: Path, device: str | None) -> dict:
    import torch

    if backend == "vllm":
        return {"pretrained": str(hf_dir), "dtype": "auto", "gpu_memory_utilization": 0.8}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 on CPU (the exported dtype); the export's own dtype on a GPU.
    return {"pretrained": str(hf_dir), "device": device, "dtype": "auto" if device.startswith("cuda") else "float32"}


def run_harness(hf_dir: Path, loaded: dict, manager, num_fewshot: int | None, limit: int | None,
                backend: str = "auto", batch_size: int | str = 16, device: str | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on ``hf_dir`` for tasks already loaded; its results dict (no samples)."""
    go_offline()
    _quiet_harness()
    import lm_eval

    backend = pick_backend(backend)
    results = lm_eval.simple_evaluate(
        model=backend, model_args=model_args(backend, hf_dir, device), tasks=list(loaded["tasks"].values()),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, task_manager=manager,
        log_samples=False, bootstrap_iters=1000, verbosity="ERROR",
    )
    results.pop("samples", None)
    results["backend"] = backend
    return results
