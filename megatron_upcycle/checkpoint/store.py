"""Saving and loading torch_dist checkpoints with dist_checkpointing.

One sharded state dict holds the model, the optimizer (Megatron's own sharded
optimizer state, so checkpoints reshard across TP/EP/DP layouts), per-rank RNG
states and common scalars (scheduler, iteration, tokens, data position). It is
written to ``.tmp-<name>`` and renamed by rank 0 after every rank finished.
Decoder layers are written in the model's own (stock) key layout and read in
whichever layout the checkpoint has (stacked or per layer; see layer_layout.py).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_upcycle.checkpoint.manifest import CheckpointRecord, Manifest
from megatron_upcycle.checkpoint.meta import CheckpointMeta, read_meta
from megatron_upcycle.errors import CheckpointError
from megatron_upcycle.exit_codes import DiskError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # One object per rank: every rank's generators advance differently.
    return ShardedObject("rng_state", data, (_world(),), (_rank(),), replica_id=0)


def _sharded_state_dict(model, optimizer, with_rng: bool, is_loading: bool, layout: str | None = None,
                        source: Path | None = None) -> dict:
    from megatron_upcycle.checkpoint.layer_layout import model_sharded_state_dict

    # Keys of the bare GPTModel (no DDP "module." prefix), so checkpoints are
    # portable between training, conversion and export.
    model_sd = model_sharded_state_dict(_unwrap(model), layout, source)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if with_rng:
        state["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return state


def save_checkpoint(
    root: str | Path,
    record: CheckpointRecord,
    model,
    optimizer,
    scheduler,
    common: dict,
    meta: CheckpointMeta,
    layout: str | None = None,
) -> Path:
    """Write one checkpoint under ``root`` and add it to the manifest. Collective.

    ``layout`` None writes the model's own key layout (what a stock GPTModel of the
    same config loads); ``layer_layout.PER_LAYER`` writes per-layer keys, the layout
    this project used for all-MoE models before (kept for compatibility tests).
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / record.name
    tmp = root / f".tmp-{record.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    from megatron_upcycle import writer_queue

    writer_queue.install()  # before Megatron starts its own, group-signal-fragile one
    state = _sharded_state_dict(model, optimizer, with_rng=True, is_loading=False, layout=layout)
    state["common"] = dict(common, world_size=_world(), has_rng=True)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    try:
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if _rank() == 0:
            meta.has_optimizer = optimizer is not None
            meta.write(tmp)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        problem = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else disk_problem(root)
        if problem is None:
            raise
        # The half-written copy goes; the previous checkpoints were never touched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(f"cannot write checkpoint {final}: {problem}; the previous checkpoints are intact") from exc
    if _rank() == 0:
        if final.exists():  # re-saving the same iteration after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        Manifest(root).add(record)
    _barrier()
    return final


def disk_problem(path: Path, min_free_bytes: int = 64 << 20) -> str | None:
    """'read-only file system' / 'no space left on device' when that is why a write to
    ``path`` failed (libraries often report it as an unrelated error), else None."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY or not os.access(path, os.W_OK):
        return "read-only file system" if stat.f_flag & os.ST_RDONLY else "permission denied"
    free = stat.f_bavail * stat.f_frsize
    if free < min_free_bytes:
        return f"no space left on device ({free / 2**20:.1f} MiB free)"
    return None


def load_checkpoint(
    checkpoint_dir: str | Path,
    model,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
) -> dict:
    """Load model (and optimizer, scheduler, RNG when given) in place; returns the common dict.

    Works across parallel layouts (torch_dist reshards) and both key layouts of decoder
    layers (stacked, per layer); RNG states are restored only when the world size
    matches the one that saved them.
    """
    from megatron.core import dist_checkpointing

    from megatron_upcycle.checkpoint.layer_layout import checkpoint_layout

    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    if optimizer is not None and not meta.has_optimizer:
        raise CheckpointError(f"{checkpoint_dir} holds no optimizer state (a converted or model-only checkpoint)")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    saved = common.get("common", {})
    with_rng = load_rng and saved.get("has_rng", False) and saved.get("world_size") == _world()
    layout = checkpoint_layout(checkpoint_dir)
    state = _sharded_state_dict(model, optimizer, with_rng=with_rng, is_loading=True, layout=layout,
                                source=checkpoint_dir)
    loaded = dist_checkpointing.load(state, str(checkpoint_dir))
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return dict(common.get("common", {}))


def _unwrap(model):
    return getattr(model, "module", model)


def load_model(checkpoint_dir: str | Path):
    """(GPTModel on CPU at TP=EP=1, CheckpointMeta): the checkpoint's own model, loaded.

    Needs initialised process groups (world size 1); torch_dist reshards whatever
    layout saved the checkpoint.
    """
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.models import build_gpt_model

    meta = read_meta(checkpoint_dir)
    model = build_gpt_model(meta.model, meta.moe, select_backend(force_cpu=True))
    load_checkpoint(checkpoint_dir, model, load_rng=False)
    return model, meta


def load_full_model_state(checkpoint_dir: str | Path):
    """(ModelConfig, MoEConfig | None, full state dict, meta dict) of a checkpoint, on CPU,
    in single-process groups (the caller's, or ones set up and torn down here)."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import single_process_groups

    quiet_megatron()
    # load_model builds a CPU model whatever the machine: its groups are CPU (gloo) ones.
    with single_process_groups(select_backend(force_cpu=True)):
        model, meta = load_model(checkpoint_dir)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return meta.model, meta.moe, state, meta.to_json()
