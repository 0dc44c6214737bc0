"""Check group 1: what this node has, and which path ``backend.py`` takes on it (and why)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from megatron_upcycle.selftest.report import Failed, Outcome

# Distribution name, import name.
OPTIONAL = {"transformer-engine": "transformer_engine", "flash-attn": "flash_attn", "apex": "apex"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def why_backend(backend, forced_cpu: bool) -> str:
    """One sentence: why ``select_backend`` chose what it chose here."""
    if backend.device == "cpu":
        if forced_cpu:
            return "CPU path forced (--cpu / MEGATRON_UPCYCLE_FORCE_CPU=1, GPUs hidden)"
        return "no CUDA device visible to torch"
    spec = ("TransformerEngine installed: TE layer spec, grouped GEMM, flash attention"
            if backend.use_transformer_engine else
            "TransformerEngine not installed: Megatron local spec, SequentialMLP experts, unfused attention (TE skipped)")
    return f"CUDA available ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}); {spec}"


def environment(ctx) -> Outcome:
    data = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nccl": _nccl_version(),
        "megatron_core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "world_size": ctx.world,
        "backend": ctx.backend.describe(),
        "backend_reason": ctx.why_backend,
    }
    for distribution, module in OPTIONAL.items():
        present = _present(module)
        # The PyPI project named apex is not NVIDIA's: count apex only with its CUDA-free core.
        if module == "apex":
            present = present and _present("apex.transformer")
        data[module] = (_version(distribution) or "present") if present else None
    if data["megatron_core"] is None:
        raise Failed("megatron-core is not installed (pip install megatron-core==0.16.1)")
    if ctx.on_gpu and data["nccl"] is None:
        raise Failed("CUDA is available but torch has no NCCL")
    have = ", ".join(f"{m} {'yes' if data[m] else 'no'}" for m in OPTIONAL.values())
    gpu = f"CUDA {data['cuda']}, NCCL {data['nccl']}, {data['gpus']} x {data['gpu_name']}" if ctx.on_gpu else "no GPU"
    detail = (f"torch {data['torch']}, {gpu}, megatron-core {data['megatron_core']}; {have}; "
              f"backend {data['backend']} ({ctx.why_backend}); world size {ctx.world}")
    return Outcome(detail, data)
