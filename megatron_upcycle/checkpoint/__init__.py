"""Checkpoints: torch_dist (megatron.core.dist_checkpointing) with a manifest.

Layout of one run's checkpoint root::

    checkpoints/manifest.json          iteration -> tokens, lr, phase, reason (atomic JSON)
    checkpoints/iter_0000120/          a finished torch_dist checkpoint
        upcycle_meta.json              model + MoE config, tokens, provenance (written before the rename)
        common.pt, __0_0.distcp, ...   Megatron's files
    checkpoints/.tmp-iter_0000120/     a checkpoint being written (never read)
"""
from megatron_upcycle.checkpoint.manifest import CheckpointRecord, Manifest
from megatron_upcycle.checkpoint.meta import CheckpointMeta, read_meta
from megatron_upcycle.rundir import checkpoint_name  # the one spelling of iter_*
from megatron_upcycle.checkpoint.store import (
    load_checkpoint,
    load_full_model_state,
    load_model,
    save_checkpoint,
)

__all__ = [
    "CheckpointMeta", "CheckpointRecord", "Manifest", "checkpoint_name", "load_checkpoint",
    "load_full_model_state", "load_model", "read_meta", "save_checkpoint",
]
