"""Process groups and seeding: torch.distributed + Megatron's parallel_state."""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_upcycle.backend import Backend, prepare
from megatron_upcycle.errors import ConfigError


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel is whatever remains of the world."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "expert_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_parallel != 1:
            raise ConfigError("parallel.pipeline_parallel > 1 is not supported (the paper used none)")


_store_file: str | None = None  # the rendezvous file of a lone process's group, removed with it


def init_distributed(backend: Backend, parallel: ParallelConfig, seed: int) -> None:
    """Initialise torch.distributed (torchrun env or a single local process),
    Megatron's model-parallel groups, and the model-parallel RNG tracker."""
    prepare(backend)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if backend.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun
            dist.init_process_group(backend.dist_backend, timeout=timeout)
        else:
            # A lone process: rendezvous through a private file, so neither a port
            # nor environment variables leak into child processes.
            global _store_file
            _store_file = tempfile.NamedTemporaryFile(prefix="upcycle-pg-", delete=False).name
            dist.init_process_group(backend.dist_backend, init_method=f"file://{_store_file}", rank=0,
                                    world_size=1, timeout=timeout)
    world = dist.get_world_size()
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by tensor x pipeline parallel = {model_parallel}"
        )
    if (world // parallel.pipeline_parallel) % parallel.expert_parallel:
        raise ConfigError(f"world size {world} is not divisible by expert_parallel={parallel.expert_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            expert_model_parallel_size=parallel.expert_parallel,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    global _store_file
    if _store_file is not None:  # a lone process's rendezvous file: leave nothing behind
        with contextlib.suppress(OSError):
            os.unlink(_store_file)
        _store_file = None


@contextlib.contextmanager
def single_process_groups(backend: Backend | None = None, seed: int = 0):
    """Megatron groups for one process (world size 1) for the body, torn down after.

    For offline work in a plain process: counting parameters on the meta device,
    conversion, export, inspection. When the caller already set groups up (a test,
    a training process) they are used as they are and left alone.
    """
    if dist.is_initialized():
        yield
        return
    from megatron_upcycle.backend import select_backend

    init_distributed(backend or select_backend(force_cpu=True), ParallelConfig(), seed)
    try:
        yield
    finally:
        destroy_distributed()


def any_rank(value: bool) -> bool:
    """True on every rank when ``value`` is true on any rank (a collective when world > 1)."""
    flag = torch.tensor([1 if value else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def all_ranks(value: bool) -> bool:
    """True on every rank when ``value`` is true on every rank (a collective when world > 1)."""
    return not any_rank(not value)
