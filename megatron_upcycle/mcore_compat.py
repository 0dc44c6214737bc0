"""Where Megatron-Core versions differ, and every private Megatron internal this project touches.

Supported: megatron-core 0.16.1 on Python 3.11 (the tested default, what setup.py
installs there) and 0.17.x-0.19.x on Python >= 3.12 (released wheels need 3.12; their
source was checked for every name below, see docs/megatron-versions.md). The code
paths that differ between them are the functions of this module, chosen by feature
detection, never by version string:

- MoE aux-loss / metrics tracker. Up to 0.17 ``moe_utils.get_moe_layer_wise_logging_tracker()``
  returns the live global dict ``{name: {"values": tensor, ...}}``. From 0.18 the
  tracker is ``moe_logging.get_moe_metrics_tracker()`` (entries ``MetricEntry.values``)
  and the old function returns a fresh copy, so clearing it clears nothing:
  ``reset_moe_metrics``, ``zero_moe_metrics``, ``moe_metric_values``.
- Async checkpoint writer results queue (dist_checkpointing.strategies.filesystem_async).
  0.16 creates it in the private function ``_get_write_results_queue()``, 0.17+ in the
  public ``get_write_results_queue(mp_mode)``; both keep it in the module global
  ``_results_queue``, which writer_queue.py pre-seeds: ``async_writer_results_queue_module``.
- Per-layer ("non-homogeneous") sharded keys. ``TransformerBlock.sharded_state_dict``
  honours ``metadata={"non_homogeneous_layers": True}`` in 0.16-0.19 (unchanged);
  checkpoint/layer_layout.py checks the keys it gets, so a change upstream fails loudly:
  ``per_layer_sharded_state_dict_metadata``.

Same in 0.16-0.19 (checked, no code path needed): OptimizerParamScheduler's WSD
arguments and state dict (0.19 only adds tensor learning rates); dist_checkpointing
save/load/load_common_state_dict/load_plain_tensors and the torch_dist format
(0.19 drops strategies/base.py and adds an optional integrity manifest); the MoE
TransformerConfig fields and their defaults that function preservation depends on;
SequentialMLP's expert keys; the stacked/per-layer rule of TransformerBlock.

Private internals (underscore names) used, each checked by tests/test_compat_internals.py:

    megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue   writer_queue.py
    megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER                  cpu_compat.py
    megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER_INITIALIZED      cpu_compat.py
    megatron.core.datasets.indexed_dataset._IndexReader                           data/indexed.py
    torch.distributed.checkpoint.filesystem._write_item (torch's, not Megatron's) upcycle/writer.py

Public names that cpu_compat.py (the CPU accommodations, kept separate on purpose)
rebinds in the module where Megatron looks them up are listed in ``PATCH_POINTS``:
a rename there would silently stop a patch, so the same test checks them.
The WSD schedule (schedule.py) and the checkpoint code (checkpoint/, upcycle/) use
only public Megatron names apart from ``_results_queue`` (async writer) above.

``python -m megatron_upcycle.mcore_compat SITE_PACKAGES`` checks every name against an
unpacked megatron-core wheel without importing it (how the newer versions were checked).

Light on purpose: nothing is imported at module level (writer_queue's spawned
Manager imports this file).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


TESTED = "0.16.1"  # the CPU test suite runs against this one (Python 3.11)
# setup.py's megatron-core requirements, by environment marker (a test keeps them equal).
SUPPORTED = {
    "python_version<'3.12'": ">=0.16.1,<0.17",  # 0.16.1 is the newest release for Python 3.11
    "python_version>='3.12'": ">=0.16.1,<0.20",  # 0.17.x-0.19.x source-checked, see the docstring
}


@dataclass(frozen=True)
class Internal:
    module: str
    attribute: str  # dotted path inside the module ("Class.method")
    used_by: str
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"


PRIVATE_INTERNALS: tuple[Internal, ...] = (
    Internal("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue",
             "megatron_upcycle/writer_queue.py",
             "pre-seeded with a signal-proof Manager queue so a signal to the process group "
             "cannot kill the async writer's queue server"),
    Internal("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER",
             "megatron_upcycle/cpu_compat.py", "the RNG tracker replaced by a CPU one"),
    Internal("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
             "megatron_upcycle/cpu_compat.py", "reset together with the tracker"),
    Internal("megatron.core.datasets.indexed_dataset", "_IndexReader",
             "megatron_upcycle/data/indexed.py", "reads a .idx without mapping the .bin (truncation check)"),
)

TORCH_PRIVATE_INTERNALS: tuple[Internal, ...] = (
    Internal("torch.distributed.checkpoint.filesystem", "_write_item", "megatron_upcycle/upcycle/writer.py",
             "serialises one chunk exactly as FileSystemWriter does (Megatron's async writer uses it too)"),
)

# Public names rebound by cpu_compat.py; a move upstream would make a patch a silent no-op.
PATCH_POINTS: tuple[Internal, ...] = (
    Internal("megatron.core.tensor_parallel.random", "initialize_rng_tracker", "megatron_upcycle/cpu_compat.py",
             "replaced to install the CPU RNG tracker"),
    Internal("megatron.core.fusions.fused_softmax", "get_default_causal_mask", "megatron_upcycle/cpu_compat.py",
             "the unfused softmax's mask, allocated on CPU"),
    Internal("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32", "megatron_upcycle/cpu_compat.py",
             "grad norm without 'cuda' allocations"),
    Internal("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "megatron_upcycle/cpu_compat.py",
             "clipping without the cuda tensor-type assertion"),
    Internal("megatron.core.optimizer.optimizer", "get_grad_norm_fp32", "megatron_upcycle/cpu_compat.py",
             "the optimizer module's own binding of the same function"),
    Internal("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", "megatron_upcycle/cpu_compat.py",
             "the optimizer module's own binding of the same function"),
    Internal("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__", "megatron_upcycle/cpu_compat.py",
             "wrapped so its loss-scale tensor lands on CPU"),
)

# Public names whose behaviour this project relies on and that moved between versions.
VERSIONED_APIS: tuple[Internal, ...] = (
    Internal("megatron.core.transformer.transformer_block", "TransformerBlock.sharded_state_dict",
             "megatron_upcycle/checkpoint/layer_layout.py", "stacked vs per-layer keys (metadata flag)"),
    Internal("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler", "megatron_upcycle/schedule.py",
             "the WSD schedule (wsd_decay_steps, lr_wsd_decay_style)"),
    Internal("megatron.core.transformer.moe.router", "MoEAuxLossAutoScaler.set_loss_scale",
             "megatron_upcycle/train/loop.py", "aux-loss gradients averaged over micro-batches"),
    Internal("megatron.core.dist_checkpointing.strategies.torch", "TorchDistLoadShardedStrategy",
             "megatron_upcycle/upcycle/source.py", "reads one layer of a stacked tensor"),
    Internal("megatron.core.dist_checkpointing.core", "save_config", "megatron_upcycle/upcycle/writer.py",
             "metadata.json of a streamed checkpoint"),
)

ALL_CHECKED = PRIVATE_INTERNALS + TORCH_PRIVATE_INTERNALS + PATCH_POINTS + VERSIONED_APIS


def _resolve(internal: Internal):
    obj = importlib.import_module(internal.module)
    for part in internal.attribute.split("."):
        obj = getattr(obj, part)
    return obj


def missing_internals(internals: tuple[Internal, ...] = ALL_CHECKED) -> list[str]:
    """One line per internal that the installed packages no longer have (empty: all present)."""
    out = []
    for internal in internals:
        try:
            _resolve(internal)
        except (ImportError, AttributeError) as exc:
            out.append(f"{internal.name} (used by {internal.used_by}: {internal.why}) is gone: {exc}")
    return out


# ------------------------------------------------------------------ MoE metrics tracker
def _metrics_tracker():
    """(live dict of entries, values-of-entry function, zero function) for this version."""
    try:  # 0.18+
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe import moe_utils

        return moe_utils.get_moe_layer_wise_logging_tracker(), (lambda e: e["values"]), moe_utils.clear_aux_losses_tracker
    tracker = get_moe_metrics_tracker()
    return tracker.metrics, (lambda e: e.values), tracker.clear


def reset_moe_metrics() -> None:
    """Drop every tracked MoE metric: the tracker is process-global and sized by the first
    model that logs into it, so a deeper model built later would index past its end."""
    entries, _, _ = _metrics_tracker()
    entries.clear()


def zero_moe_metrics() -> None:
    """Zero the tracked values (entries kept), what Megatron does after each logging step."""
    _metrics_tracker()[2]()


def moe_metric_values(name: str):
    """The per-layer tensor of tracked metric ``name`` (e.g. "load_balancing_loss"), or None."""
    entries, values, _ = _metrics_tracker()
    return values(entries[name]) if name in entries else None


# ------------------------------------------------------------------ checkpointing
def async_writer_results_queue_module():
    """The module whose global ``_results_queue`` Megatron's async writer uses, or None."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return None
    return filesystem_async if hasattr(filesystem_async, "_results_queue") else None


def per_layer_sharded_state_dict_metadata() -> dict:
    """``sharded_state_dict(metadata=...)`` that makes TransformerBlock key layers per layer."""
    return {"non_homogeneous_layers": True}


# ------------------------------------------------------------------ checking a wheel's source
def _top_level_names(tree) -> dict:
    import ast

    names: dict = {}
    for node in ast.walk(tree):  # conditional imports and definitions count too
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.setdefault(t.id, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.setdefault(node.target.id, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.setdefault((alias.asname or alias.name).split(".")[0], node)
    return names


def check_source_tree(site_packages: str, internals: tuple[Internal, ...] = ALL_CHECKED) -> dict[str, bool]:
    """Whether each internal is defined in an unpacked package tree (parsed, not imported:
    a wheel for another Python can be checked). Names re-exported from another module count."""
    import ast
    from pathlib import Path

    result = {}
    for internal in internals:
        base = Path(site_packages, *internal.module.split("."))
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not source.is_file():
            result[internal.name] = False
            continue
        head, _, rest = internal.attribute.partition(".")
        node = _top_level_names(ast.parse(source.read_text()))
        found = head in node
        if found and rest and isinstance(node[head], ast.ClassDef):
            found = rest in _top_level_names(node[head])
        result[internal.name] = found
    return result


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_upcycle.mcore_compat SITE_PACKAGES_OF_AN_UNPACKED_WHEEL", file=sys.stderr)
        return 2
    checked = check_source_tree(args[0], PRIVATE_INTERNALS + PATCH_POINTS + VERSIONED_APIS)
    for name, ok in checked.items():
        print(f"{'ok     ' if ok else 'MISSING'} {name}")
    return 0 if all(checked.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
