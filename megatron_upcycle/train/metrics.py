"""Run logging: metrics.jsonl (one line per logged step), TensorBoard, a progress line."""
from __future__ import annotations

import json
import math
import sys
import time

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.rundir import RunDir


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank-0 logger. ``truncate_after(it)`` drops lines past a resumed checkpoint,
    so metrics.jsonl always reads as one uninterrupted run."""

    def __init__(self, run_dir: RunDir, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir.metrics
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def truncate_after(self, iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def count_tokens(self, tokens: int) -> None:
        self._window_tokens += tokens

    def throughput(self) -> float:
        """Tokens/s since the last call; resets the window."""
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens = now, 0
        return rate

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def progress(self, record: dict, stop_iter: int, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        remaining = (stop_iter - record["iteration"]) * record["tokens_per_iter"] / max(tokens_per_second, 1e-9)
        parts = [
            f"iter {record['iteration']}/{stop_iter}",
            f"tokens {record['tokens']:,}",
            f"loss {record['loss_window_mean']:.4f}",
            f"lr {record['lr']:.2e}",
            f"{tokens_per_second:,.0f} tok/s",
            f"ETA {_format_duration(remaining)}",
        ]
        if "aux_loss" in record:
            parts.append(f"aux {record['aux_loss']:.4f}")
        if "expert_load_max" in record:
            parts.append(f"load max/min {record['expert_load_max']:.2f}/{record['expert_load_min']:.2f}")
            parts.append(f"router H {record['router_entropy']:.3f}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
