"""What ``upcycle eval`` evaluates: a Hugging Face model directory, or a Megatron
checkpoint exported to a temporary one by the verified exporter (megatron_upcycle.export)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from megatron_upcycle.errors import UserError


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_source(path: str | Path) -> str:
    """'hf' or 'megatron' for a model ``path``, or a UserError saying what it is not (cheap: no weights read)."""
    from megatron_upcycle.checkpoint import read_meta
    from megatron_upcycle.export import check_exportable

    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if is_hf_dir(path):
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"{path} has a config.json but no weights (*.safetensors); not a model")
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise UserError(f"{path} has no tokenizer; the harness needs one (export with a tokenizer)")
        return "hf"
    try:
        meta = read_meta(path)
    except UserError as exc:
        raise UserError(f"{path} is neither a Hugging Face model directory (config.json) nor a Megatron "
                        f"checkpoint: {exc}") from None
    check_exportable(meta.model, meta.moe)
    if meta.tokenizer is None or not Path(meta.tokenizer).is_file():
        raise UserError(f"checkpoint {path} records no tokenizer that exists here ({meta.tokenizer}); "
                        "export it with `upcycle export-hf --tokenizer` and evaluate the export")
    return "megatron"


@contextlib.contextmanager
def hf_model_dir(path: str | Path, work_dir: str | Path | None = None, log=print):
    """A Hugging Face directory for ``path`` for the body; a temporary export is removed after."""
    path = Path(path)
    if check_source(path) == "hf":
        yield path
        return
    from megatron_upcycle.checkpoint import load_full_model_state, read_meta
    from megatron_upcycle.export import export_hf
    from megatron_upcycle.parallel import destroy_distributed

    meta = read_meta(path)
    tmp = Path(tempfile.mkdtemp(prefix=".eval-export-", dir=work_dir))
    try:
        try:
            model, moe, state, _ = load_full_model_state(path)
        finally:
            destroy_distributed()
        out = export_hf(state, model, moe, tmp / "hf", tokenizer_json=meta.tokenizer).out
        del state
        log(f"exported {path} to a temporary Hugging Face directory")
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
