"""The training loop: dense, MoE, upcycle, branch and CPT runs share it.

Everything is built by named components (model + optimizer, scheduler, data,
checkpoints, metrics); the loop itself is ``Trainer.train``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_upcycle.backend import select_backend
from megatron_upcycle.checkpoint import (
    CheckpointMeta,
    CheckpointRecord,
    Manifest,
    checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)
from megatron_upcycle.config.loading import to_dict, write_yaml_atomic
from megatron_upcycle.config.run import RunConfig
from megatron_upcycle.errors import UserError
from megatron_upcycle.exit_codes import NonFiniteLoss, RunBusy
from megatron_upcycle.parallel import all_ranks, any_rank, init_distributed
from megatron_upcycle.rundir import RunDir
from megatron_upcycle.schedule import megatron_scheduler, phase_of
from megatron_upcycle.train.components import (
    build_model_and_optimizer,
    dense_equivalent_params,
    global_param_counts,
    stack_samples,
    to_device,
)
from megatron_upcycle.train.metrics import MetricsLogger
from megatron_upcycle.train.run_setup import load_run
from megatron_upcycle.train.signals import RequeueSignal


def requested_identity(cfg: RunConfig) -> dict:
    """What makes a run directory this run's, from the config alone (see RunDir.check_owner)."""
    return {"kind": cfg.kind, "parent": cfg.parent, "init_from": cfg.init_from, "model": cfg.model}


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        self.run_dir = RunDir(run_dir)
        self.run, self.parent_checkpoint = load_run(cfg)
        run = self.run
        self.cfg = run.cfg
        identity = {**requested_identity(cfg), "architecture": to_dict(run.model),
                    "moe": to_dict(run.moe) if run.moe else None}
        self.run_dir.check_owner(identity)
        self.backend = select_backend()
        init_distributed(self.backend, self.cfg.parallel, self.cfg.seed)
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self._hold_lock()
        if self.is_main:
            self.run_dir.claim(identity)
        self.requeue = RequeueSignal()

        from megatron.core import parallel_state

        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        if run.global_batch_size % (self.cfg.micro_batch_size * self.dp_size):
            raise UserError(
                f"global_batch_size={run.global_batch_size} is not divisible by micro_batch_size="
                f"{self.cfg.micro_batch_size} x data-parallel size {self.dp_size}"
            )
        self.num_microbatches = run.global_batch_size // (self.cfg.micro_batch_size * self.dp_size)

        # Components.
        self.model, self.ddp, self.optimizer = build_model_and_optimizer(
            run.model, run.moe, self.backend, self.cfg.parallel, self.cfg.optim, run.peak_lr
        )
        self.scheduler = megatron_scheduler(
            self.optimizer, run.peak_lr, run.warmup_iters, run.plan, self.cfg.optim.min_lr_ratio,
            self.cfg.optim.weight_decay,
        )
        self.counts = global_param_counts(
            self.model, run.moe.topk if run.moe else None, run.moe.num_experts if run.moe else None
        )
        self.router_stats = None
        if run.moe is not None:
            from megatron_upcycle.train.moe_stats import RouterStats

            self.router_stats = RouterStats(self.model, run.moe.num_experts, run.moe.topk)
        self.ckpt_root = self.run_dir.checkpoints
        self.metrics = MetricsLogger(self.run_dir, self.is_main, self.cfg.tensorboard)

        # Position: restored from a checkpoint below.
        self.iteration = 0
        self.data_offset_samples = 0
        self._restore()
        self._build_data()
        if self.is_main:
            write_yaml_atomic(self.run_dir.resolved_config, to_dict(self.cfg))

    def close(self) -> None:
        """Release the run directory's lock and the metrics writer. A process that runs
        several Trainers one after another (``upcycle selftest``) calls it after each;
        a training process exits instead, which releases both."""
        self.metrics.close()
        self._lock.close()

    # -- set-up ---------------------------------------------------------------

    def _hold_lock(self) -> None:
        """Rank 0 holds the run directory's lock for the life of the process; every
        rank learns whether it got it, so a refused start stops all of them at once."""
        self._lock = contextlib.ExitStack()
        busy = ""
        if self.is_main:
            try:
                self._lock.enter_context(self.run_dir.lock())
            except RunBusy as exc:
                busy = str(exc)
        if any_rank(bool(busy)):
            raise RunBusy(busy or f"run {self.run_dir.path} is in use by another process")

    def _restore(self) -> None:
        run = self.run
        if self.is_main and self.ckpt_root.exists():
            # Checkpoints a killed attempt was writing: never read, never finished.
            for partial in self.ckpt_root.glob(".tmp-*"):
                shutil.rmtree(partial, ignore_errors=True)
        own = Manifest(self.ckpt_root).latest() if self.ckpt_root.exists() else None
        if own is not None:
            common = load_checkpoint(self.ckpt_root / own.name, self.model, self.optimizer, self.scheduler)
            self._set_position(common)
            self._say(f"resumed from {own.name} (iteration {self.iteration}, {self.tokens:,} tokens)")
        elif self.parent_checkpoint is not None:
            common = load_checkpoint(self.parent_checkpoint, self.model, self.optimizer, self.scheduler)
            self._set_position(common)
            self._say(f"branching from {self.parent_checkpoint} at iteration {self.iteration}")
        elif run.init_meta is not None:
            load_checkpoint(self.cfg.init_from, self.model, load_rng=False)
            if run.init_meta.has_optimizer and run.kind == "upcycle":
                # Converted with --carry-moments: the dense Adam moments start every expert's.
                from megatron_upcycle.upcycle import load_carried_moments

                step = load_carried_moments(self.cfg.init_from, self.model, self.optimizer)
                self._say(f"carried Adam moments from the dense optimizer (step {step})")
            # Continue the token stream where the dense model stopped, so D2 tokens are new tokens.
            self.data_offset_samples = (self.sunk_tokens() or 0) // run.model.seq_length
            self._say(f"initialised weights from {self.cfg.init_from}")
        # Lines past the starting iteration belong to an attempt that died before
        # saving: drop them, so metrics.jsonl reads as one uninterrupted run.
        self.metrics.truncate_after(self.iteration)
        # The scheduler's step count is the iteration; set explicitly so a branch
        # (whose plan differs from its parent's) gets this plan's LR.
        self.scheduler.num_steps = self.iteration
        self.scheduler.step(0)

    def _set_position(self, common: dict) -> None:
        self.iteration = int(common["iteration"])
        self.data_offset_samples = int(common.get("data_offset_samples", 0))

    def _build_data(self) -> None:
        from megatron_upcycle.data import build_gpt_datasets, resolve_data

        # resolve_data serialises preparation with a file lock and Megatron's dataset
        # builder builds index caches on rank 0 first: every rank calls both directly.
        resolved = resolve_data(self.cfg.data)
        if resolved.vocab_size > self.run.model.vocab_size:
            raise UserError(
                f"tokenizer has {resolved.vocab_size} tokens but model '{self.run.model.name}' has vocab_size "
                f"{self.run.model.vocab_size}"
            )
        self.resolved_data = resolved
        train_samples = self.data_offset_samples + self.run.plan.total_iters * self.run.global_batch_size
        self.eval_samples = max(1, self.cfg.schedule.eval_tokens // self.run.model.seq_length)
        self.train_data, self.valid_data = build_gpt_datasets(
            resolved, self.run.model.seq_length, self.cfg.seed, train_samples, self.eval_samples
        )

    # -- positions ------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return self.iteration * self.run.tokens_per_iter

    def _say(self, text: str) -> None:
        if self.is_main:
            print(f"[{self.run_dir.name}] {text}", flush=True)

    def _micro_batches(self, iteration: int):
        """This rank's micro-batches of global iteration ``iteration``: sample i is
        the same sample in every run, so resuming at an iteration resumes the data."""
        gbs, mbs = self.run.global_batch_size, self.cfg.micro_batch_size
        start = self.data_offset_samples + iteration * gbs + self.dp_rank * (gbs // self.dp_size)
        for m in range(self.num_microbatches):
            first = start + m * mbs
            yield to_device(stack_samples(self.train_data, range(first, first + mbs)), self.backend.device)

    # -- one step -------------------------------------------------------------

    def train_step(self, iteration: int) -> float:
        from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.run.moe is not None:
            # What forward_backward_func does: aux-loss grads are averaged over micro-batches.
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=self._device()) / self.num_microbatches)
        total = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(self._micro_batches(iteration)):
            sync = index == self.num_microbatches - 1
            # Gradients are reduced across data-parallel ranks once, after the last micro-batch.
            context = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with context:
                per_token = self.ddp(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                mask = batch["loss_mask"].float()
                loss = (per_token.float() * mask).sum() / mask.sum()
                (loss / self.num_microbatches).backward()
            total += loss.detach().double().cpu()
        self.ddp.finish_grad_sync()
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        mean_loss = total / self.num_microbatches
        if self.dp_size > 1:
            from megatron.core import parallel_state

            reduced = mean_loss.to(self._device(), torch.float32)
            dist.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
            mean_loss = reduced.double().cpu() / self.dp_size
        self._last_grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return float(mean_loss)

    def _device(self) -> str:
        return "cuda" if self.backend.device == "cuda" else "cpu"

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (nats) over the fixed held-out samples."""
        self.ddp.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        mbs = self.cfg.micro_batch_size
        mine = list(range(self.dp_rank, self.eval_samples, self.dp_size))
        for first in range(0, len(mine), mbs):
            batch = to_device(stack_samples(self.valid_data, mine[first:first + mbs]), self.backend.device)
            per_token = self.ddp(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()
            loss_sum += torch.stack([(per_token.float() * mask).sum(), mask.sum()]).double().cpu()
        if self.dp_size > 1:
            from megatron.core import parallel_state

            reduced = loss_sum.to(self._device())
            dist.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
            loss_sum = reduced.cpu()
        self.ddp.train()
        if self.router_stats is not None:
            from megatron_upcycle.mcore_compat import zero_moe_metrics

            zero_moe_metrics()
        return float(loss_sum[0] / loss_sum[1])

    # -- checkpoints ----------------------------------------------------------

    def _state_is_finite(self) -> bool:
        """Parameters and optimizer state all finite, on every rank (a collective)."""
        tensors = list(self.model.parameters())
        optimizers = [self.optimizer]
        while optimizers:
            opt = optimizers.pop()
            if hasattr(opt, "chained_optimizers"):
                optimizers.extend(opt.chained_optimizers)
                continue
            inner = getattr(opt, "optimizer", opt)
            for state in getattr(inner, "state", {}).values():
                tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        return all_ranks(all(bool(torch.isfinite(t).all()) for t in tensors))

    def _last_good(self) -> str:
        last = Manifest(self.ckpt_root).latest() if self.ckpt_root.exists() else None
        return f"the last good checkpoint is {last.name}" if last else "no checkpoint was written"

    def save(self, reason: str, budget: int | None = None) -> None:
        # A diverging update can leave finite losses behind it and non-finite weights:
        # such a state is never committed, so "the last good checkpoint" is good.
        if not self._state_is_finite():
            last_loss = self._window_losses[-1] if getattr(self, "_window_losses", None) else float("nan")
            raise NonFiniteLoss(f"loss is {last_loss:.4g} at iteration {self.iteration} but the parameters or "
                                f"optimizer state are non-finite: not saving them; stopped, {self._last_good()}")
        record = CheckpointRecord(
            name=checkpoint_name(self.iteration),
            iteration=self.iteration,
            tokens=self.tokens,
            lr=float(self.scheduler.get_lr(self.optimizer.param_groups[0])),
            phase=phase_of(self.iteration, self.run.warmup_iters, self.run.plan),
            reason=reason,
            budget_tokens=budget,
        )
        meta = CheckpointMeta(
            model=self.run.model,
            moe=self.run.moe,
            iteration=self.iteration,
            tokens=self.tokens,
            tokenizer=str(self.resolved_data.tokenizer_path),
            run_kind=self.run.kind,
            provenance=self._provenance(),
        )
        common = {
            "iteration": self.iteration,
            "tokens": self.tokens,
            "consumed_samples": self.iteration * self.run.global_batch_size,
            "data_offset_samples": self.data_offset_samples,
        }
        save_checkpoint(self.ckpt_root, record, self.model, self.optimizer, self.scheduler, common, meta)
        if reason == "safety" and self.is_main:
            self._prune_safety()

    def _prune_safety(self) -> None:
        manifest = Manifest(self.ckpt_root)
        # Budget checkpoints are what branches resume: retention never touches them.
        safety = [r for r in manifest.existing() if r.reason in ("safety", "signal") and r.budget_tokens is None]
        for record in safety[: max(0, len(safety) - self.cfg.schedule.keep_safety)]:
            shutil.rmtree(self.ckpt_root / record.name, ignore_errors=True)
            manifest.remove(record.name)

    def _provenance(self) -> dict:
        return {
            "D1": self.sunk_tokens(),
            "init_from": self.cfg.init_from,
            "parent": str(self.cfg.parent) if self.run.kind == "branch" else None,
            # The resolved run config travels with the checkpoint, not only in the run directory.
            "run_config": to_dict(self.cfg),
        }

    def sunk_tokens(self) -> int | None:
        """D1: tokens of the dense model an upcycled/CPT run started from."""
        meta = self.run.init_meta
        if meta is None:
            return None
        # A converted checkpoint records its dense source's tokens; a dense one (CPT) its own.
        return int(meta.provenance.get("source_tokens") or meta.tokens)

    # -- the loop -------------------------------------------------------------

    def train(self) -> dict:
        run, schedule = self.run, self.cfg.schedule
        self._say(
            f"{run.kind} ({run.model_kind}) {run.model.name}{f' {run.moe.num_experts}x top-{run.moe.topk}' if run.moe else ''}"
            f" | {self.backend.describe()} | iterations {self.iteration}->{run.stop_iter}"
            f" | {run.tokens_per_iter:,} tokens/iteration | peak lr {run.peak_lr:g}"
        )
        start_time, start_iter = time.perf_counter(), self.iteration
        self._window_losses: list[float] = []
        self.metrics.throughput()
        while self.iteration < run.stop_iter:
            if self.requeue.agreed():
                latest = Manifest(self.ckpt_root).latest() if self.ckpt_root.exists() else None
                # The signal came during (or right after) a save of this iteration: that
                # checkpoint, a budget's perhaps, is the one to resume; saving again would replace it.
                if latest is None or latest.iteration != self.iteration:
                    self.save("signal")
                elif self.is_main and latest.budget_tokens is None:
                    # The run stopped here for the signal: say so (a budget record stays a budget's).
                    Manifest(self.ckpt_root).add(dataclasses.replace(latest, reason="signal"))
                self._say(f"signal received: saved iteration {self.iteration}, exiting for requeue")
                self.requeue.exit_for_requeue()  # once every rank's save is complete
            log_now = (self.iteration + 1) % schedule.log_interval_iters == 0 or self.iteration + 1 == run.stop_iter
            if self.router_stats is not None:
                self.router_stats.active = log_now
            loss = self.train_step(self.iteration)
            self.iteration += 1
            self._window_losses.append(loss)
            self.metrics.count_tokens(run.tokens_per_iter)
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at iteration {self.iteration}; stopped, {self._last_good()}")
            if log_now:
                self._log(loss)
            self._maybe_evaluate()
            self._maybe_save()
        val_loss = self.evaluate()
        self.metrics.log({"iteration": self.iteration, "tokens": self.tokens, "val_loss": val_loss})
        wall = time.perf_counter() - start_time
        result = self._result(val_loss, wall, (self.iteration - start_iter) * run.tokens_per_iter)
        self._check_budgets_saved()
        if self.is_main:
            self.run_dir.write_result(result)
        self._say(f"done: val_loss {val_loss:.4f} after {self.tokens:,} tokens ({wall:.0f} s)")
        self.metrics.close()
        return result

    def _check_budgets_saved(self) -> None:
        """A stable run is done only when every budget it serves has its checkpoint:
        a missing one would fail its decay branch forever."""
        manifest = Manifest(self.ckpt_root)
        missing = [b for b in self.run.save_points.values() if manifest.for_budget(b) is None]
        if missing:
            raise UserError(
                f"stable run {self.run_dir.path} reached its end without checkpoints for budgets "
                f"{', '.join(f'{b:,}' for b in missing)} tokens; not marking it done (delete the run "
                "directory to train it again)"
            )

    def _maybe_evaluate(self) -> None:
        interval = self.cfg.schedule.eval_interval_iters
        if interval and self.iteration % interval == 0 and self.iteration != self.run.stop_iter:
            val_loss = self.evaluate()
            self.metrics.log({"iteration": self.iteration, "tokens": self.tokens, "val_loss": val_loss})
            self._say(f"iteration {self.iteration}: val_loss {val_loss:.4f}")

    def _maybe_save(self) -> None:
        """Budget save points (stable runs), the final state, and periodic safety checkpoints."""
        safety = self.cfg.schedule.safety_interval_iters
        if self.iteration in self.run.save_points:
            self.save("budget", budget=self.run.save_points[self.iteration])
        elif self.iteration == self.run.stop_iter:
            self.save("final")
        elif safety and self.iteration % safety == 0:
            self.save("safety")

    def _log(self, loss: float) -> dict:
        tokens_per_second = self.metrics.throughput()
        record = {
            "iteration": self.iteration,
            "tokens": self.tokens,
            "tokens_per_iter": self.run.tokens_per_iter,
            "loss": loss,
            # Mean over the steps since the last log line: one step's loss is noisy.
            "loss_window_mean": sum(self._window_losses) / max(len(self._window_losses), 1),
            "lr": float(self.scheduler.get_lr(self.optimizer.param_groups[0])),
            "grad_norm": self._last_grad_norm,
            "tokens_per_second": tokens_per_second,
        }
        if self.router_stats is not None:
            stats = self.router_stats.collect()
            if "aux_loss_sum" in stats:
                record["aux_loss"] = stats.pop("aux_loss_sum") / self.num_microbatches
            record.update(stats)
        self._window_losses = []
        self.metrics.log(record)
        self.metrics.progress(record, self.run.stop_iter, tokens_per_second)
        return record

    def _result(self, val_loss: float, wall: float, tokens_this_session: int) -> dict:
        run = self.run
        moe = run.moe
        n_active = self.counts["active_non_embedding"]
        sunk = self.sunk_tokens()
        d1, d2 = (sunk, self.tokens) if sunk is not None else (self.tokens, None)
        return {
            "run_id": self.run_dir.name,
            "kind": run.kind,
            "model_kind": run.model_kind,
            "phase": "stable" if self.cfg.schedule.mode == "stable" else "complete",
            "model": run.model.name,
            "E": moe.num_experts if moe else None,
            "k": moe.topk if moe else None,
            "N1": self.counts["non_embedding"] if moe is None else dense_equivalent_params(self.counts, run.model, moe),
            "N2": n_active if moe else None,
            "Ntotal": self.counts["non_embedding"] if moe else None,
            "embedding_params": self.counts["embedding"],
            "D1": d1,
            "D2": d2,
            "tokens": self.tokens,
            "FLOPs": 6 * n_active * self.tokens,
            "val_loss": val_loss,
            "val_tokens": self.eval_samples * run.model.seq_length,
            "iterations": self.iteration,
            "global_batch_size": run.global_batch_size,
            "peak_lr": run.peak_lr,
            "wall_seconds": wall,
            "tokens_per_second": tokens_this_session / max(wall, 1e-9),
            "backend": self.backend.describe(),
            "world_size": dist.get_world_size(),
            "init_from": self.cfg.init_from,
            "parent": str(self.cfg.parent) if run.kind == "branch" else None,
        }
