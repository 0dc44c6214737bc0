"""The sweep as a DAG of runs.

A ``RunNode`` is one box of the data-flow picture (a dense stable run, a decay
branch, a conversion...): one command, one run directory. A run is done when
its ``result.json`` exists; the run writes it last and atomically, so its
presence is the only completion signal executors trust. ``RunDAG`` checks the
graph once (duplicate ids, unknown dependencies, cycles) and answers the
questions executors ask: in which order, what is ready, who depends on whom.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from megatron_upcycle.errors import ConfigError
from megatron_upcycle.run_kinds import RUN_KINDS
from megatron_upcycle.rundir import RunDir
# Run ids name directories, Slurm jobs and log files: keep them to safe characters.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class RunNode:
    run_id: str                 # unique, filesystem-safe
    kind: str                   # one of RUN_KINDS
    run_dir: Path               # result.json in it (written last, atomically) means done
    command: list[str]          # argv run once per node
    depends_on: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0      # 0: CPU-only
    cpus_per_task: int | None = None
    time_minutes: int = 60
    array_group: str | None = None  # siblings with the same group and dependencies form one job array

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.command = [str(arg) for arg in self.command]
        self.depends_on = list(self.depends_on)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def result_path(self) -> Path:
        return self.dir.result

    @property
    def log_dir(self) -> Path:
        return self.dir.logs


def is_done(node: RunNode) -> bool:
    return node.dir.is_done()


def _validate_node(node: RunNode) -> None:
    where = f"run '{node.run_id}'"
    if not _RUN_ID.match(node.run_id):
        raise ConfigError(f"{where}: run_id must be letters, digits and . _ + = - (got {node.run_id!r})")
    if node.kind not in RUN_KINDS:
        raise ConfigError(f"{where}: kind {node.kind!r} is not one of {', '.join(RUN_KINDS)}")
    if not node.command:
        raise ConfigError(f"{where}: empty command")
    if node.nodes < 1:
        raise ConfigError(f"{where}: nodes must be >= 1, got {node.nodes}")
    if node.gpus_per_node < 0:
        raise ConfigError(f"{where}: gpus_per_node must be >= 0, got {node.gpus_per_node}")
    if node.cpus_per_task is not None and node.cpus_per_task < 1:
        raise ConfigError(f"{where}: cpus_per_task must be >= 1, got {node.cpus_per_task}")
    if node.time_minutes < 1:
        raise ConfigError(f"{where}: time_minutes must be >= 1, got {node.time_minutes}")
    if node.run_id in node.depends_on:
        raise ConfigError(f"{where}: depends on itself")


class RunDAG:
    """Validated runs in a fixed order: the input order, refined topologically."""

    def __init__(self, nodes: Iterable[RunNode]):
        self.nodes: dict[str, RunNode] = {}
        for node in nodes:
            _validate_node(node)
            if node.run_id in self.nodes:
                raise ConfigError(f"duplicate run_id '{node.run_id}'")
            self.nodes[node.run_id] = node
        dirs: dict[Path, str] = {}
        for node in self.nodes.values():
            other = dirs.setdefault(node.run_dir.resolve(), node.run_id)
            if other != node.run_id:
                raise ConfigError(f"runs '{other}' and '{node.run_id}' share the run directory {node.run_dir}")
            for dep in node.depends_on:
                if dep not in self.nodes:
                    raise ConfigError(f"run '{node.run_id}' depends on unknown run '{dep}'")
        self._order = self._topological_order()
        self._dependents: dict[str, list[str]] = {run_id: [] for run_id in self.nodes}
        for node in self._order:
            for dep in node.depends_on:
                self._dependents[dep].append(node.run_id)

    def _topological_order(self) -> list[RunNode]:
        # Depth-first, visiting dependencies in input order: stable, and the
        # path on the stack names the cycle when there is one.
        order: list[RunNode] = []
        state: dict[str, str] = {}
        for root in self.nodes:
            if root in state:
                continue
            state[root] = "open"
            path, stack = [root], [iter(self.nodes[root].depends_on)]
            while stack:
                dep = next(stack[-1], None)
                if dep is None:
                    stack.pop()
                    done = path.pop()
                    state[done] = "closed"
                    order.append(self.nodes[done])
                elif state.get(dep) == "open":
                    cycle = path[path.index(dep):] + [dep]
                    raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}")
                elif dep not in state:
                    state[dep] = "open"
                    path.append(dep)
                    stack.append(iter(self.nodes[dep].depends_on))
        return order

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[RunNode]:
        return iter(self._order)

    def __getitem__(self, run_id: str) -> RunNode:
        return self.nodes[run_id]

    def __contains__(self, run_id: object) -> bool:
        return run_id in self.nodes

    def topological_order(self) -> list[RunNode]:
        """Every run after all its dependencies; ties keep the input order."""
        return list(self._order)

    def ready(self, node: RunNode | str, done: set[str]) -> bool:
        """Whether every dependency of ``node`` is in ``done``."""
        node = self.nodes[node] if isinstance(node, str) else node
        return all(dep in done for dep in node.depends_on)

    def dependents(self, run_id: str) -> list[str]:
        """Runs that depend on ``run_id``, directly or through others, in topological order."""
        seen: set[str] = set()
        todo = list(self._dependents[run_id])
        while todo:
            child = todo.pop()
            if child not in seen:
                seen.add(child)
                todo.extend(self._dependents[child])
        return [node.run_id for node in self._order if node.run_id in seen]

    def done_ids(self) -> set[str]:
        """Run ids whose result.json exists now."""
        return {node.run_id for node in self._order if is_done(node)}
