"""``run_benchmark``: every workload on every model, interleaved, with progress and an ETA.

Models are all loaded first; then each repeat visits every model in turn (the
starting model rotating with the repeat), so a slow patch of a shared machine
hits all models alike instead of one. Each model is warmed up once before any
timing. The same prompts and arrival times serve every model.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from megatron_upcycle.inference import workloads
from megatron_upcycle.inference.inputs import ModelInput, prepare_inputs
from megatron_upcycle.inference.results import build_results, write_results
from megatron_upcycle.inference.workloads import Preset


class Progress:
    """Progress lines: what ran, its number, and an ETA from the measurements so far."""

    def __init__(self, total: int, emit=print) -> None:
        self.total, self.done, self.start, self.emit = total, 0, time.perf_counter(), emit

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.emit(f"bench-inference [{self.done}/{self.total}] {text}; elapsed {elapsed:.0f} s, ETA {eta:.0f} s")


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _measure_all(engine, models: list[ModelInput], preset: Preset, rates: list[float] | None, seed: int,
                 emit) -> tuple[list[dict], list[float]]:
    runners = {}
    for m in models:
        emit(f"bench-inference: loading {m.describe()}")
        runners[m.label] = engine.load(m.path)
    vocab = models[0].vocab_size
    n_in, n_out = preset.input_tokens, preset.output_tokens
    warm = workloads.random_prompts(1, n_in, vocab, seed)
    for m in models:
        runners[m.label].generate(warm, 2)

    n_rates = len(preset.rates or preset.relative_rates)
    total = len(models) * (preset.repeats * (len(preset.offline_batches) + 1) + preset.online_repeats * n_rates)
    progress = Progress(total, emit)
    rows: list[dict] = []

    def record(workload: str, m: ModelInput, repeat: int, result: dict, batch=None, rate=None) -> dict:
        row = {"workload": workload, "model": m.label, "role": m.role, "batch_size": batch, "request_rate": rate,
               "repeat": repeat, **result}
        if workload == "online":
            row["tokens_per_s"] = result["throughput_tokens_per_s"]
        rows.append(row)
        return row

    for repeat in range(preset.repeats):
        for batch in preset.offline_batches:
            prompts = workloads.random_prompts(batch, n_in, vocab, seed + 1000 * repeat + batch)
            for m in _rotated(models, repeat):
                row = record("offline", m, repeat, workloads.offline(runners[m.label], prompts, n_out), batch=batch)
                progress.step(f"offline {m.label} batch {batch} repeat {repeat + 1}/{preset.repeats}: "
                              f"{row['tokens_per_s']:,.0f} tokens/s")
        prompt = workloads.random_prompts(1, n_in, vocab, seed + 7 + repeat)[0]
        for m in _rotated(models, repeat):
            row = record("decode", m, repeat, workloads.decode(runners[m.label], prompt, preset.decode_tokens),
                         batch=1)
            progress.step(f"decode {m.label} batch 1 repeat {repeat + 1}/{preset.repeats}: "
                          f"{row['tokens_per_s']:,.1f} tokens/s")

    if rates is None:
        rates = preset.rates and list(preset.rates)
    if not rates:  # relative to the dense model's offline capacity in requests/s
        dense_rows = [r for r in rows if r["workload"] == "offline" and r["role"] == "dense"]
        best = max(dense_rows, key=lambda r: r["tokens_per_s"])
        capacity = best["tokens_per_s"] / (n_in + n_out)
        rates = [float(f"{q * capacity:.3g}") for q in preset.relative_rates]
        emit(f"bench-inference: dense offline capacity {capacity:.3g} requests/s; online rates "
             f"{', '.join(f'{r:g}' for r in rates)} requests/s")
    for repeat in range(preset.online_repeats):
        for i, rate in enumerate(rates):
            prompts = workloads.random_prompts(preset.requests_per_rate, n_in, vocab, seed + 5000 + 97 * repeat + i)
            arrivals = workloads.poisson_arrivals(rate, preset.requests_per_rate, seed + 9000 + 97 * repeat + i)
            for m in _rotated(models, repeat + i):
                result = workloads.online(runners[m.label], prompts, arrivals, n_out, preset.max_online_batch)
                record("online", m, repeat, result, rate=rate)
                progress.step(f"online {m.label} {rate:g} requests/s repeat {repeat + 1}/{preset.online_repeats}: "
                              f"p50 {result['latency_p50_s']:.3f} s, {result['throughput_tokens_per_s']:,.0f} "
                              "tokens/s")
    return rows, rates


def run_benchmark(dense: str, moes: list[str], out_dir: Path, preset: Preset, engine_choice: str = "auto",
                  rates: list[float] | None = None, threads: int | None = None, seed: int = 0, plots: bool = True,
                  emit=print) -> dict:
    """Benchmark ``dense`` against ``moes``; writes results.json, results.csv and PNGs into ``out_dir``."""
    import torch

    threads_before = torch.get_num_threads()  # an engine may set its own; a calling study keeps its setting
    created = not out_dir.exists()
    try:
        return _run(dense, moes, out_dir, preset, engine_choice, rates, threads, seed, plots, emit)
    except BaseException:
        if created:  # nothing is written there before the end: a refused input leaves no output behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)


def _run(dense, moes, out_dir: Path, preset: Preset, engine_choice, rates, threads, seed, plots, emit) -> dict:
    from megatron_upcycle.inference.engines import select_engine
    from megatron_upcycle.inference.plots import plot_all

    start = time.perf_counter()
    cpu0 = time.process_time()
    # The engine first: a missing one is reported before minutes of exporting.
    engine = select_engine(engine_choice, 1 + len(moes), preset.input_tokens + preset.output_tokens, threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-inference-exports-", dir=out_dir) as scratch:
        models = prepare_inputs(dense, moes, Path(scratch), progress=emit)
        emit(f"bench-inference: engine {engine.name}; preset {preset.describe()}")
        rows, used_rates = _measure_all(engine, models, preset, rates, seed, emit)
        meta = {
            "engine": engine.describe(),
            "preset": {k: getattr(preset, k) for k in preset.__dataclass_fields__} | {"rates_used": used_rates},
            "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                     "python": platform.python_version()},
            "wall_seconds": time.perf_counter() - start,
            "process_cpu_seconds": time.process_time() - cpu0,
            "seed": seed,
        }
        results = build_results(meta, [m.to_json() for m in models], rows)
    json_path, csv_path = write_results(results, out_dir)
    results["files"] = [str(json_path), str(csv_path)]
    if plots:
        results["files"] += [str(p) for p in plot_all(results, out_dir)]
    return results
