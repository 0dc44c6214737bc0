"""What every check sees: the backend, the process groups, the work directory, the mode.

One process (``upcycle selftest``) or every rank of a torchrun/srun job (the
battery is then collective: training checks run data-parallel over all ranks,
rank 0 judges). The work directory holds the battery's run directories and
checkpoints; under a multi-node job it must be on a filesystem every node sees.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_upcycle.backend import Backend
from megatron_upcycle.errors import UserError
from megatron_upcycle.parallel import ParallelConfig
from megatron_upcycle.rundir import RunDir

WORK_MARKER = ".upcycle-selftest-work"
SEED = 1234


@dataclass
class Context:
    out: Path  # selftest.json and selftest.log
    work: Path  # run directories, checkpoints, exports (removed and re-made at start)
    quick: bool
    backend: Backend
    why_backend: str
    rank: int = 0
    world: int = 1
    layout: ParallelConfig = field(default_factory=ParallelConfig)
    shared: dict = field(default_factory=dict)  # what one check leaves for later ones

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.backend.device == "cuda"

    @property
    def lone(self) -> bool:
        """A single process (not under torchrun with more than one rank)."""
        return self.world == 1

    def run_dir(self, name: str) -> RunDir:
        return RunDir(self.work / "runs" / name)

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a collective when world > 1)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, result):
        """Rank 0's verdict on every rank (a collective when world > 1)."""
        return type(result)(**self.broadcast(asdict(result)))

    def use_layout(self, parallel: ParallelConfig) -> None:
        """Megatron's model-parallel groups for ``parallel`` (data parallel: the rest of the world)."""
        from megatron.core import parallel_state

        from megatron_upcycle.parallel import init_distributed

        if parallel_state.model_parallel_is_initialized() and parallel != self.layout:
            parallel_state.destroy_model_parallel()
        init_distributed(self.backend, parallel, SEED)
        self.layout = parallel


def prepare_work_dir(work: Path, is_main: bool) -> None:
    """An empty work directory; only one this command made before is ever deleted."""
    if is_main:
        if work.exists():
            if not (work / WORK_MARKER).is_file():
                raise UserError(f"{work} exists and is not a selftest work directory; choose another --out")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        (work / WORK_MARKER).write_text("made by `upcycle selftest`; deleted by its next run\n")


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's / srun's environment, (0, 1) in a lone process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
