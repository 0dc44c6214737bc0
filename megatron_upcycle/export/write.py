"""Write a Hugging Face model directory (config, safetensors, tokenizer) atomically.

The weights go through ``PreTrainedModel.save_pretrained`` so that transformers
itself decides the file layout: safetensors, shards plus an index past
``max_shard_size``, and for Mixtral and Qwen2-MoE the Hub's per-expert format
(``block_sparse_moe.experts.N.w1/w2/w3``, ``mlp.experts.N.gate_proj/up_proj/down_proj``)
that transformers 4 and 5, vLLM and llama.cpp all read; transformers 5 fuses the
experts again when loading. config.json and tokenizer_config.json are then made
readable by transformers 4 as well (compat.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_upcycle.atomic import current_umask, unique_failed_name, write_json_atomic
from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.errors import UserError
from megatron_upcycle.export.check import DEFAULT_TOLERANCE, ExportCheck, check_export, megatron_logits, \
    verification_tokens
from megatron_upcycle.export.compat import make_portable
from megatron_upcycle.export.formats import ARCHITECTURES
from megatron_upcycle.export.hf import check_exportable, hf_model_class, megatron_to_hf

PROVENANCE_FILE = "megatron_upcycle_export.json"
FAILED_MARKER = "VERIFICATION_FAILED.json"  # the converter's name for the same thing

# Special tokens recognised by name in a tokenizer.json (first match wins).
_SPECIAL_ROLES = {
    "eos_token": ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>"),
    "bos_token": ("<s>", "<bos>", "<|bos|>", "<|begin_of_text|>"),
    "unk_token": ("<unk>", "<|unk|>"),
    "pad_token": ("<pad>", "<|pad|>"),
}


def resolve_tokenizer_json(path: str | os.PathLike) -> Path:
    """A tokenizer.json file, given it or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path} (a tokenizer.json from the `tokenizers` library)")
    return path


def load_tokenizer(tokenizer_json: str | os.PathLike, model_max_length: int):
    """A PreTrainedTokenizerFast around a tokenizer.json, with special tokens found by name.

    A GPT-2 style tokenizer (this project's: ``<|endoftext|>`` only) gets that token as
    bos and pad too: Megatron's document separator is what starts every document, and
    generate() needs a pad id for batches. Encoding is unchanged (the tokenizer adds
    no special tokens of its own).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = resolve_tokenizer_json(tokenizer_json)
    try:
        raw = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise UserError(f"{path}: not a readable tokenizer.json ({exc})") from None
    specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    roles = {}
    for role, names in _SPECIAL_ROLES.items():
        found = next((name for name in names if name in specials), None)
        if found is not None:
            roles[role] = found
    if "eos_token" in roles:
        roles.setdefault("bos_token", roles["eos_token"])
        roles.setdefault("pad_token", roles["eos_token"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=model_max_length, **roles)


@dataclass
class ExportResult:
    out: Path  # the export, or OUT.failed when verification failed
    format: str  # llama, mixtral or qwen2_moe
    architecture: str  # LlamaForCausalLM, MixtralForCausalLM or Qwen2MoeForCausalLM
    reason: str  # why this format ("requested", or auto's reason)
    status: str  # "ok", "unverified" or "failed"
    check: ExportCheck | None = None

    def describe(self) -> str:
        how = "requested" if self.reason == "requested" else f"auto: {self.reason}"
        return f"{self.architecture} (--format {self.format}, {how})"


class ExportVerificationError(RuntimeError):
    """The written export does not compute the Megatron logits; it is kept at ``result.out`` (OUT.failed)."""

    def __init__(self, result: ExportResult):
        self.result = result
        super().__init__(f"export verification failed ({result.check.format()}); the export is kept for "
                         f"inspection at {result.out} (not a finished export)")


def export_hf(
    state_dict: dict[str, torch.Tensor],
    model: ModelConfig,
    moe: MoEConfig | None,
    out_dir: str | os.PathLike,
    tokenizer_json: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    fmt: str = "auto",
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Write ``out_dir`` loadable with ``AutoModelForCausalLM.from_pretrained``; refuses an existing path.

    ``fmt``: "auto" (the simplest exact target), "llama", "mixtral" or "qwen2_moe";
    a format that cannot compute the model is a ConfigError, raised before writing.
    Everything is written into a temporary sibling directory; with ``verify`` the
    directory is loaded back by transformers and its logits compared with the
    Megatron model's (check.py). It is renamed to ``out_dir`` only when complete and
    verified; a failed check renames it to ``OUT.failed`` and raises
    ExportVerificationError, so an interrupted or wrong export never looks finished.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; choose a new output directory")
    tokenizer = load_tokenizer(tokenizer_json, model.seq_length) if tokenizer_json is not None else None
    vocab_in_use = len(tokenizer) if tokenizer is not None else None
    fmt, reason = check_exportable(model, moe, vocab_in_use, fmt)
    config, hf_state = megatron_to_hf(state_dict, model, moe, vocab_in_use, fmt)
    config.dtype = dtype
    if tokenizer is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(tokenizer, attr))
    tokens = expected = None
    if verify:
        _check_verify_memory(state_dict)
        tokens = verification_tokens(vocab_in_use or model.vocab_size, model.seq_length)
        expected = megatron_logits(state_dict, model, moe, tokens, weight_dtype=dtype)

    # Build on the meta device and adopt our tensors (assign=True): no random
    # init, no second copy of a multi-billion-parameter model in memory.
    with torch.device("meta"):
        hf_model = hf_model_class(config)(config)
    hf_state = {key: tensor.to(dtype) for key, tensor in hf_state.items()}
    hf_model.load_state_dict(hf_state, strict=True, assign=True)
    if tokenizer is not None and hf_model.can_generate():
        generation = hf_model.generation_config
        generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id

    result = ExportResult(out_dir, fmt, ARCHITECTURES[fmt], reason, "ok" if verify else "unverified")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the export is an ordinary directory
        hf_model.save_pretrained(tmp, max_shard_size=max_shard_size)
        del hf_model, hf_state
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        provenance = _provenance(model, moe, tokenizer, result)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
        if verify:
            result.check = check_export(tmp, expected, tokens, tolerance)
            provenance["verification"] = result.check.to_dict()
            write_json_atomic(tmp / PROVENANCE_FILE, provenance)
            if not result.check.passed:
                write_json_atomic(tmp / FAILED_MARKER, result.check.to_dict())
                result.out, result.status = unique_failed_name(out_dir), "failed"
                os.replace(tmp, result.out)
                raise ExportVerificationError(result)
        if out_dir.exists():  # appeared while we were writing
            raise UserError(f"{out_dir} already exists; choose a new output directory")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check_verify_memory(state_dict: dict[str, torch.Tensor]) -> None:
    """The check holds the Megatron and the transformers model in fp32 beside the state dict."""
    import psutil

    from megatron_upcycle.errors import ConfigError

    need = sum(t.numel() for t in state_dict.values()) * 4 * 2
    have = psutil.virtual_memory().available
    if need > 0.9 * have:
        raise ConfigError(f"verifying the export needs ~{need / 2**30:.1f} GiB of RAM more, {have / 2**30:.1f} GiB "
                          "are free: pass --no-verify (and check the export on a bigger machine)")


def _provenance(model: ModelConfig, moe: MoEConfig | None, tokenizer, result: ExportResult) -> dict:
    import transformers

    from megatron_upcycle.config.loading import to_dict

    note = None
    if tokenizer is not None and len(tokenizer) < model.vocab_size:
        note = (f"tokenizer has {len(tokenizer)} tokens, the model {model.vocab_size} rows: "
                "ids past the tokenizer are never produced by it")
    return {"format": result.format, "architecture": result.architecture, "format_reason": result.reason,
            "written_with_transformers": transformers.__version__,
            "model": to_dict(model), "moe": to_dict(moe) if moe else None,
            "tokenizer_vocab_size": len(tokenizer) if tokenizer is not None else None, "vocab_note": note,
            "verification": None}
