"""``upcycle export-hf CKPT OUT``: a checkpoint -> a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory."""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")
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
        help="export a checkpoint to a Hugging Face model directory (Llama for dense, Mixtral for MoE)",
        description="Write OUT (must not exist) with config.json, safetensors weights and the tokenizer, "
        "loadable with transformers' AutoModelForCausalLM.from_pretrained. Refuses MoE variants Mixtral "
        "cannot compute: pre-softmax routing (which top-1 uses), shared experts, mixed dense/MoE layers.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="one checkpoint directory (runs/<id>/checkpoints/iter_*)")
    parser.add_argument("out", metavar="OUT", help="output directory; must not exist")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None,
                     help="tokenizer.json (or a directory holding one); default: the one the checkpoint records")
    tok.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="split weights into shards of this size")
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


def run(args) -> int:
    from pathlib import Path

    import torch

    from megatron_upcycle.checkpoint import load_full_model_state, read_meta
    from megatron_upcycle.cli.args import check_output_dir
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.export import check_exportable, export_hf
    from megatron_upcycle.export.write import resolve_tokenizer_json
    from megatron_upcycle.parallel import destroy_distributed

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    check_output_dir(args.out, "OUT", must_not_exist=True)  # its parent must be a directory
    max_shard_size = parse_size(args.max_shard_size)
    # Refuse what cannot be exported before loading a possibly large checkpoint.
    recorded = read_meta(args.checkpoint)
    check_exportable(recorded.model, recorded.moe)
    tokenizer = _tokenizer_path(args, recorded.to_json())
    if tokenizer is not None:
        tokenizer = resolve_tokenizer_json(tokenizer)
    try:
        model, moe, state, _ = load_full_model_state(args.checkpoint)
    finally:
        destroy_distributed()
    export_hf(state, model, moe, out, tokenizer_json=tokenizer, dtype=getattr(torch, args.dtype),
              max_shard_size=max_shard_size)
    kind = "MixtralForCausalLM" if moe is not None else "LlamaForCausalLM"
    print(f"wrote {kind} to {out}" + ("" if tokenizer else " (no tokenizer)"))
    return 0
