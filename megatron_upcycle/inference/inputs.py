"""The models a benchmark compares: Hugging Face export directories, or checkpoints exported on the fly.

Every input is checked before anything is timed: it is an export (config.json
with a known causal-LM architecture) or a megatron-upcycle checkpoint
(upcycle_meta.json, exported through ``megatron_upcycle.export`` into a
temporary directory); the dense one is dense, the others have experts; all share
one vocabulary and, when they carry one, one tokenizer. Each problem is a
UserError naming the path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.errors import UserError

DENSE_TYPES = ("llama", "mistral", "qwen2")
MOE_TYPES = ("mixtral", "qwen2_moe")
CHECKPOINT_META = "upcycle_meta.json"  # megatron_upcycle.checkpoint.meta.META_FILE, read without importing torch
PROVENANCE_FILE = "megatron_upcycle_export.json"  # written by megatron_upcycle.export next to config.json


@dataclass
class ModelInput:
    label: str  # unique short name used in results and plots
    role: str  # "dense" or "moe"
    source: str  # what the user passed
    path: Path  # the Hugging Face directory that is loaded
    model_type: str
    experts: int | None
    topk: int | None
    shared_expert: bool
    vocab_size: int
    exported_here: bool  # exported from a checkpoint into a temporary directory

    def describe(self) -> str:
        moe = f", {self.experts} experts top-{self.topk}" if self.experts else ""
        shared = " + shared expert" if self.shared_expert else ""
        return f"{self.label}: {self.model_type}{moe}{shared} ({self.source})"

    def to_json(self) -> dict:
        return {"label": self.label, "role": self.role, "source": self.source, "path": str(self.path),
                "model_type": self.model_type, "experts": self.experts, "topk": self.topk,
                "shared_expert": self.shared_expert, "vocab_size": self.vocab_size,
                "exported_from_checkpoint": self.exported_here}


def read_hf_config(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: config.json is unreadable ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path}: config.json has no model_type; not a Hugging Face model export")
    return config


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """A megatron-upcycle checkpoint -> a Hugging Face directory, through the project's exporter."""
    from megatron_upcycle.checkpoint import load_full_model_state, read_meta
    from megatron_upcycle.export import check_exportable, export_hf

    meta = read_meta(checkpoint)
    check_exportable(meta.model, meta.moe)  # before loading the weights
    tokenizer = meta.tokenizer if meta.tokenizer and Path(meta.tokenizer).exists() else None
    # Process groups: the caller's when it has some (a study, a test), else set up and torn down here.
    model, moe, state, _ = load_full_model_state(checkpoint)
    return export_hf(state, model, moe, out, tokenizer_json=tokenizer).out


def _is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_META).is_file()


def _label(path: Path, taken: set[str]) -> str:
    base = path.name if path.name not in ("", ".") else path.resolve().name
    if base.startswith("iter_"):  # a checkpoint: name it by its run
        base = path.resolve().parents[1].name if len(path.resolve().parents) > 1 else base
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    return label


def describe_input(source: str, role: str, path: Path, label: str, exported_here: bool) -> ModelInput:
    config = read_hf_config(path)
    model_type = config["model_type"]
    if model_type not in DENSE_TYPES + MOE_TYPES:
        raise UserError(f"{source}: model_type '{model_type}' is not a causal LM this benchmark knows "
                        f"({', '.join(DENSE_TYPES + MOE_TYPES)})")
    experts = config.get("num_local_experts") or config.get("num_experts")
    topk = config.get("num_experts_per_tok")
    shared = _has_shared_expert(path, config)
    if role == "dense" and model_type in MOE_TYPES:
        raise UserError(f"{source}: the DENSE argument is an MoE ({model_type}, {experts} experts); "
                        "give the dense model first")
    if role == "moe" and model_type not in MOE_TYPES:
        raise UserError(f"{source}: expected an MoE export, got a dense {model_type} model")
    return ModelInput(label=label, role=role, source=source, path=path, model_type=model_type,
                      experts=experts if role == "moe" else None, topk=topk if role == "moe" else None,
                      shared_expert=shared, vocab_size=int(config["vocab_size"]), exported_here=exported_here)


def _has_shared_expert(path: Path, config: dict) -> bool:
    """From the project's export record when there is one: its Qwen2-MoE exports without a shared
    expert keep a 1-wide, zero-gated one (vLLM cannot load a zero-wide one)."""
    record = path / PROVENANCE_FILE
    if record.is_file():
        try:
            moe = json.loads(record.read_text()).get("moe") or {}
            return bool(moe.get("shared_expert"))
        except (OSError, ValueError, AttributeError):
            pass
    return (config.get("shared_expert_intermediate_size") or 0) > 1


def _vocab(path: Path) -> dict | None:
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise UserError(f"{tokenizer_json}: not a readable tokenizer.json ({exc})") from None


def check_same_vocabulary(models: list[ModelInput]) -> None:
    """Prompts are token ids: every model must read them as the same tokens."""
    dense = models[0]
    for other in models[1:]:
        if other.vocab_size != dense.vocab_size:
            raise UserError(f"{other.source} has vocab_size {other.vocab_size} but the dense model "
                            f"{dense.source} has {dense.vocab_size}: they cannot be fed the same token ids")
    vocabs = [_vocab(m.path) for m in models]
    with_tokenizer = [m for m, v in zip(models, vocabs) if v is not None]
    if with_tokenizer and len(with_tokenizer) != len(models):
        missing = next(m for m, v in zip(models, vocabs) if v is None)
        raise UserError(f"{missing.source} has no tokenizer.json while {with_tokenizer[0].source} has one: "
                        "cannot check that they tokenize alike (export both with the same tokenizer)")
    for m, vocab in zip(models[1:], vocabs[1:]):
        if vocab is not None and vocab != vocabs[0]:
            raise UserError(f"{m.source} and the dense model {dense.source} have different tokenizers "
                            f"({len(vocab)} vs {len(vocabs[0])} tokens, or the same size with other ids)")


def prepare_inputs(dense: str, moes: list[str], scratch: Path, progress=print) -> list[ModelInput]:
    """Check every input (exporting checkpoints into ``scratch``) and return them dense first."""
    taken: set[str] = set()
    models = []
    for source, role in [(dense, "dense")] + [(m, "moe") for m in moes]:
        path = Path(source)
        if not path.is_dir():
            raise UserError(f"{source}: not a directory (give a Hugging Face export or a checkpoint iter_* dir)")
        label = _label(path, taken)
        taken.add(label)
        exported = False
        if not (path / "config.json").is_file():
            if not _is_checkpoint(path):
                raise UserError(f"{source} is neither a Hugging Face export (no config.json) nor a "
                                f"megatron-upcycle checkpoint (no {CHECKPOINT_META})")
            progress(f"bench-inference: exporting checkpoint {source} to Hugging Face format")
            path = export_checkpoint(path, scratch / label)
            exported = True
        models.append(describe_input(source, role, path, label, exported))
    check_same_vocabulary(models)
    return models
