"""The exports read by transformers 4.57 compute the Megatron logits too (config.json for 4 and 5).

transformers 4.57 lives in a second, small environment the suite makes on first
use: ``pip install --target .venv/tf4-site`` of only the packages that differ from
the main venv (transformers, huggingface_hub < 1, tokenizers < 0.23) or that hub 0.x
needs and the main venv lacks (requests and its dependencies); torch, numpy and
safetensors come from the main venv. A subprocess with that directory first on
PYTHONPATH loads each export (tests/tf4_probe.py). Installed once (about 10 s),
then reused.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO
from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.export import export_hf
from test_export_hf import SEQ, megatron_logits, random_megatron, state_of, tiny_model, tokens, train_tokenizer

TF4_SITE = REPO / ".venv" / "tf4-site"
TF4_VERSION = "4.57"
TF4_PACKAGES = [
    f"transformers=={TF4_VERSION}.*", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<0.23",
    "requests", "urllib3", "certifi", "charset-normalizer", "idna",
]


def _tf4_version(site) -> str:
    probe = subprocess.run([PYTHON, "-c", "import transformers; print(transformers.__version__)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() if probe.returncode == 0 else f"unimportable: {probe.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def tf4_site():
    """.venv/tf4-site holding transformers 4.57 (installed here once; concurrent sessions wait for it)."""
    TF4_SITE.parent.mkdir(exist_ok=True)
    with open(TF4_SITE.parent / "tf4-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (TF4_SITE / ".complete").is_file():
            tmp = TF4_SITE.with_name(f".tf4-site-tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            install = subprocess.run(
                [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--timeout", "30",
                 "--retries", "1", "--target", str(tmp), *TF4_PACKAGES],
                capture_output=True, text=True, timeout=900)
            if install.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                last = (install.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"could not install transformers {TF4_VERSION} from the package index (is PyPI "
                            f"reachable?): {last}")
            (tmp / ".complete").write_text(" ".join(TF4_PACKAGES) + "\n")
            shutil.rmtree(TF4_SITE, ignore_errors=True)
            os.replace(tmp, TF4_SITE)
    version = _tf4_version(TF4_SITE)
    assert version.startswith(TF4_VERSION + "."), version
    return TF4_SITE


VARIANTS = {  # name: (query groups, MoE, format)
    "dense": (2, None, "llama"),
    "mixtral-top2": (2, MoEConfig(num_experts=4, topk=2), "mixtral"),
    "qwen2-top1-shared-mixed": (None, MoEConfig(num_experts=4, topk=1, shared_expert=True, layers=[0]), "qwen2_moe"),
    "qwen2-top2-pre-softmax-granular": (
        2, MoEConfig(num_experts=8, topk=2, granularity=2, router_pre_softmax=True), "qwen2_moe"),
    "qwen2-renormalised-top2": (None, MoEConfig(num_experts=4, topk=2), "qwen2_moe"),
}


def test_transformers_4_reads_every_export(megatron_cpu, tf4_site, tmp_path):
    from tokenizers import Tokenizer

    tok_path = train_tokenizer(tmp_path / "tokenizer.json")
    toks = tokens(seed=7)
    torch.save(toks, tmp_path / "tokens.pt")
    exports, expected = [], {}
    for index, (name, (groups, moe, fmt)) in enumerate(VARIANTS.items()):
        model = tiny_model(groups)
        gpt = random_megatron(megatron_cpu, model, moe, seed=10 + index)
        dtype = torch.bfloat16 if name == "mixtral-top2" else torch.float32  # one export in bf16
        result = export_hf(state_of(gpt), model, moe, tmp_path / name, tokenizer_json=tok_path, fmt=fmt, dtype=dtype)
        assert result.check.passed
        if dtype != torch.float32:  # the reference for a bf16 export: the Megatron model with bf16 weights
            with torch.no_grad():
                for param in gpt.parameters():
                    param.copy_(param.to(dtype).float())
        exports.append(str(result.out))
        expected[str(result.out)] = megatron_logits(gpt, toks)

    env = dict(os.environ, PYTHONPATH=str(tf4_site), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "tf4_probe.py"), str(tmp_path / "tokens.pt"),
                           str(tmp_path / "tf4.json"), *exports], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tf4.json").read_text())
    assert report["transformers"].startswith(TF4_VERSION + ".") and str(tf4_site) in report["file"]

    ids = Tokenizer.from_file(tok_path).encode("the dense model reproduces experts").ids
    classes = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
    for (name, (_, _, fmt)), export in zip(VARIANTS.items(), exports):
        seen = report["exports"][export]
        assert seen["class"] == classes[fmt], name
        assert seen["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, name
        assert seen["rope_theta"] == 5000.0, name  # without rope_theta 4.x would use 1e4 / 1e6
        got = torch.load(seen["logits"])
        assert (got - expected[export]).abs().max().item() <= 1e-4, name
        assert seen["tokenizer"] == {"class": "PreTrainedTokenizerFast", "model_max_length": SEQ, "bos_token_id": 1,
                                     "eos_token_id": 1, "pad_token_id": 1, "ids": ids}, name


def test_the_probe_fails_loudly_without_the_portable_config(megatron_cpu, tf4_site, tmp_path):
    """Control: the config as transformers 5 alone writes it gives transformers 4 the wrong RoPE base."""
    model, moe = tiny_model(2), MoEConfig(num_experts=4, topk=2)
    gpt = random_megatron(megatron_cpu, model, moe, seed=3)
    out = export_hf(state_of(gpt), model, moe, tmp_path / "hf").out
    config = json.loads((out / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    toks = tokens(seed=8)
    torch.save(toks, tmp_path / "tokens.pt")
    env = dict(os.environ, PYTHONPATH=str(tf4_site), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "tf4_probe.py"), str(tmp_path / "tokens.pt"),
                           str(tmp_path / "tf4.json"), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "tf4.json").read_text())["exports"][str(out)]
    assert seen["rope_theta"] == 1e6  # Mixtral's default in transformers 4
    assert (torch.load(seen["logits"]) - megatron_logits(gpt, toks)).abs().max().item() > 1e-3
