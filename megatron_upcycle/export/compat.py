"""config.json and tokenizer_config.json that transformers 4.4x-4.57 and 5.x read the same way.

What differs between the two generations for Llama, Mixtral and Qwen2-MoE, and what
each file therefore carries:
- RoPE: 5.x reads ``rope_parameters``; 4.x reads ``rope_theta`` (and ``rope_scaling``)
  and silently falls back to its class default (1e4 Llama and Qwen2-MoE, 1e6
  Mixtral) when it is absent: both spellings are written.
- dtype: 5.x (and 4.56+) read ``dtype``, earlier 4.x ``torch_dtype``: both.
- tokenizer class: 5.x's save_pretrained writes ``TokenizersBackend``, a class 4.x
  does not have; ``PreTrainedTokenizerFast`` is in both (in 5.x an alias of it).
- Qwen2-MoE attention biases: 4.x before ``qkv_bias`` existed build them always;
  the export writes zero biases with ``qkv_bias: true`` (hf.py), which every
  version reads.
- expert weights: 5.x fuses experts in memory, and its save_pretrained writes the
  Hub's per-expert layout that 4.x reads (write.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_upcycle.atomic import write_json_atomic

TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_config(config: dict, with_tokenizer: bool) -> dict:
    """``config`` (a transformers 5 config.json) plus the spellings transformers 4 reads."""
    out = dict(config)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is exported, got {rope!r}")
    out["rope_theta"] = rope["rope_theta"]
    out["rope_scaling"] = None
    if "dtype" in config:
        out["torch_dtype"] = config["dtype"]
    if with_tokenizer:
        out["tokenizer_class"] = TOKENIZER_CLASS
    return out


def portable_tokenizer_config(config: dict) -> dict:
    out = dict(config)
    out["tokenizer_class"] = TOKENIZER_CLASS
    return out


def make_portable(out_dir: Path) -> None:
    """Rewrite the config files save_pretrained wrote in ``out_dir`` (atomically, each)."""
    tokenizer_config = out_dir / "tokenizer_config.json"
    with_tokenizer = tokenizer_config.is_file()
    config_path = out_dir / "config.json"
    write_json_atomic(config_path, portable_config(json.loads(config_path.read_text()), with_tokenizer))
    if with_tokenizer:
        write_json_atomic(tokenizer_config, portable_tokenizer_config(json.loads(tokenizer_config.read_text())))
