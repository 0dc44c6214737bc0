"""Hugging Face export: a real Megatron GPTModel and the exported Llama/Mixtral/Qwen2-MoE compute the same logits."""
from __future__ import annotations

import json
import re

import pytest
import torch

from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.errors import CheckpointError, ConfigError, UserError
from megatron_upcycle.export import ExportVerificationError, export_hf, megatron_to_hf, read_export, split_qkv
from conftest import run_cli

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 512, 64


def tiny_model(num_query_groups: int | None = None) -> ModelConfig:
    # rotary_base and norm_epsilon differ from both libraries' defaults so the config mapping is tested.
    return ModelConfig(name="export-test", num_layers=2, hidden_size=64, num_attention_heads=4,
                       num_query_groups=num_query_groups, vocab_size=VOCAB, seq_length=SEQ, rotary_base=5000,
                       norm_epsilon=1e-6)


def random_megatron(backend, model: ModelConfig, moe: MoEConfig | None, seed: int = 0):
    """A Megatron GPTModel with every weight random, norms and router included (eval mode)."""
    from megatron_upcycle.models import build_gpt_model

    gpt = build_gpt_model(model, moe, backend).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("layernorm.weight"):
                param.copy_(1 + 0.3 * noise)
            elif "router" in name:
                param.copy_(0.5 * noise)  # spread router logits: no near-ties between the k-th and k+1-th expert
            else:
                param.copy_(0.08 * noise)
    return gpt


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def megatron_logits(gpt, toks: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(toks.shape[1]).expand_as(toks)
    with torch.no_grad():
        return gpt(toks, positions, attention_mask=None)  # [b, s, V] when no labels are given


def hf_logits(out_dir, toks: torch.Tensor) -> torch.Tensor:
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    # Anything missing would be silently random-initialised by transformers.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return hf.eval()(toks).logits


def state_of(gpt) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}


CASES = {  # name: (query groups, MoE, the format auto must choose)
    "dense-mha": (None, None, "llama"),
    "dense-gqa": (2, None, "llama"),
    "moe-4x-top2-gqa": (2, MoEConfig(num_experts=4, topk=2), "mixtral"),
    "moe-8x-top3": (None, MoEConfig(num_experts=8, topk=3), "mixtral"),
    "moe-granular-2": (None, MoEConfig(num_experts=8, topk=2, granularity=2), "mixtral"),
    # What Mixtral cannot express: Qwen2-MoE.
    "top1-gqa": (2, MoEConfig(num_experts=4, topk=1), "qwen2_moe"),
    "top2-pre-softmax": (None, MoEConfig(num_experts=8, topk=2, router_pre_softmax=True), "qwen2_moe"),
    "shared-expert": (2, MoEConfig(num_experts=4, topk=2, shared_expert=True), "qwen2_moe"),
    "mixed-layers": (None, MoEConfig(num_experts=4, topk=2, layers=[1]), "qwen2_moe"),
    "top1-shared-every-other-granular": (
        None, MoEConfig(num_experts=8, topk=1, granularity=2, shared_expert=True, layers="every_other"), "qwen2_moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_computes_the_megatron_logits(megatron_cpu, tmp_path, case):
    groups, moe, fmt = CASES[case]
    model = tiny_model(groups)
    gpt = random_megatron(megatron_cpu, model, moe)
    toks = tokens()
    result = export_hf(state_of(gpt), model, moe, tmp_path / "hf")
    assert (result.format, result.status, result.check.passed) == (fmt, "ok", True)
    expected, got = megatron_logits(gpt, toks), hf_logits(result.out, toks)
    assert got.shape == expected.shape == (2, SEQ, VOCAB)
    assert expected.abs().max() > 1.0  # logits far from trivial
    assert (got - expected).abs().max().item() <= 1e-4
    assert result.check.logit_max_abs <= 1e-4  # the export's own check agrees
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_qwen2_moe_can_also_express_what_mixtral_does(megatron_cpu, tmp_path):
    """Top-k-then-softmax is softmax, top-k, renormalise: Qwen2-MoE's norm_topk_prob=true."""
    model, moe = tiny_model(2), MoEConfig(num_experts=4, topk=2)
    gpt = random_megatron(megatron_cpu, model, moe)
    result = export_hf(state_of(gpt), model, moe, tmp_path / "hf", fmt="qwen2_moe")
    assert result.architecture == "Qwen2MoeForCausalLM" and result.reason == "requested"
    config = json.loads((result.out / "config.json").read_text())
    # No shared expert: one neuron of zeros, adding exactly 0 (zero-wide would break vLLM's loader).
    assert config["norm_topk_prob"] is True and config["shared_expert_intermediate_size"] == 1
    toks = tokens(seed=2)
    assert (hf_logits(result.out, toks) - megatron_logits(gpt, toks)).abs().max().item() <= 1e-4
    shared = transformers.AutoModelForCausalLM.from_pretrained(result.out).model.layers[0].mlp.shared_expert
    assert all(not p.any() for p in shared.parameters())


def test_qwen2_moe_config_and_shared_expert_gate(megatron_cpu, tmp_path):
    model = tiny_model(2)
    moe = MoEConfig(num_experts=4, topk=1, shared_expert=True, layers="every_other", aux_loss_coeff=0.01)
    gpt = random_megatron(megatron_cpu, model, moe)
    result = export_hf(state_of(gpt), model, moe, tmp_path / "hf")
    config = json.loads((result.out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) == (4, 1, False)
    assert (config["mlp_only_layers"], config["decoder_sparse_step"]) == ([1], 1)
    assert (config["intermediate_size"], config["moe_intermediate_size"]) == (256, 256)
    assert config["shared_expert_intermediate_size"] == 256 and config["router_aux_loss_coef"] == 0.01
    assert config["qkv_bias"] is True and config["use_sliding_window"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.out)
    block = hf.model.layers[0].mlp
    # Gate weight zero: sigmoid(0) = 1/2 for every token; the down projection carries the factor 2.
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros(1, 64))
    megatron_down = gpt.decoder.layers[0].mlp.shared_experts.linear_fc2.weight
    assert torch.equal(block.shared_expert.down_proj.weight, 2 * megatron_down)
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.bias, torch.zeros(64))
    assert type(hf.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"


def test_config_fields(megatron_cpu, tmp_path):
    model = tiny_model(2)
    moe = MoEConfig(num_experts=8, topk=2, granularity=2, aux_loss_coeff=0.01)
    out = export_hf(state_of(random_megatron(megatron_cpu, model, moe)), model, moe, tmp_path / "hf").out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta (else it falls back to 1e6).
    assert config["rope_parameters"]["rope_theta"] == 5000 and config["rope_theta"] == 5000
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 128)
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["router_aux_loss_coef"] == 0.01 and config["output_router_logits"] is False
    assert config["rms_norm_eps"] == 1e-6 and config["max_position_embeddings"] == SEQ
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == VOCAB
    # On disk: the Hub's per-expert Mixtral format (w1 gate, w3 up, w2 down), which transformers 4 and 5 read.
    index_keys = _safetensors_keys(out / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in index_keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in index_keys


def _safetensors_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_te_key_names_give_the_same_export(megatron_cpu):
    """TransformerEngine specs fuse norms into the next linear and group the experts' weights."""
    model, moe = tiny_model(2), MoEConfig(num_experts=4, topk=2)
    local = state_of(random_megatron(megatron_cpu, model, moe))
    te = {}
    for key, value in local.items():
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        key = key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        key = re.sub(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", r"experts.\2.weight\1", key)
        te[key] = value
    assert "decoder.layers.0.mlp.experts.linear_fc2.weight3" in te
    _, from_local = megatron_to_hf(local, model, moe)
    _, from_te = megatron_to_hf(te, model, moe)
    assert from_local.keys() == from_te.keys()
    assert all(torch.equal(from_local[k], from_te[k]) for k in from_local)


def test_split_qkv_follows_megatrons_per_group_layout():
    heads, groups, hd = 4, 2, 3
    # Row labels: group g holds [q(2g), q(2g+1), k(g), v(g)], each head hd rows.
    labels = []
    for g in range(groups):
        labels += [f"q{2 * g}", f"q{2 * g + 1}", f"k{g}", f"v{g}"]
    codes = {name: i for i, name in enumerate(sorted(set(labels)))}
    qkv = torch.tensor([[codes[name]] for name in labels for _ in range(hd)], dtype=torch.float32)
    q, k, v = split_qkv(qkv, heads, groups, hd)
    decode = {i: name for name, i in codes.items()}
    assert [decode[int(x)] for x in q[::hd, 0]] == ["q0", "q1", "q2", "q3"]
    assert [decode[int(x)] for x in k[::hd, 0]] == ["k0", "k1"]
    assert [decode[int(x)] for x in v[::hd, 0]] == ["v0", "v1"]


def test_every_source_tensor_is_used_and_shape_checked(megatron_cpu):
    model = tiny_model()
    state = state_of(random_megatron(megatron_cpu, model, None))
    with pytest.raises(CheckpointError, match="does not map: decoder.layers.0.extra"):
        megatron_to_hf({**state, "decoder.layers.0.extra.weight": torch.zeros(1)}, model, None)
    bad = dict(state, **{"decoder.layers.1.self_attention.linear_qkv.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match=r"linear_qkv.weight' has shape \(64, 64\).*\(192, 64\)"):
        megatron_to_hf(bad, model, None)
    missing = {k: v for k, v in state.items() if k != "output_layer.weight"}
    with pytest.raises(CheckpointError, match="no 'output_layer.weight'"):
        megatron_to_hf(missing, model, None)
    # An MoE config against a dense state dict.
    with pytest.raises(CheckpointError, match="mlp.router.weight"):
        megatron_to_hf(state, model, MoEConfig(num_experts=4, topk=2))


@pytest.mark.parametrize("moe, fmt, message", [
    (MoEConfig(num_experts=4, topk=2, router_pre_softmax=True), "mixtral",
     "router_pre_softmax=true weights each chosen expert"),
    (MoEConfig(num_experts=8, topk=1), "mixtral", r"router_pre_softmax=true \(the MoE config's rule for topk=1\)"),
    (MoEConfig(num_experts=4, topk=2, shared_expert=True), "mixtral", "no shared expert"),
    (MoEConfig(num_experts=4, topk=2, layers="every_other"), "mixtral", "mixes dense and MoE layers"),
    (MoEConfig(num_experts=4, topk=2, layers=[1]), "mixtral", "mixes dense and MoE layers"),
    (MoEConfig(num_experts=4, topk=2), "llama", "LlamaForCausalLM has no experts"),
    (None, "qwen2_moe", "the checkpoint is dense; a dense model exports as llama"),
    (None, "mistral", "--format must be one of auto, llama, mixtral, qwen2_moe; got 'mistral'"),
])
def test_refuses_a_format_that_cannot_compute_the_model(tmp_path, moe, fmt, message):
    with pytest.raises(ConfigError, match=message):
        export_hf({}, tiny_model(), moe, tmp_path / "hf", fmt=fmt)
    assert not list(tmp_path.iterdir())


def test_a_failed_check_leaves_out_failed(megatron_cpu, tmp_path, monkeypatch):
    """The transformers-4 bug this export fixes, made on purpose: a config whose RoPE base is wrong."""
    from megatron_upcycle.export import compat, write

    def wrong_rope(out_dir):
        compat.make_portable(out_dir)
        config = json.loads((out_dir / "config.json").read_text())
        config["rope_parameters"]["rope_theta"] = 10000.0
        (out_dir / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(write, "make_portable", wrong_rope)
    model = tiny_model()
    with pytest.raises(ExportVerificationError, match="export verification failed") as caught:
        export_hf(state_of(random_megatron(megatron_cpu, model, None)), model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    failed = caught.value.result.out
    assert failed == tmp_path / "hf.failed" and caught.value.result.status == "failed"
    marker = json.loads((failed / "VERIFICATION_FAILED.json").read_text())
    assert marker["passed"] is False and marker["logit_max_abs"] > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.failed"]


def test_existing_output_is_not_overwritten(megatron_cpu, tmp_path):
    model = tiny_model()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_hf(state_of(random_megatron(megatron_cpu, model, None)), model, None, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def train_tokenizer(path, vocab_size: int = 300) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the upcycled mixture of experts reproduces the dense model at step zero"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return str(path)


def test_tokenizer_is_exported_and_loadable(megatron_cpu, tmp_path):
    from tokenizers import Tokenizer

    tok_path = train_tokenizer(tmp_path / "tokenizer.json")
    model = tiny_model()
    out = export_hf(state_of(random_megatron(megatron_cpu, model, None)), model, None, tmp_path / "hf",
                    tokenizer_json=tok_path).out
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    text = "the dense model reproduces experts"
    assert loaded(text)["input_ids"] == Tokenizer.from_file(tok_path).encode(text).ids
    assert loaded.eos_token == "<|endoftext|>" and loaded.unk_token == "<unk>"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == loaded.eos_token_id == 1
    # No bos/pad in the tokenizer: its end-of-text token (Megatron's document separator) is both.
    assert config["bos_token_id"] == config["pad_token_id"] == 1 == loaded.pad_token_id == loaded.bos_token_id
    assert loaded.model_max_length == SEQ
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    assert json.loads((out / "megatron_upcycle_export.json").read_text())["tokenizer_vocab_size"] == len(loaded)


def test_tokenizer_larger_than_the_vocab_is_refused(megatron_cpu, tmp_path):
    tok_path = train_tokenizer(tmp_path / "tokenizer.json", vocab_size=300)
    model = ModelConfig(name="small-vocab", num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256,
                        seq_length=SEQ)
    with pytest.raises(ConfigError, match="tokenizer has 300 tokens but model 'small-vocab' has vocab_size 256"):
        export_hf(state_of(random_megatron(megatron_cpu, model, None)), model, None, tmp_path / "hf",
                  tokenizer_json=tok_path)
    assert not (tmp_path / "hf").exists()


def test_sharded_bf16_export(megatron_cpu, tmp_path):
    model, moe = tiny_model(2), MoEConfig(num_experts=4, topk=2)
    gpt = random_megatron(megatron_cpu, model, moe)
    result = export_hf(state_of(gpt), model, moe, tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="200KB")
    out = result.out
    assert result.check.passed  # checked against the Megatron model with bf16-rounded weights
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _, expected = megatron_to_hf(state_of(gpt), model, moe)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16).float()), key


def test_cli_exports_a_saved_checkpoint(megatron_cpu, tmp_path):
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, save_checkpoint

    model, moe = tiny_model(2), MoEConfig(num_experts=4, topk=2)
    gpt = random_megatron(megatron_cpu, model, moe, seed=3)
    tok_path = train_tokenizer(tmp_path / "tokenizer.json")
    record = CheckpointRecord("iter_0000005", 5, 640, 1e-3, "stable", "final")
    ckpt = save_checkpoint(tmp_path / "checkpoints", record, gpt, None, None, {"iteration": 5},
                           CheckpointMeta(model, moe, iteration=5, tokens=640, tokenizer=tok_path))
    result = run_cli("export-hf", str(ckpt), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote MixtralForCausalLM (--format mixtral, auto: " in result.stdout
    assert "verified: transformers" in result.stdout and ": PASS" in result.stdout
    toks = tokens(seed=4)
    assert (hf_logits(tmp_path / "hf", toks) - megatron_logits(gpt, toks)).abs().max().item() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|endoftext|>"

    again = run_cli("export-hf", str(ckpt), str(tmp_path / "hf"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_cli_refuses_before_loading(tmp_path):
    from megatron_upcycle.checkpoint import CheckpointMeta

    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()  # metadata only: the refusal must come before any weight is read
    CheckpointMeta(tiny_model(), MoEConfig(num_experts=4, topk=2, shared_expert=True)).write(ckpt)
    result = run_cli("export-hf", str(ckpt), str(tmp_path / "hf"), "--format", "mixtral")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "upcycle: error: cannot export to MixtralForCausalLM (--format mixtral): Mixtral has no shared expert "
        "(moe.shared_expert=true)"
    ]
    unknown = run_cli("export-hf", str(ckpt), str(tmp_path / "hf"), "--format", "mistral")
    assert unknown.returncode == 2 and "invalid choice: 'mistral'" in unknown.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "hf").exists()


def test_cli_exports_a_converted_top1_model(megatron_cpu, tmp_path):
    """The paper's inference case: the real converter's top-1 MoE, exported by auto as Qwen2-MoE."""
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, load_model, save_checkpoint

    model = tiny_model()
    dense = random_megatron(megatron_cpu, model, None, seed=5)
    record = CheckpointRecord("iter_0000002", 2, 256, 1e-3, "stable", "final")
    ckpt = save_checkpoint(tmp_path / "dense", record, dense, None, None, {"iteration": 2},
                           CheckpointMeta(model, None, iteration=2, tokens=256))
    converted = run_cli("convert", "--dense", str(ckpt), "--out", str(tmp_path / "moe"), "--experts", "4",
                        "--topk", "1", "--shared-expert")
    assert converted.returncode == 0, converted.stderr[-3000:]

    refused = run_cli("export-hf", str(tmp_path / "moe"), str(tmp_path / "mixtral"), "--format", "mixtral")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "router_pre_softmax=true (the MoE config's rule for topk=1)" in refused.stderr

    result = run_cli("export-hf", str(tmp_path / "moe"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote Qwen2MoeForCausalLM (--format qwen2_moe, auto: not mixtral: router_pre_softmax" in result.stdout
    assert read_export(tmp_path / "hf").verified is True
    moe_gpt, _ = load_model(tmp_path / "moe")
    toks = tokens(seed=6)
    assert (hf_logits(tmp_path / "hf", toks) - megatron_logits(moe_gpt.eval(), toks)).abs().max().item() <= 1e-4

    # An export where a checkpoint belongs, and a checkpoint where an export belongs: one line each.
    again = run_cli("export-hf", str(tmp_path / "hf"), str(tmp_path / "hf2"))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"upcycle: error: {tmp_path / 'hf'} is a Hugging Face export, not a checkpoint: pass a checkpoint's "
        "iter_* directory"]
    with pytest.raises(UserError, match="is a Megatron checkpoint, not a Hugging Face export"):
        read_export(tmp_path / "moe")
    with pytest.raises(UserError, match="not a Hugging Face export \\(no config.json\\)"):
        read_export(tmp_path)


def test_cli_format_choices_are_the_exporters():
    from megatron_upcycle.cli import export_hf as cli
    from megatron_upcycle.export import FORMAT_CHOICES

    assert cli.FORMAT_CHOICES == FORMAT_CHOICES
