"""Runs of the real engine, in this process: a run config written to a run directory,
resolved and trained by ``train.loop.Trainer`` exactly as ``python -m megatron_upcycle.train``
would (same RunConfig loading, same resolve_run, same run-directory files)."""
from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.rundir import RunDir

# A model small enough that 20 steps take seconds on 2 CPU cores (tests/models/engine-test.yaml).
TINY_MODEL = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 128,
    "vocab_size": 512, "seq_length": 64, "init_method_std": 0.02,
    "recipe": {"warmup_iters": 4, "global_batch_size": 8, "max_iters": 40, "lr_dense": 3.0e-3, "lr_moe": 2.0e-3},
}
# The test suite's embedded-corpus settings: the prepared corpus in the cache is shared with it.
DATA = {"embedded_vocab_size": 512}
MICRO_BATCH = 4
STEPS = 20


@dataclass
class RunOutcome:
    run_dir: RunDir
    result: dict
    records: list[dict]  # metrics.jsonl (rank 0; empty elsewhere)

    @property
    def losses(self) -> dict[int, float]:
        return {r["iteration"]: r["loss"] for r in self.records if "loss" in r}

    def field(self, name: str) -> dict[int, float]:
        return {r["iteration"]: r[name] for r in self.records if name in r}


def write_model(ctx, name: str, spec: dict) -> str:
    """A model YAML under the work directory (the selftest needs no checkout); returns its path."""
    from megatron_upcycle.config.loading import write_yaml_atomic

    path = ctx.work / "models" / f"{name}.yaml"
    if ctx.is_main:
        write_yaml_atomic(path, spec)
    ctx.barrier()
    return str(path)


def run_config(ctx, **config) -> dict:
    """A run config with the battery's defaults (logging every step, small evaluations)."""
    config.setdefault("data", dict(DATA))
    config.setdefault("tensorboard", False)
    schedule = {"log_interval_iters": 1, "eval_tokens": 2048}
    schedule.update(config.get("schedule", {}))
    config["schedule"] = schedule
    return config


def build_trainer(ctx, name: str, config: dict):
    """(Trainer, RunDir) for ``config`` written as ``<work>/runs/<name>/config.yaml``."""
    from megatron_upcycle.config.loading import from_dict, read_yaml, write_yaml_atomic
    from megatron_upcycle.config.run import RunConfig
    from megatron_upcycle.train.loop import Trainer

    run_dir = ctx.run_dir(name)
    if ctx.is_main:
        write_yaml_atomic(run_dir.config, config)
    ctx.barrier()
    cfg = from_dict(RunConfig, read_yaml(run_dir.config), where=str(run_dir.config))
    ctx.use_layout(cfg.parallel)
    return Trainer(cfg, run_dir.path), run_dir


@contextlib.contextmanager
def own_signal_handlers():
    """The engine turns SIGTERM/SIGUSR1 into "save and requeue" for its run (a Trainer.train
    then raises RequeueRequested); outside the body this process answers them as before."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train(ctx, name: str, config: dict) -> RunOutcome:
    """Train one run to its end (result.json written) and release it."""
    with own_signal_handlers():
        trainer, run_dir = build_trainer(ctx, name, config)
        try:
            result = trainer.train()
        finally:
            trainer.close()
    ctx.barrier()
    return RunOutcome(run_dir, result, read_metrics(run_dir) if ctx.is_main else [])


def read_metrics(run_dir: RunDir) -> list[dict]:
    path = Path(run_dir.metrics)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
