"""Hugging Face export: Megatron GPTModel state dicts -> Llama / Mixtral / Qwen2-MoE directories, verified."""
from megatron_upcycle.export.check import ExportCheck
from megatron_upcycle.export.formats import ARCHITECTURES, FORMAT_CHOICES, FORMATS, choose_format
from megatron_upcycle.export.hf import check_exportable, hf_config, megatron_to_hf, split_qkv
from megatron_upcycle.export.read import ExportInfo, read_export
from megatron_upcycle.export.write import ExportResult, ExportVerificationError, export_hf, load_tokenizer

__all__ = [
    "ARCHITECTURES", "FORMATS", "FORMAT_CHOICES", "ExportCheck", "ExportInfo", "ExportResult",
    "ExportVerificationError", "check_exportable", "choose_format", "export_hf", "hf_config", "load_tokenizer",
    "megatron_to_hf", "read_export", "split_qkv",
]
