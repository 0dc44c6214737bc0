"""The three workloads of the Databricks protocol (Doubov et al. 2024) and their presets.

- offline: max throughput, a batch of identical-length prompts per call, over a grid of batch sizes;
- online: Poisson arrivals at a request rate; an engine that batches arrivals itself (vLLM's
  continuous batching) is handed the arrival times, otherwise a server loop hands every queued
  request to the engine at once; each request's latency runs from its arrival to its completion;
- decode: tokens/s of one sequence after its prompt, (n - 1) / (t(n tokens) - t(1 token)),
  so the prefill cancels.

Throughput counts input + output tokens (the paper's). Every measurement records
wall time and the process's CPU time (on shared CPUs the wall clock also measures
the neighbours).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from megatron_upcycle.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    input_tokens: int
    output_tokens: int
    offline_batches: tuple[int, ...]
    decode_tokens: int  # new tokens of the batch-1 decode measurement
    # Request rates (requests/s); None: ``relative_rates`` x the dense model's offline max
    # throughput in requests/s, so a CPU run sweeps from idle to saturated whatever the model.
    rates: tuple[float, ...] | None
    relative_rates: tuple[float, ...]
    requests_per_rate: int
    max_online_batch: int
    repeats: int  # offline and decode
    online_repeats: int
    note: str

    def describe(self) -> str:
        rates = (", ".join(f"{r:g}" for r in self.rates) + " requests/s" if self.rates else
                 ", ".join(f"{r:g}" for r in self.relative_rates) + " x the dense model's max requests/s")
        return (f"{self.name}: {self.input_tokens} input + {self.output_tokens} output tokens per request; offline "
                f"batches {', '.join(map(str, self.offline_batches))}; decode {self.decode_tokens} tokens at batch "
                f"1; online rates {rates}, {self.requests_per_rate} requests each; {self.repeats} repeats "
                f"({self.online_repeats} online). {self.note}")


PRESETS = {
    # The paper's: vLLM on H100, 3500 in / 300 out, rates in 0.1 steps, 5 runs averaged.
    "paper": Preset("paper", 3500, 300, (1, 8, 32, 64, 128, 256), 256,
                    tuple(round(0.1 * i, 1) for i in range(1, 21)), (), 100, 256, 5, 5,
                    "Doubov et al.'s protocol."),
    # Sized for the CPU demo models (2 layers, d=64) to finish in about a minute on 2 cores.
    "cpu": Preset("cpu", 64, 16, (1, 4, 16), 32, None, (0.25, 0.5, 1.0, 1.5), 8, 16, 3, 2,
                  "CPU preset: short requests, 2 online repeats instead of 5 to finish in about a minute."),
}


def preset_with(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got '{name}'")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    for field_name in ("input_tokens", "output_tokens", "decode_tokens", "requests_per_rate", "max_online_batch",
                       "repeats", "online_repeats"):
        if getattr(preset, field_name) < 1:
            raise UserError(f"{field_name.replace('_', '-')} must be >= 1, got {getattr(preset, field_name)}")
    if preset.decode_tokens < 2:
        raise UserError("decode tokens must be >= 2 (the rate is measured between token 1 and token n)")
    if not preset.offline_batches or min(preset.offline_batches) < 1:
        raise UserError(f"offline batch sizes must be >= 1, got {preset.offline_batches}")
    rates = preset.rates or preset.relative_rates
    if not rates or min(rates) <= 0:
        raise UserError(f"request rates must be > 0, got {rates}")
    return preset


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token-id prompts drawn uniformly (the same for every model: one vocabulary is checked first)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(count, length)).tolist()


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times in seconds (the first at 0) of a Poisson process of ``rate`` requests/s."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return (np.cumsum(gaps) - gaps[0]).tolist()


class _Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s, self.cpu_s = time.perf_counter() - self.wall, time.process_time() - self.cpu


def offline(runner, prompts: list[list[int]], output_tokens: int) -> dict:
    """One batch, all prompts at once: (input + output) tokens/s."""
    with _Timer() as t:
        runner.generate(prompts, output_tokens)
    tokens = len(prompts) * (len(prompts[0]) + output_tokens)
    return {"tokens": tokens, "tokens_per_s": tokens / t.wall_s, "wall_s": t.wall_s, "cpu_s": t.cpu_s}


def decode(runner, prompt: list[int], new_tokens: int) -> dict:
    """Batch-1 decode rate with the prefill cancelled: (n - 1) / (t(n) - t(1))."""
    with _Timer() as first:
        runner.generate([prompt], 1)
    with _Timer() as full:
        runner.generate([prompt], new_tokens)
    wall = max(full.wall_s - first.wall_s, 1e-9)
    return {"tokens": new_tokens - 1, "tokens_per_s": (new_tokens - 1) / wall, "wall_s": wall,
            "cpu_s": max(full.cpu_s - first.cpu_s, 0.0)}


def online(runner, prompts: list[list[int]], arrivals: list[float], output_tokens: int, max_batch: int) -> dict:
    """Serve requests arriving at ``arrivals`` (seconds): p50/p90 latency and (input + output) tokens/s."""
    n = len(prompts)
    latencies: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    served = 0
    end = 0.0
    if hasattr(runner, "serve"):  # the engine batches arrivals itself (vLLM: continuous batching)
        finished = runner.serve(prompts, arrivals, output_tokens, start)
        latencies = [f - a for f, a in zip(finished, arrivals)]
        end, served = max(finished), n
    while served < n:
        now = time.perf_counter() - start
        if arrivals[served] > now:  # nothing queued: wait for the next arrival
            time.sleep(arrivals[served] - now)
            continue
        upto = served
        while upto < n and upto - served < max_batch and arrivals[upto] <= now:
            upto += 1
        runner.generate(prompts[served:upto], output_tokens)
        end = time.perf_counter() - start
        latencies += [end - arrivals[i] for i in range(served, upto)]
        served = upto
    cpu = time.process_time() - cpu0
    tokens = n * (len(prompts[0]) + output_tokens)
    span = max(end - arrivals[0], 1e-9)
    return {"requests": n, "tokens": tokens, "throughput_tokens_per_s": tokens / span,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p90_s": float(np.percentile(latencies, 90)),
            "latency_mean_s": float(np.mean(latencies)), "wall_s": span, "cpu_s": cpu}
