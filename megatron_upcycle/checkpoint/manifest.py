"""The manifest: which checkpoints a run has, at which tokens, LR and phase."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.errors import CheckpointError

Reason = Literal["budget", "safety", "final", "signal"]


@dataclass(frozen=True)
class CheckpointRecord:
    name: str  # directory name under the checkpoint root
    iteration: int
    tokens: int  # tokens consumed by this run when the checkpoint was taken
    lr: float
    phase: str  # "warmup", "stable" or "decay"
    reason: Reason
    budget_tokens: int | None = None  # for reason="budget": the budget D this save point serves


class Manifest:
    FILE = "manifest.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / self.FILE
        self.records: list[CheckpointRecord] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.records = [CheckpointRecord(**r) for r in data["checkpoints"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.path}: unreadable manifest ({exc})") from None

    def save(self) -> None:
        write_json_atomic(self.path, {"checkpoints": [asdict(r) for r in self.records]})

    def add(self, record: CheckpointRecord) -> None:
        old = next((r for r in self.records if r.name == record.name), None)
        if old is not None and old.budget_tokens is not None and record.budget_tokens is None:
            # Re-saving a budget's iteration (after a resume) keeps it a budget checkpoint.
            record = replace(record, reason=old.reason, budget_tokens=old.budget_tokens)
        self.records = [r for r in self.records if r.name != record.name] + [record]
        self.records.sort(key=lambda r: r.iteration)
        self.save()

    def remove(self, name: str) -> None:
        self.records = [r for r in self.records if r.name != name]
        self.save()

    def existing(self) -> list[CheckpointRecord]:
        """Records whose directory is present (a crash can leave a record behind)."""
        return [r for r in self.records if (self.root / r.name).is_dir()]

    def latest(self) -> CheckpointRecord | None:
        existing = self.existing()
        return existing[-1] if existing else None

    def at_iteration(self, iteration: int) -> CheckpointRecord | None:
        for r in self.existing():
            if r.iteration == iteration:
                return r
        return None

    def for_budget(self, budget_tokens: int) -> CheckpointRecord | None:
        for r in self.existing():
            if r.budget_tokens == budget_tokens:
                return r
        return None
