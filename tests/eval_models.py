"""A tiny real Megatron dense checkpoint with a BPE tokenizer, for the eval tests."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512


def train_code_tokenizer(path: Path) -> str:
    """A byte-level BPE over a few stdlib files (the shipped tasks are Python code)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_upcycle.data.corpus import stdlib_sources

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [s.path.read_text(errors="replace") for s in stdlib_sources(max_bytes=200_000)]
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def tiny_dense_checkpoint(backend, out: Path, seed: int = 0) -> Path:
    """A saved 2-layer d=64 Megatron GPTModel checkpoint (random weights) recording its tokenizer."""
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, save_checkpoint
    from megatron_upcycle.config.model import ModelConfig
    from megatron_upcycle.models import build_gpt_model

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_code_tokenizer(out / "tokenizer.json")
    model = ModelConfig(name="eval-test", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                        seq_length=512)
    gpt = build_gpt_model(model, None, backend).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen) if name.endswith("layernorm.weight")
                        else 0.05 * torch.randn(param.shape, generator=gen))
    record = CheckpointRecord("iter_0000005", 5, 640, 1e-3, "decay", "final")
    return save_checkpoint(out / "checkpoints", record, gpt, None, None, {"iteration": 5},
                           CheckpointMeta(model, None, iteration=5, tokens=640, tokenizer=tokenizer))
