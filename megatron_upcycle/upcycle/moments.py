"""Carried Adam moments: the dense optimizer's first and second moments in every expert.

What ``convert --carry-moments`` writes, next to the weights, in the same layout as
the weights (so it reshards across TP/EP/DP like them):

    optimizer.state.exp_avg.<model sharded key>      Adam m, one chunk per weight chunk
    optimizer.state.exp_avg_sq.<model sharded key>   Adam v
    common.pt["carried_moments"]["step"]             the dense optimizer's step count

These are the keys Megatron's own optimizers use in "model space" (the
non-distributed optimizers, and the distributed optimizer's
fully_sharded_model_space format). Experts get their dense MLP's moments (the
segment for granular experts, zeros for Drop-Upcycling's re-initialised neurons),
routers get zeros. Moments are not rescaled with the weights.

The checkpoint holds no param groups or fp32 main weights, so it is not a full
optimizer checkpoint: load the model with ``load_checkpoint(dir, model)``, build a
fresh optimizer, then call ``load_carried_moments(dir, model, optimizer)``. The
step is carried too, so Adam's bias correction (1 - beta^t) does not inflate the
first updates as it would with t = 1.
"""
from __future__ import annotations

import os

import torch

from megatron_upcycle.errors import CheckpointError

MOMENT_FIELDS = ("exp_avg", "exp_avg_sq")


def _unwrap(model):
    return getattr(model, "module", model)


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if hasattr(optimizer, "chained_optimizers"):
        return [o for sub in optimizer.chained_optimizers for o in _torch_optimizers(sub)]
    inner = getattr(optimizer, "optimizer", None)
    return _torch_optimizers(inner) if inner is not None else []


def _set_step(optimizer, step: int) -> None:
    for opt in _torch_optimizers(optimizer):
        if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            # torch Adam keeps a per-parameter step tensor (Megatron restores its
            # "common_step" the same way); a state without one fails at the next step.
            for state in opt.state.values():
                if "exp_avg" not in state:
                    continue
                if torch.is_tensor(state.get("step")):
                    state["step"].fill_(step)
                else:
                    state["step"] = torch.tensor(float(step))
        else:
            for group in opt.param_groups:  # TE / Apex fused Adam keep the step per group
                group["step"] = step


def _moment_requests_megatron(model, optimizer, layout: str | None) -> dict:
    """The fresh optimizer's own sharded moments (data = its live state tensors)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_upcycle.checkpoint.layer_layout import model_sharded_state_dict

    model_sd = model_sharded_state_dict(_unwrap(model), layout)
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=True)
    requests = {}
    for sh in nested_values(opt_sd):
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and any(
            sh.key.startswith(f"optimizer.state.{f}.") for f in MOMENT_FIELDS
        ):
            requests[str(len(requests))] = sh
    return requests


def _moment_requests_torch(model, optimizer, layout: str | None) -> tuple[dict, dict]:
    """For a plain torch optimizer: model-shaped buffers keyed like Megatron's."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_upcycle.checkpoint.layer_layout import model_sharded_state_dict

    params = {id(p) for opt in _torch_optimizers(optimizer) for g in opt.param_groups for p in g["params"]}
    requests, targets = {}, {}
    for name, sh in model_sharded_state_dict(_unwrap(model), layout).items():
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or id(sh.data) not in params:
            continue
        for field in MOMENT_FIELDS:
            buffer = torch.zeros_like(sh.data, memory_format=torch.contiguous_format)
            key = str(len(requests))
            requests[key] = replace(sh, key=f"optimizer.state.{field}.{sh.key}", data=buffer)
            targets[key] = (sh.data, field, buffer)
    return requests, targets


def load_carried_moments(checkpoint_dir: str | os.PathLike, model, optimizer) -> int:
    """Fill a fresh optimizer's Adam moments from a converted checkpoint; returns the step set.

    Works with Megatron's optimizers (FP32, Float16 mixed precision, distributed in
    fully_sharded_model_space) and plain torch Adam/AdamW, at any TP/EP/DP layout.
    Collective under torchrun: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    from megatron_upcycle.checkpoint import read_meta
    from megatron_upcycle.checkpoint.layer_layout import checkpoint_layout

    read_meta(checkpoint_dir)  # a clear error for a directory that is not a checkpoint
    layout = checkpoint_layout(checkpoint_dir)  # stacked (this converter) or per layer (earlier ones)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    carried = common.get("carried_moments")
    if not carried:
        raise CheckpointError(f"{checkpoint_dir} carries no Adam moments (convert with --carry-moments)")
    step = int(carried["step"])
    if hasattr(optimizer, "sharded_state_dict"):
        requests = _moment_requests_megatron(model, optimizer, layout)
        targets = None
    else:
        for opt in _torch_optimizers(optimizer):
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state[p]
                    if "exp_avg" not in state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        requests, targets = _moment_requests_torch(model, optimizer, layout)
    if not requests:
        raise CheckpointError("the optimizer exposes no Adam moments to fill (not an Adam optimizer?)")
    datas = {k: sh.data for k, sh in requests.items()}
    loaded = dist_checkpointing.load(requests, str(checkpoint_dir))
    for key in requests:  # load() also returns common.pt's entries
        tensor = loaded[key]
        if targets is None:
            datas[key].copy_(tensor.view_as(datas[key]))
        else:
            param, field, _ = targets[key]
            for opt in _torch_optimizers(optimizer):
                if param in opt.state:
                    opt.state[param][field].copy_(tensor.view_as(param))
    _set_step(optimizer, step)
    return step
