"""`upcycle eval` vs lm-evaluation-harness called directly, on the same Hugging Face directory.

Both run as fresh processes (each pays its interpreter and imports), interleaved
so machine noise hits both: A is ``upcycle eval HF --tasks <shipped> --limit L
--out DIR``; B is ``lm_eval.simple_evaluate`` with the hf model and a TaskManager
over the same shipped task directory, offline. Prints seconds per repeat and,
last, ``eval_overhead_ratio: X`` (the median over repeats of A / B; goal X <= 1.10).

    .venv/bin/python bench/eval_overhead.py [--model HF_DIR] [--limit 40] [--repeats 3]

Without --model a 2-layer d=64 dense model (random weights, BPE over stdlib code)
is built and exported with megatron_upcycle.export first.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["code_next_line", "code_identifier", "code_closure"]
DIRECT = """
import os, sys, json
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
import lm_eval
from lm_eval.tasks import TaskManager
hf, task_dir, limit, out = sys.argv[1:5]
results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf, "device": "cpu", "dtype": "float32"},
    tasks=%r, limit=int(limit), batch_size=16, log_samples=False, bootstrap_iters=1000,
    task_manager=TaskManager(include_path=task_dir, include_defaults=False))
json.dump(results["results"], open(out, "w"), default=str)
""" % (TASKS,)


def tiny_export(out: Path) -> Path:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from eval_models import VOCAB, train_code_tokenizer

    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.config.model import ModelConfig
    from megatron_upcycle.export import export_hf
    from megatron_upcycle.models import build_gpt_model
    from megatron_upcycle.parallel import single_process_groups

    model = ModelConfig(name="bench", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                        seq_length=512)
    tokenizer = train_code_tokenizer(out / "tokenizer.json")
    with single_process_groups(select_backend(force_cpu=True)):
        torch.manual_seed(0)
        state = {k: v for k, v in build_gpt_model(model, None, select_backend(force_cpu=True)).state_dict().items()
                 if not k.endswith("_extra_state")}
    return export_hf(state, model, None, out / "hf", tokenizer_json=tokenizer).out


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: a tiny export)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron_upcycle.evaluation.task_files import ensure_task_dir

    task_dir = ensure_task_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = Path(args.model) if args.model else tiny_export(tmp)
        ours, direct = [], []
        for repeat in range(args.repeats):
            ours.append(timed([sys.executable, "-m", "megatron_upcycle.cli", "eval", str(hf), "--tasks",
                               ",".join(TASKS), "--limit", str(args.limit), "--backend", "hf",
                               "--out", str(tmp / f"ours{repeat}")]))
            direct.append(timed([sys.executable, "-c", DIRECT, str(hf), str(task_dir), str(args.limit),
                                 str(tmp / f"direct{repeat}.json")]))
            print(f"repeat {repeat}: upcycle eval {ours[-1]:.2f} s, harness directly {direct[-1]:.2f} s", flush=True)
    print(f"median: upcycle eval {statistics.median(ours):.2f} s, harness directly {statistics.median(direct):.2f} s "
          f"({len(TASKS)} tasks x {args.limit} items)")
    # Each repeat's pair ran back to back: the median of the paired ratios cancels slow phases of a busy machine.
    ratio = statistics.median(a / b for a, b in zip(ours, direct))
    print(f"eval_overhead_ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
