"""Reading an export back: what a directory holds, refused in one line when it is not an export."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_upcycle.errors import UserError
from megatron_upcycle.export.formats import ARCHITECTURES
from megatron_upcycle.export.write import PROVENANCE_FILE


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    architecture: str  # e.g. Qwen2MoeForCausalLM
    format: str  # llama, mixtral or qwen2_moe
    vocab_size: int
    has_tokenizer: bool
    verified: bool | None  # None: not written by this project, or written with --no-verify
    config: dict = field(repr=False)
    provenance: dict | None = field(repr=False, default=None)


def read_export(path: str | os.PathLike) -> ExportInfo:
    """The export at ``path``; a UserError naming the problem when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a Hugging Face export (not a directory)")
    if (path / "upcycle_meta.json").is_file():
        raise UserError(f"{path} is a Megatron checkpoint, not a Hugging Face export: `upcycle export-hf` it first")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: not a Hugging Face export (no config.json)")
    try:
        config = json.loads(config_path.read_text())
        architecture = config["architectures"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{config_path}: not a transformers model config ({exc!r})") from None
    formats = {arch: fmt for fmt, arch in ARCHITECTURES.items()}
    if architecture not in formats:
        raise UserError(f"{path}: architecture {architecture} is not one this project exports "
                        f"({', '.join(ARCHITECTURES.values())})")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights; not a finished export")
    provenance = None
    if (path / PROVENANCE_FILE).is_file():
        try:
            provenance = json.loads((path / PROVENANCE_FILE).read_text())
        except ValueError as exc:
            raise UserError(f"{path / PROVENANCE_FILE}: unreadable ({exc})") from None
    verification = (provenance or {}).get("verification")
    return ExportInfo(
        path=path, architecture=architecture, format=formats[architecture], vocab_size=int(config["vocab_size"]),
        has_tokenizer=(path / "tokenizer.json").is_file(),
        verified=bool(verification["passed"]) if verification else None, config=config, provenance=provenance,
    )
