"""The CPU-side work of check group 4: convert, export to Hugging Face and compare logits.

Called in-process by a lone CPU battery, and otherwise in a fresh process with the GPUs
hidden (the converter and the exporter are CPU tools):

    CUDA_VISIBLE_DEVICES= python -m megatron_upcycle.selftest.offline convert RESULT.json DENSE OUT E K
    CUDA_VISIBLE_DEVICES= python -m megatron_upcycle.selftest.offline export  RESULT.json MOE OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

# Exported logits vs Megatron's, fp32 on CPU: two implementations of the same sums
# (tests/test_export_hf.py holds the exporter to 1e-4 as well).
EXPORT_TOLERANCE = 1e-4


def convert(dense: str, out: str, experts: str, topk: str) -> dict:
    from megatron_upcycle.config.model import MoEConfig
    from megatron_upcycle.upcycle import convert_dense_to_moe

    result = convert_dense_to_moe(dense, out, MoEConfig(num_experts=int(experts), topk=int(topk)))
    return dict(result.report.to_dict(), status=result.status, out=str(result.out),
                write_seconds=result.write_seconds, tensor_bytes=result.tensor_bytes)


def export(moe_checkpoint: str, out: str) -> dict:
    import torch
    import transformers

    from megatron_upcycle.checkpoint import load_full_model_state, load_model
    from megatron_upcycle.export import export_hf
    from megatron_upcycle.parallel import single_process_groups

    model, moe, state, meta = load_full_model_state(moe_checkpoint)
    tokenizer = meta.get("tokenizer")
    tokenizer = tokenizer if tokenizer and Path(tokenizer).exists() else None
    exported = export_hf(state, model, moe, out, tokenizer_json=tokenizer)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    tokens = torch.randint(0, model.vocab_size, (2, model.seq_length), generator=torch.Generator().manual_seed(1))
    with single_process_groups():
        megatron, _ = load_model(moe_checkpoint)
        megatron.eval()
        with torch.no_grad():
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            expected = megatron(tokens, positions, None)
    with torch.no_grad():
        got = hf.eval()(tokens).logits
    scale = float(expected.abs().max())
    delta = float((got.double() - expected.double()).abs().max())
    bound = EXPORT_TOLERANCE * max(1.0, scale)
    return {"architecture": type(hf).__name__, "format": exported.format, "transformers": transformers.__version__,
            "out": out,
            "tokenizer": tokenizer, "logit_max_abs": delta, "logit_scale": scale, "tolerance": bound,
            "loading_problems": {k: list(map(str, v))[:5] for k, v in problems.items()},
            "passed": not problems and delta <= bound}


MODES = {"convert": convert, "export": export}


def main(argv=None) -> int:
    from megatron_upcycle.atomic import write_json_atomic
    from megatron_upcycle.upcycle.groups import hide_gpus_in_fresh_process

    argv = sys.argv[1:] if argv is None else argv
    mode, result_file, args = argv[0], argv[1], argv[2:]
    hide_gpus_in_fresh_process()
    write_json_atomic(result_file, MODES[mode](*args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
