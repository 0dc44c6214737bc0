"""``upcycle selftest``: the CPU battery end to end as a real subprocess, and its bookkeeping."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+) \((\d+\.\d) s\): (.+)$")


def selftest(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "megatron_upcycle.cli", "selftest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cpu_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "out"
    proc = selftest("--cpu", "--quick", "--out", str(out))
    return proc, out


def test_cpu_quick_battery_passes_every_check(cpu_quick):
    from megatron_upcycle.selftest.battery import CHECKS

    proc, out = cpu_quick
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    checks = [LINE.match(line) for line in lines if LINE.match(line)]
    assert [m.group(2) for m in checks] == [name for name, _, _ in CHECKS]
    assert all(m.group(1) == "PASS" for m in checks), proc.stdout
    assert f"selftest: {len(CHECKS)} passed, 0 failed, 0 skipped" in lines
    assert not [line for line in lines if line.startswith(("iter ", "["))]  # the engine's lines went to the log
    assert "iter 20/20" in (out / "selftest.log").read_text()

    document = json.loads((out / "selftest.json").read_text())
    assert (document["passed"], document["failed"], document["skipped"]) == (len(CHECKS), 0, 0)
    assert document["device"] == "cpu" and document["quick"] is True and document["world_size"] == 1
    assert document["cpu_seconds"] > 0 and document["wall_seconds"] > 0
    by_name = {c["name"]: c for c in document["checks"]}
    env = by_name["environment"]["data"]
    assert env["megatron_core"] == "0.16.1" and env["cuda_available"] is False
    assert "forced" in env["backend_reason"]
    assert by_name["checkpoint-resume"]["data"]["later_max_abs_delta"] == 0.0
    assert by_name["convert-8x-top2"]["data"]["logit_max_abs"] <= 1e-5
    assert by_name["export-hf"]["data"]["architecture"] == "MixtralForCausalLM"
    for name in ("throughput-dense-0.1B", "throughput-moe-8x0.1B"):
        data = by_name[name]["data"]
        assert data["tokens_per_second"] > 0 and 0 < data["mfu"] and "measured fp32 matmul" in data["peak"]
        assert data["seq_length"] == 256  # --quick on CPU
    dense, moe = by_name["throughput-dense-0.1B"]["data"], by_name["throughput-moe-8x0.1B"]["data"]
    # 8 experts: total far above the dense count, active (top-2) between 1 and 2 dense MLPs' worth.
    assert moe["N_non_embedding"] > 5 * dense["N_non_embedding"]
    assert dense["N_non_embedding"] < moe["N_active_non_embedding"] < 2 * dense["N_non_embedding"]
    assert not [p for p in out.iterdir() if p.name.startswith(".selftest.json")]  # written atomically


def test_gpu_without_cuda_is_one_line_and_exit_2(tmp_path):
    proc = selftest("--gpu", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--gpu: torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    proc = selftest("--cpu", "--out", str(tmp_path / "file"), timeout=120)
    assert proc.returncode == 2 and "is an existing file" in proc.stderr


def test_a_foreign_work_directory_is_never_deleted(tmp_path):
    keep = tmp_path / "out" / "work" / "mine.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("not the selftest's")
    proc = selftest("--cpu", "--quick", "--out", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 2 and "is not a selftest work directory" in proc.stderr
    assert keep.read_text() == "not the selftest's"


class _LoneContext:
    world = 1

    def agree(self, result):
        return result


def test_battery_records_pass_fail_skip_and_errors(tmp_path):
    from megatron_upcycle.selftest.report import Battery, Failed, Outcome, Skip

    battery = Battery(tmp_path, True, {"device": "cpu"})

    def raising(exc):
        def check(_ctx):
            raise exc
        return check

    def needs_boom(_ctx):
        battery.require("boom")
        return Outcome("never")

    checks = [("ok", lambda _ctx: Outcome("fine", {"x": 1})), ("bad", raising(Failed("loss rose"))),
              ("skip", raising(Skip("1 GPU visible"))), ("boom", raising(ZeroDivisionError("division by zero"))),
              ("after-boom", needs_boom)]
    for name, check in checks:
        battery.run(name, check, _LoneContext())
    assert [r.status for r in battery.results] == ["PASS", "FAIL", "SKIP", "FAIL", "SKIP"]
    assert battery.summary() == "selftest: 1 passed, 2 failed, 2 skipped"
    assert battery.results[3].detail.startswith("ZeroDivisionError: division by zero (traceback in ")
    assert "Traceback" in (tmp_path / "selftest.log").read_text()
    assert battery.results[4].detail == "needs boom to pass first"
    assert LINE.match(battery.results[0].line())
    document = json.loads((tmp_path / "selftest.json").read_text())
    assert [c["status"] for c in document["checks"]] == ["PASS", "FAIL", "SKIP", "FAIL", "SKIP"]
    assert document["checks"][0]["data"] == {"x": 1} and document["failed"] == 2


def test_device_script_installs_offline_and_runs_the_battery():
    script = (REPO / "bench" / "gpu_selftest.sh").read_text()
    assert "--no-index" in script and "selftest --gpu" in script and "$OUT" in script
    fetch = (REPO / "bench" / "fetch_device_wheels.sh").read_text()
    assert "megatron-core==0.16.1" in fetch and "--python-version 3.12" in fetch
    assert Path(REPO / ".gitignore").read_text().count("/.device-wheels/") == 1


def test_gpu_path_model_config_runs_without_te_and_apex(megatron_cpu):
    """The GPU path's TransformerConfig (bf16, fusions on) with the local spec, as on a node
    without TransformerEngine or Apex (the lent H200): built and run forward and backward here,
    in bf16 on the CPU. Preparing the selftest found two flags that broke it before any GPU
    ran it: persist_layer_norm (refused by the torch RMSNorm) and masked_softmax_fusion (needs
    Megatron-LM's compiled scaled_masked_softmax_cuda)."""
    import dataclasses

    import torch
    from megatron.core.models.gpt import GPTModel

    from megatron_upcycle.config.model import ModelConfig, MoEConfig
    from megatron_upcycle.models import layer_spec, transformer_config

    gpu = dataclasses.replace(megatron_cpu, device="cuda", dist_backend="nccl", bf16=True,
                              distributed_optimizer=True, use_transformer_engine=False)
    model = ModelConfig(name="gpu-config", num_layers=2, hidden_size=32, num_attention_heads=2,
                        ffn_hidden_size=128, vocab_size=512, seq_length=64)
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand_as(tokens)
    # The alltoall dispatcher needs CUDA streams to be built: the MoE runs with allgather here.
    for moe, dispatcher in ((None, "alltoall"), (MoEConfig(8, 2), "allgather")):
        backend = dataclasses.replace(gpu, moe_token_dispatcher=dispatcher)
        config = transformer_config(model, moe, backend)
        assert config.bf16 and config.bias_activation_fusion and not config.persist_layer_norm
        gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(config, backend), vocab_size=512,
                       max_sequence_length=64, position_embedding_type="rope",
                       share_embeddings_and_output_weights=False)
        assert next(gpt.parameters()).dtype == torch.bfloat16
        loss = gpt(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        assert torch.isfinite(loss)
