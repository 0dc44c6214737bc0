"""The two ways a torch_dist checkpoint keys decoder layers, and a model's sharded state dict for either.

Megatron-Core's ``TransformerBlock.sharded_state_dict`` writes a layer's tensors as

    stacked    decoder.layers.<key>       one tensor per key with a leading layer axis
                                          (global shape [num_layers, ...]); what a stock
                                          GPTModel writes and asks for when all layers are
                                          alike: dense models and ``moe_layer_freq=1``, the
                                          default of Megatron-LM's pretrain_gpt.py
    per-layer  decoder.layers.<i>.<key>   one tensor per layer ("non-homogeneous layers");
                                          forced by a ``moe_layer_freq`` list or an int > 1
                                          (mixed dense / MoE stacks), optional otherwise

This project writes the stock layout (models.py passes ``moe_layer_freq=1`` when every
layer is MoE, so stacked; mixed stacks per layer, the only layout that can express
them) and reads both: ``load_checkpoint`` asks the model for the keys of the layout the
checkpoint has. Checkpoints written before (all-MoE ones were per layer) keep loading
and resuming. The optimizer's sharded keys follow the model's, so they match too.
"""
from __future__ import annotations

import re
from pathlib import Path

from megatron_upcycle.errors import CheckpointError

STACKED = "stacked"
PER_LAYER = "per-layer"
_PER_LAYER_KEY = re.compile(r"(?:^|\.)decoder\.layers\.\d+\.")
_STACKED_KEY = re.compile(r"(?:^|\.)decoder\.layers\.(?!\d+\.)")


def layout_of_keys(keys) -> str | None:
    """PER_LAYER, STACKED, or None when no key belongs to a decoder layer."""
    stacked = False
    for key in keys:
        if _PER_LAYER_KEY.search(key):
            return PER_LAYER
        stacked = stacked or bool(_STACKED_KEY.search(key))
    return STACKED if stacked else None


def checkpoint_layout(checkpoint_dir: str | Path) -> str | None:
    """The layout of a torch_dist checkpoint's decoder layers, read from its .metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no .metadata file; the checkpoint is incomplete")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise CheckpointError(f"{path}/.metadata is unreadable ({type(exc).__name__}); "
                              "the checkpoint is truncated or corrupt") from None
    return layout_of_keys(metadata.state_dict_metadata)


def _sharded_keys(sharded_state_dict):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return (getattr(sh, "key", "") for sh in nested_values(sharded_state_dict))


def model_sharded_state_dict(model, layout: str | None = None, source: str | Path | None = None) -> dict:
    """``model.sharded_state_dict()`` keyed in ``layout`` (None: the model's own, the stock one).

    A model with mixed dense / MoE layers has only the per-layer layout; asking it for
    stacked keys (a stacked checkpoint at ``source``) is one clear error.
    """
    from megatron_upcycle import mcore_compat

    gpt = getattr(model, "module", model)
    if layout == PER_LAYER:
        state = gpt.sharded_state_dict(metadata=mcore_compat.per_layer_sharded_state_dict_metadata())
    else:
        state = gpt.sharded_state_dict()
    got = layout_of_keys(_sharded_keys(state))
    if layout is not None and got is not None and got != layout:
        where = f"{source} stores" if source is not None else "the checkpoint stores"
        if got == PER_LAYER:
            raise CheckpointError(
                f"{where} decoder layers stacked (decoder.layers.<key>), but this model mixes dense and MoE "
                "layers, which only per-layer keys (decoder.layers.<i>.<key>) can express: it is not a "
                "checkpoint of this model"
            )
        raise CheckpointError(  # upstream stopped honouring the per-layer flag: see mcore_compat
            f"{where} per-layer keys, but this Megatron-Core built stacked ones despite "
            f"{mcore_compat.per_layer_sharded_state_dict_metadata()}"
        )
    return state
