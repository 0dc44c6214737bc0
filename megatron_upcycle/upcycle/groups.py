"""Single-process Megatron groups for offline tools (convert, verify, inspect).

Megatron builds no module without ``parallel_state``; offline tools run in one
CPU process. When the caller (a test, a training process at world size 1) already
set groups up they are reused and left alone.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

from megatron_upcycle.errors import UserError


def hide_gpus_in_fresh_process() -> None:
    """The converter and the checker run on CPU (fp32, Megatron's local spec): in a
    fresh ``upcycle`` process hide the GPUs before torch sees them. A process that
    already imported torch (a test, a training job) is left as it is."""
    if "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@contextlib.contextmanager
def single_process_groups(seed: int = 0):
    import torch.distributed as dist

    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import single_process_groups as lone_groups

    quiet_megatron()
    # torch DCP warns on every load that ShardedTensor (used by Megatron's format) is deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    if dist.is_initialized():
        from megatron.core import parallel_state

        if dist.get_world_size() != 1 or parallel_state.get_tensor_model_parallel_world_size() != 1 \
                or parallel_state.get_expert_model_parallel_world_size() != 1:
            raise UserError("the converter runs in one process: call it outside torchrun (world size 1)")
        yield
        return
    import torch

    if torch.cuda.is_available():
        raise UserError("the converter runs on CPU: run it with CUDA_VISIBLE_DEVICES= "
                        "(the `upcycle` command does this itself)")
    with lone_groups(seed=seed):
        yield
