"""Tiny real models for the inference tests: Megatron GPTModels with random weights, saved as
checkpoints and exported through the project's exporter (Llama for dense, Mixtral for MoE)."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_upcycle.config.model import ModelConfig, MoEConfig

VOCAB = 320


def tiny_model(name: str = "infer-test") -> ModelConfig:
    return ModelConfig(name=name, num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                       seq_length=128)


def random_gpt(backend, model: ModelConfig, moe: MoEConfig | None, seed: int = 0):
    from megatron_upcycle.models import build_gpt_model

    gpt = build_gpt_model(model, moe, backend).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if name.endswith("layernorm.weight") else 0.05 * noise)
    return gpt


def save_tiny_checkpoint(backend, root: Path, model: ModelConfig, moe: MoEConfig | None, seed: int = 0,
                         tokenizer: str | None = None) -> Path:
    """A real torch_dist checkpoint (iter_0000001) of a random tiny model."""
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, save_checkpoint

    gpt = random_gpt(backend, model, moe, seed)
    record = CheckpointRecord("iter_0000001", 1, 128, 1e-3, "stable", "final")
    return Path(save_checkpoint(root / "checkpoints", record, gpt, None, None, {"iteration": 1},
                                CheckpointMeta(model, moe, iteration=1, tokens=128, tokenizer=tokenizer)))


def export_tiny(backend, out: Path, model: ModelConfig, moe: MoEConfig | None, seed: int = 0,
                tokenizer: str | None = None) -> Path:
    from megatron_upcycle.export import export_hf

    gpt = random_gpt(backend, model, moe, seed)
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    return export_hf(state, model, moe, out, tokenizer_json=tokenizer).out


def train_tokenizer(path: Path, vocab_size: int = 300, text: str = "the upcycled mixture of experts") -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 50, trainer)
    tok.save(str(path))
    return str(path)
