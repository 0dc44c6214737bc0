"""`upcycle convert | verify | inspect` from the command line: success paths, Megatron-LM
checkpoints, and bad inputs (one line, exit code 2, nothing finished-looking left)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_upcycle.cli import main
from megatron_upcycle.config import ModelConfig, to_dict, write_yaml_atomic

MODEL = ModelConfig(name="cli-3L", num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                    vocab_size=256, seq_length=32, init_method_std=0.1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def groups():
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(select_backend(force_cpu=True), ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def write_model_yaml(path: Path, **changes) -> Path:
    data = to_dict(MODEL)
    data.update(changes)
    write_yaml_atomic(path, data)
    return path


def write_megatron_lm_style(src: Path, out: Path, drop: str | None = None) -> None:
    """Re-key a stacked-layout checkpoint the way other Megatron-LM versions save it:
    per-layer keys, local norm names, no upcycle_meta.json."""
    from megatron.core import dist_checkpointing

    from megatron_upcycle.upcycle.writer import ChunkSpec, write_torch_dist

    local = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    plain = {k: v for k, v in dist_checkpointing.load_plain_tensors(str(src)).items() if torch.is_tensor(v)}
    items = []
    for key, value in plain.items():
        if key.startswith("decoder.layers.") and not key[len("decoder.layers."):][0].isdigit():
            suffix = key[len("decoder.layers."):]
            for i in range(value.shape[0]):
                items.append((f"decoder.layers.{i}.{local.get(suffix, suffix)}", value[i].contiguous()))
        else:
            items.append((key, value))
    items = [(k, v) for k, v in items if k != drop]
    chunks = [ChunkSpec(k, (0,) * v.dim(), tuple(v.shape), tuple(v.shape), v.dtype) for k, v in items]
    write_torch_dist(out, chunks, lambda i: items[i][1], [], {"iteration": 40, "args": None})


@pytest.fixture(scope="module")
def ckpts(groups, tmp_path_factory):
    from megatron_upcycle.upcycle.synthetic import write_synthetic_dense

    root = tmp_path_factory.mktemp("cli")
    write_synthetic_dense(root / "dense", MODEL, dtype=torch.float32, tokens=1000)
    write_megatron_lm_style(root / "dense", root / "mlm")
    write_megatron_lm_style(root / "dense", root / "mlm_missing", drop="output_layer.weight")
    for name in ("truncated_distcp", "truncated_metadata"):
        shutil.copytree(root / "dense", root / name)
    data = next((root / "truncated_distcp").glob("*.distcp"))
    os.truncate(data, data.stat().st_size // 2)
    os.truncate(root / "truncated_metadata" / ".metadata", 100)
    (root / "empty").mkdir()
    (root / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "dense", root / "run" / "checkpoints" / "iter_0000010")
    (root / "run" / "checkpoints" / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "iter_0000010", "iteration": 10, "tokens": 1000, "lr": 1e-3, "phase": "stable",
         "reason": "budget", "budget_tokens": 1000}]}))
    assert main(["convert", "--dense", str(root / "dense"), "--out", str(root / "moe"), "--experts", "4",
                 "--topk", "2"]) == 0
    write_model_yaml(root / "model.yaml")
    write_model_yaml(root / "wide.yaml", hidden_size=48)
    write_model_yaml(root / "deep.yaml", num_layers=4)
    return root


def test_convert_verify_inspect(ckpts, capsys, tmp_path):
    out = tmp_path / "moe"
    rc = main(["convert", "--dense", str(ckpts / "dense"), "--out", str(out), "--experts", "4", "--topk", "2",
               "--init", "drop", "--drop-fraction", "0.25", "--seed", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    result = json.loads(captured.out)
    assert result["status"] == "ok" and result["verification"]["logit_max_abs"] > 0
    assert main(["verify", "--dense", str(ckpts / "dense"), "--moe", str(ckpts / "moe")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", "--dense", str(ckpts / "dense"), "--moe", str(out)]) == 0  # drift: reported only
    assert "drift reported" in capsys.readouterr().out
    assert main(["verify", "--dense", str(ckpts / "dense"), "--moe", str(out), "--require-exact"]) == 1
    assert "tolerance" in capsys.readouterr().err
    rc = main(["convert", "--dense", str(ckpts / "dense"), "--out", str(tmp_path / "bad"), "--experts", "4",
               "--init", "noise", "--require-exact"])
    assert rc == 1 and "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and (tmp_path / "bad.failed" / "VERIFICATION_FAILED.json").is_file()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "moe: 4 experts, top-2" in text and "decoder.layers.mlp.experts.experts.linear_fc1.weight" in text
    assert '"drop_fraction": 0.25' in text and "N_active" in text
    assert main(["inspect", str(ckpts / "run" / "checkpoints"), "--json", "--keys", "none"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["manifest"][0]["iteration"] == 10 and described["counts"]["N_dense"] > 0


def test_megatron_lm_checkpoint_needs_model_and_converts_identically(ckpts, capsys, tmp_path):
    from megatron.core import dist_checkpointing

    assert main(["convert", "--dense", str(ckpts / "mlm"), "--out", str(tmp_path / "x"), "--experts", "4"]) == 2
    assert "pass --model" in capsys.readouterr().err
    rc = main(["convert", "--dense", str(ckpts / "mlm"), "--out", str(tmp_path / "moe"), "--experts", "4",
               "--topk", "2", "--model", str(ckpts / "model.yaml")])
    assert rc == 0, capsys.readouterr().err
    ours = dist_checkpointing.load_plain_tensors(str(ckpts / "moe"))
    theirs = dist_checkpointing.load_plain_tensors(str(tmp_path / "moe"))
    keys = [k for k in ours if torch.is_tensor(ours[k])]
    assert keys and all(torch.equal(ours[k], theirs[k]) for k in keys)
    assert main(["verify", "--dense", str(ckpts / "mlm"), "--moe", str(tmp_path / "moe"),
                 "--model", str(ckpts / "model.yaml")]) == 0


BAD = {
    "output exists": (["--experts", "4"], "already exists"),
    "not a checkpoint": (["--dense", "{root}/empty", "--experts", "4"], "not a torch_dist"),
    "moe as dense": (["--dense", "{root}/moe", "--experts", "4"], "MoE checkpoint"),
    "k > e": (["--experts", "2", "--topk", "3"], "larger than num_experts"),
    "e not a multiple of g": (["--experts", "6", "--granularity", "4"], "not a multiple of granularity"),
    "g does not divide ffn": (["--experts", "6", "--granularity", "3"], "does not divide ffn_hidden_size"),
    "layers out of range": (["--experts", "4", "--moe-layers", "0,7"], "outside"),
    "wrong width": (["--dense", "{root}/mlm", "--model", "{root}/wide.yaml", "--experts", "4"], "expects"),
    "wrong depth": (["--dense", "{root}/mlm", "--model", "{root}/deep.yaml", "--experts", "4"], "missing tensor"),
    "wrong depth stacked": (["--model", "{root}/deep.yaml", "--experts", "4"], "stacks 3 layers"),
    "missing key": (["--dense", "{root}/mlm_missing", "--model", "{root}/model.yaml", "--experts", "4"],
                    "missing tensor for output_layer.weight"),
    "truncated data": (["--dense", "{root}/truncated_distcp", "--experts", "4"], "truncated"),
    "truncated metadata": (["--dense", "{root}/truncated_metadata", "--experts", "4"], "truncated or corrupt"),
    "checkpoint root": (["--dense", "{root}/run/checkpoints", "--experts", "4"], "checkpoint root"),
    "no optimizer state": (["--experts", "4", "--carry-moments"], "no optimizer state"),
    "bad router std": (["--experts", "4", "--router-std", "large"], "--router-std"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, ckpts, capsys, tmp_path):
    args, message = BAD[case]
    out = tmp_path / "moe"
    if case == "output exists":
        out.mkdir()
    args = [a.format(root=ckpts) for a in args]
    if "--dense" not in args:
        args = ["--dense", str(ckpts / "dense")] + args
    before = sorted(os.listdir(tmp_path))
    rc = main(["convert", "--out", str(out)] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("upcycle: error:") and message in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary, no .failed


def test_wrappers_call_the_cli(ckpts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for script, args in [("inspect.py", [str(ckpts / "moe"), "--keys", "none"]),
                         ("convert_dense_to_moe.py", ["--dense", str(ckpts / "empty"), "--out", str(tmp_path / "x"),
                                                      "--experts", "2"])]:
        proc = subprocess.run([sys.executable, str(REPO / "checkpoints_tools" / script), *args],
                              capture_output=True, text=True, env=env, timeout=120)
        if script == "inspect.py":
            assert proc.returncode == 0 and "moe: 4 experts" in proc.stdout, proc.stderr
        else:
            assert proc.returncode == 2 and proc.stderr.startswith("upcycle: error:"), proc.stderr
