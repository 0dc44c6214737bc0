"""The export's proof: the written directory, loaded by transformers, computes the Megatron logits.

One fixed batch (seeded tokens) goes through the Megatron GPTModel built from the
exported state dict and through ``AutoModelForCausalLM.from_pretrained(OUT)``, both in
fp32. Weights exported in bf16/fp16 are rounded the same way on the Megatron side, so
the check is about the mapping (names, layouts, routing, RoPE, config fields), not
about the dtype. Passed: max |delta logit| <= tolerance * max(1, max |logit|), the
converter's contract (fp32 rounding is relative; for untrained models with |logits| < 1
it is the absolute tolerance).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_upcycle.config.model import ModelConfig, MoEConfig

DEFAULT_TOLERANCE = 1e-4
BATCH_SIZE, SEQ_LENGTH, SEED = 2, 64, 0


@dataclass
class ExportCheck:
    logit_max_abs: float
    logit_scale: float  # max |Megatron logit|
    tolerance: float
    tokens: int
    transformers_version: str
    problem: str | None  # what transformers reported while loading (missing keys, ...)
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        bound = self.tolerance * max(1.0, self.logit_scale)
        text = (f"transformers {self.transformers_version} vs Megatron on {self.tokens} tokens: max |delta logit| "
                f"{self.logit_max_abs:.3e} (bound {bound:.3g}, max |logit| {self.logit_scale:.3g}): {verdict}")
        return text + (f"; {self.problem}" if self.problem else "")


def verification_tokens(vocab_size: int, seq_length: int, batch_size: int = BATCH_SIZE,
                        max_seq: int = SEQ_LENGTH, seed: int = SEED) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, min(max_seq, seq_length)), generator=gen)


def megatron_logits(state_dict: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig | None,
                    tokens: torch.Tensor, weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [b, s, V] of the Megatron GPTModel holding ``state_dict`` (rounded to ``weight_dtype``), fp32, CPU."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.errors import CheckpointError
    from megatron_upcycle.export.hf import local_spec_names
    from megatron_upcycle.models import build_gpt_model
    from megatron_upcycle.parallel import single_process_groups

    backend = select_backend(force_cpu=True)
    with single_process_groups(backend):
        gpt = build_gpt_model(model, moe, backend).eval()
        state = {k: v.to(weight_dtype).float() for k, v in local_spec_names(state_dict).items()}
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"state dict does not fit the Megatron model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = gpt(tokens, positions, attention_mask=None)
        del gpt
    return logits.float()


def hf_logits(out_dir: str | Path, tokens: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(logits, loading problem or None) of the directory loaded by the installed transformers, fp32."""
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, output_loading_info=True)
    # Anything missing would be silently random-initialised by transformers.
    problems = [f"{kind}: {sorted(info[kind])[:3]}" for kind in ("missing_keys", "unexpected_keys",
                                                                 "mismatched_keys") if info.get(kind)]
    with torch.no_grad():
        logits = hf.eval()(tokens).logits.float()
    return logits, "; ".join(problems) or None


def check_export(out_dir: str | Path, expected: torch.Tensor, tokens: torch.Tensor,
                 tolerance: float = DEFAULT_TOLERANCE) -> ExportCheck:
    import transformers

    got, problem = hf_logits(out_dir, tokens)
    if got.shape != expected.shape:
        delta = math.inf
        problem = (problem + "; " if problem else "") + f"logits shape {tuple(got.shape)} != {tuple(expected.shape)}"
    else:
        delta = float((got.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    passed = problem is None and math.isfinite(delta) and delta <= tolerance * max(1.0, scale)
    return ExportCheck(logit_max_abs=delta, logit_scale=scale, tolerance=tolerance, tokens=int(tokens.numel()),
                       transformers_version=transformers.__version__, problem=problem, passed=passed)
