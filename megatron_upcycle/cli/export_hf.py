"""``upcycle export-hf CKPT OUT [--format auto|llama|mixtral|qwen2_moe]``: a checkpoint -> a verified Hugging Face directory."""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")
FORMAT_CHOICES = ("auto", "llama", "mixtral", "qwen2_moe")  # export.formats.FORMAT_CHOICES, without importing torch
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '2e9' -> bytes; a UserError naming the value otherwise.

    Checked here, before the checkpoint is loaded: transformers would only
    reject a bad size after the whole model had been built.
    """
    import re

    from megatron_upcycle.errors import UserError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise UserError(f"--max-shard-size '{text}' is not a size; give a number with a unit, e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise UserError(f"--max-shard-size must be at least 1 byte, got '{text}'")
    return size


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-hf",
        help="export a checkpoint to a Hugging Face model directory (Llama, Mixtral or Qwen2-MoE), verified",
        description="Write OUT (must not exist) with config.json, safetensors weights and the tokenizer, "
        "loadable with AutoModelForCausalLM.from_pretrained of transformers 4.4x-4.57 and 5.x. --format auto "
        "picks the simplest class that computes the checkpoint exactly: llama (dense), mixtral (every layer "
        "MoE, top-k-then-softmax, no shared expert), else qwen2_moe (top-1 and softmax-then-top-k routing, "
        "shared expert, mixed dense/MoE layers). The written directory is loaded back and its logits compared "
        "with the Megatron model's; a failed check leaves OUT.failed and exits 1.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="one checkpoint directory (runs/<id>/checkpoints/iter_*)")
    parser.add_argument("out", metavar="OUT", help="output directory; must not exist")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None,
                     help="tokenizer.json (or a directory holding one); default: the one the checkpoint records")
    tok.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="split weights into shards of this size")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                        help="target class; auto: the simplest exact one (printed)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip loading the export back and comparing its logits with the Megatron model's")
    parser.set_defaults(run=run)


def _tokenizer_path(args, meta: dict) -> str | None:
    from pathlib import Path

    from megatron_upcycle.errors import UserError

    if args.no_tokenizer:
        return None
    if args.tokenizer is not None:
        return args.tokenizer
    recorded = meta.get("tokenizer")
    if recorded is None:
        return None
    if not Path(recorded).exists():
        raise UserError(
            f"the checkpoint's tokenizer {recorded} does not exist here; pass --tokenizer PATH or --no-tokenizer"
        )
    return recorded


def _refuse_hf_export(path) -> None:
    """An HF export passed where a checkpoint is expected: say so, not 'no upcycle_meta.json'."""
    from pathlib import Path

    from megatron_upcycle.errors import UserError

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "upcycle_meta.json").is_file():
        raise UserError(f"{path} is a Hugging Face export, not a checkpoint: pass a checkpoint's iter_* directory")


def run(args) -> int:
    import sys
    from pathlib import Path

    import torch

    from megatron_upcycle.checkpoint import load_full_model_state, read_meta
    from megatron_upcycle.cli.args import check_output_dir
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.export import ExportVerificationError, check_exportable, export_hf
    from megatron_upcycle.export.write import resolve_tokenizer_json
    from megatron_upcycle.parallel import destroy_distributed

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    check_output_dir(args.out, "OUT", must_not_exist=True)  # its parent must be a directory
    max_shard_size = parse_size(args.max_shard_size)
    _refuse_hf_export(args.checkpoint)
    # Refuse what cannot be exported before loading a possibly large checkpoint.
    recorded = read_meta(args.checkpoint)
    check_exportable(recorded.model, recorded.moe, fmt=args.format)
    tokenizer = _tokenizer_path(args, recorded.to_json())
    if tokenizer is not None:
        tokenizer = resolve_tokenizer_json(tokenizer)
    try:
        model, moe, state, _ = load_full_model_state(args.checkpoint)
    finally:
        destroy_distributed()
    try:
        result = export_hf(state, model, moe, out, tokenizer_json=tokenizer, dtype=getattr(torch, args.dtype),
                           max_shard_size=max_shard_size, fmt=args.format, verify=not args.no_verify)
    except ExportVerificationError as exc:
        print(f"upcycle: error: {exc}", file=sys.stderr)
        return 1
    if result.check is not None:
        print(f"verified: {result.check.format()}")
    note = "" if tokenizer else " (no tokenizer)"
    note += "" if result.check is not None else " (not verified)"
    print(f"wrote {result.describe()} to {out}{note}")
    return 0
