"""Serving engines behind one interface: vLLM (the GPU path, what Doubov et al. used) and
Hugging Face transformers (CPU, and the fallback).

An engine loads a model directory into a ``Runner`` whose ``generate(prompts,
new_tokens)`` runs a batch of token-id prompts to exactly ``new_tokens`` new tokens
each (greedy, end-of-sequence ignored) and returns when all are done. Workloads
time that call; every result names the engine that served it.
"""
from __future__ import annotations

import importlib.util
from typing import Protocol

from megatron_upcycle.errors import UserError

ENGINES = ("auto", "vllm", "transformers")


class Runner(Protocol):
    def generate(self, prompts: list[list[int]], new_tokens: int) -> None: ...


class ArrivalServer(Protocol):
    """A runner that serves timed arrivals itself (continuous batching); the online workload uses it
    instead of its own server loop. Returns each request's completion time, seconds after ``start``."""

    def serve(self, prompts: list[list[int]], arrivals: list[float], new_tokens: int, start: float) -> list[float]: ...


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class TransformersEngine:
    """``AutoModelForCausalLM.generate`` with a KV cache; fp32 on CPU, bf16 on a GPU."""

    name = "transformers"

    def __init__(self, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-model loading bars would bury the progress lines
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32

    def describe(self) -> dict:
        import torch
        import transformers

        return {"name": self.name, "version": transformers.__version__, "torch": torch.__version__,
                "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "batching": "dynamic: each generate call serves every request queued when it starts"}

    def load(self, path) -> Runner:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
        return _TransformersRunner(model.to(self.device).eval(), self.device)


class _TransformersRunner:
    def __init__(self, model, device: str) -> None:
        self.model, self.device = model, device

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        import torch

        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one batch must have one length (no padding here)")
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
        if self.device == "cuda":
            torch.cuda.synchronize()


class VLLMEngine:
    """vLLM's offline ``LLM`` (continuous batching, paged KV cache); bf16 on the GPU.

    Several models are benchmarked interleaved, so each gets an equal share of
    ``gpu_memory_fraction``.
    """

    name = "vllm"

    def __init__(self, num_models: int, max_model_len: int, gpu_memory_fraction: float = 0.85) -> None:
        self.memory_share = gpu_memory_fraction / max(num_models, 1)
        self.max_model_len = max_model_len

    def describe(self) -> dict:
        import vllm

        return {"name": self.name, "version": vllm.__version__, "device": "cuda", "dtype": "bfloat16",
                "gpu_memory_share": self.memory_share,
                "batching": "continuous: online requests join the running batch on arrival (LLMEngine.step)"}

    def load(self, path) -> Runner:
        import os

        from vllm import LLM

        # Prompts may be longer than the training context (the paper's 3500 + 300 on a
        # 1024-context model): the benchmark measures speed, not quality.
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        llm = LLM(model=str(path), dtype="bfloat16", gpu_memory_utilization=self.memory_share,
                  max_model_len=self.max_model_len, seed=0)
        return _VLLMRunner(llm)


def _vllm_prompt(tokens: list[int]):
    try:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=tokens)
    except ImportError:  # older vLLM: a plain dict
        return {"prompt_token_ids": tokens}


class _VLLMRunner:
    def __init__(self, llm) -> None:
        self.llm = llm

    @staticmethod
    def _params(new_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        self.llm.generate([_vllm_prompt(p) for p in prompts], self._params(new_tokens), use_tqdm=False)

    def serve(self, prompts: list[list[int]], arrivals: list[float], new_tokens: int, start: float) -> list[float]:
        """Continuous batching: requests join the running batch at their arrival (LLMEngine add_request/step)."""
        import time

        engine = self.llm.llm_engine
        params = self._params(new_tokens)
        done: dict[int, float] = {}
        submitted = 0
        while len(done) < len(prompts):
            now = time.perf_counter() - start
            while submitted < len(prompts) and arrivals[submitted] <= now:
                engine.add_request(str(submitted), _vllm_prompt(prompts[submitted]), params)
                submitted += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(arrivals[submitted] - now, 0.0))
                continue
            for output in engine.step():
                if output.finished:
                    done[int(output.request_id)] = time.perf_counter() - start
        return [done[i] for i in range(len(prompts))]


def select_engine(choice: str, num_models: int, max_model_len: int, threads: int | None = None):
    """The engine for ``--engine`` (auto: vLLM on a GPU when installed, transformers otherwise)."""
    if choice not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got '{choice}'")
    if choice == "vllm":
        if not vllm_installed():
            raise UserError("--engine vllm: vLLM is not installed (pip install -e '.[serve]' on a GPU machine)")
        if not _cuda():
            raise UserError("--engine vllm: no CUDA GPU visible; use --engine transformers on this machine")
        return VLLMEngine(num_models, max_model_len)
    if choice == "auto" and vllm_installed() and _cuda():
        return VLLMEngine(num_models, max_model_len)
    if importlib.util.find_spec("transformers") is None:
        raise UserError("--engine transformers: transformers is not installed (pip install -e '.[hf]')")
    return TransformersEngine(threads)
