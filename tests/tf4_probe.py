"""Run under transformers 4.x (PYTHONPATH=<tf4 site> first): load exports, write their logits.

    python tests/tf4_probe.py TOKENS.pt RESULT.json EXPORT_DIR...

For each export: AutoModelForCausalLM + AutoTokenizer (when it has one), fp32
logits on TOKENS (saved as EXPORT_DIR-named .pt files next to RESULT.json) and what
transformers read from the config. Imports nothing from megatron_upcycle.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def probe(export: Path, tokens: torch.Tensor, logits_path: Path) -> dict:
    config = AutoConfig.from_pretrained(export)
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        torch.save(model.eval()(tokens).logits.float(), logits_path)
    result = {
        "class": type(model).__name__,
        "rope_theta": getattr(config, "rope_theta", None),
        "loading": {k: sorted(v) for k, v in info.items() if k != "error_msgs"},
        "logits": str(logits_path),
    }
    if (export / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(export)
        result["tokenizer"] = {
            "class": type(tok).__name__, "model_max_length": tok.model_max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "ids": tok("the dense model reproduces experts")["input_ids"],
        }
    return result


def main() -> None:
    tokens = torch.load(sys.argv[1])
    out = Path(sys.argv[2])
    results = {"transformers": transformers.__version__, "file": transformers.__file__, "exports": {}}
    for i, export in enumerate(sys.argv[3:]):
        results["exports"][export] = probe(Path(export), tokens, out.with_name(f"logits{i}.pt"))
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
