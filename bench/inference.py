"""Serving cost of upcycling on CPU with Hugging Face transformers: dense vs 8-expert top-1 and top-2.

A dense model (d=512, 4 layers, Megatron's random init) is saved as a checkpoint,
upcycled to 8 experts with top-1 and top-2 routing by the real converter
(``convert_dense_to_moe``), and all three are exported with ``export_hf`` (each export
verified against its Megatron model). transformers then runs, models interleaved in
a rotating order within every repeat:
- decode at batch 1: ``generate`` of --decode-tokens greedy tokens after a short prompt;
- prefill at batch 8: one forward of 8 x --prefill-length tokens (logits of the last
  position only, as a server computes them).
Printed per model: median tokens/s with [min, max] over repeats and process CPU seconds;
per MoE the ratio MoE / dense tokens/s (median of the per-repeat ratios, [min, max]), by
wall time and by process CPU time (on a shared machine the latter is less disturbed).
Last lines: ``moe_top1_vs_dense_decode: X``, ``moe_top2_vs_dense_decode: Y``,
``exports_verified: N/N``. Self-contained: it needs only the converter, the exporter
and transformers.

    .venv/bin/python bench/inference.py [--repeats 5] [--vocab-size 32000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark; the converter runs on CPU too

import torch  # noqa: E402

MODELS = ("dense", "moe_top1", "moe_top2")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_dense_checkpoint(root: Path, model) -> Path:
    """A dense checkpoint with Megatron's own random initialisation."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, save_checkpoint
    from megatron_upcycle.models import build_gpt_model
    from megatron_upcycle.parallel import single_process_groups

    backend = select_backend(force_cpu=True)
    with single_process_groups(backend, seed=1234):
        gpt = build_gpt_model(model, None, backend)
        record = CheckpointRecord("iter_0000000", 0, 0, 0.0, "stable", "final")
        return save_checkpoint(root, record, gpt, None, None, {"iteration": 0},
                               CheckpointMeta(model, None, iteration=0, tokens=0, has_optimizer=False))


def make_exports(work: Path, args) -> tuple[dict[str, Path], int]:
    from megatron_upcycle.checkpoint import load_full_model_state
    from megatron_upcycle.config.model import ModelConfig, MoEConfig
    from megatron_upcycle.export import export_hf
    from megatron_upcycle.upcycle import convert_dense_to_moe

    model = ModelConfig(name="bench-d512", num_layers=4, hidden_size=512, num_attention_heads=8,
                        vocab_size=args.vocab_size, seq_length=1024)
    say(f"dense checkpoint: {model.num_layers} layers, d={model.hidden_size}, vocab {model.vocab_size}")
    checkpoints = {"dense": build_dense_checkpoint(work / "dense", model)}
    for name, topk in (("moe_top1", 1), ("moe_top2", 2)):
        say(f"converting to 8 experts, top-{topk} (the real converter, verified)")
        result = convert_dense_to_moe(checkpoints["dense"], work / name, MoEConfig(num_experts=8, topk=topk),
                                      log=lambda msg: say("  " + msg))
        if result.status == "failed":
            raise SystemExit(f"conversion to {name} failed its verification: {result.out}")
        checkpoints[name] = result.out
    exports, verified = {}, 0
    for name, ckpt in checkpoints.items():
        model_cfg, moe, state, _ = load_full_model_state(ckpt)
        result = export_hf(state, model_cfg, moe, work / f"hf-{name}")
        say(f"exported {name}: {result.describe()}; {result.check.format()}")
        verified += int(result.check.passed)
        exports[name] = result.out
        del state
    return exports, verified


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model


def experts_implementation(model) -> str:
    config = model.config
    return str(getattr(config, "_experts_implementation_internal", None) or getattr(config, "_experts_implementation",
                                                                                       "eager"))


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(tokens/s, process CPU s) of greedy generation at batch 1."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / wall, cpu


def time_prefill(model, batch: torch.Tensor) -> tuple[float, float]:
    """(tokens/s, process CPU s) of one prefill forward (last position's logits, no cache kept)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(batch, use_cache=False, logits_to_keep=1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return batch.numel() / wall, cpu


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}, {max(values):.1f}]"


def ratios(moe: list[float], dense: list[float]) -> list[float]:
    """MoE / dense tokens/s of each repeat (the two ran back to back, so noise hits both)."""
    return [m / d for m, d in zip(moe, dense)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=32000, help="the paper's vocabulary by default")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode run (batch 1)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--prefill-length", type=int, default=256, help="tokens per sequence of the batch-8 prefill")
    parser.add_argument("--keep", default=None, help="write checkpoints and exports here (default: a temp dir)")
    args = parser.parse_args()
    if args.repeats < 1 or args.decode_tokens < 1 or args.prefill_length < 1:
        parser.error("--repeats, --decode-tokens and --prefill-length must be >= 1")

    from megatron_upcycle.logging_setup import quiet_megatron

    quiet_megatron()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-inference-"))
    if args.keep and work.exists() and any(work.iterdir()):
        parser.error(f"--keep {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        exports, verified = make_exports(work, args)
        models = {name: load(path) for name, path in exports.items()}
        import transformers

        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, args.vocab_size, (1, args.prompt_length), generator=gen)
        prefill = torch.randint(0, args.vocab_size, (8, args.prefill_length), generator=gen)
        say(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads; experts: {experts_implementation(models['moe_top1'])}; warming up")
        for model in models.values():
            time_decode(model, prompt, 4)
            time_prefill(model, prefill[:, :32])

        results = {name: {"decode": [], "prefill": [], "decode_cpu": [], "prefill_cpu": []} for name in MODELS}
        for repeat in range(args.repeats):
            order = MODELS[repeat % 3:] + MODELS[:repeat % 3]  # rotate who goes first
            for name in order:
                tps, cpu = time_decode(models[name], prompt, args.decode_tokens)
                results[name]["decode"].append(tps)
                results[name]["decode_cpu"].append(cpu)
            for name in order:
                tps, cpu = time_prefill(models[name], prefill)
                results[name]["prefill"].append(tps)
                results[name]["prefill_cpu"].append(cpu)
            say(f"repeat {repeat + 1}/{args.repeats}: decode tok/s " + ", ".join(
                f"{n} {results[n]['decode'][-1]:.1f}" for n in MODELS) + "; prefill tok/s " + ", ".join(
                f"{n} {results[n]['prefill'][-1]:.0f}" for n in MODELS))

        print(f"transformers {transformers.__version__} on CPU ({torch.get_num_threads()} threads), fp32; "
              f"decode: batch 1, {args.prompt_length}-token prompt, {args.decode_tokens} new tokens; "
              f"prefill: batch 8 x {args.prefill_length} tokens; {args.repeats} interleaved repeats")
        print(f"{'model':<10} {'params':>12} {'decode tok/s median [min, max]':>34} {'cpu s':>7} "
              f"{'prefill tok/s median [min, max]':>36} {'cpu s':>7}")
        for name in MODELS:
            r = results[name]
            params = sum(p.numel() for p in models[name].parameters())
            print(f"{name:<10} {params:>12,} {spread(r['decode']):>34} {statistics.median(r['decode_cpu']):7.2f} "
                  f"{spread(r['prefill']):>36} {statistics.median(r['prefill_cpu']):7.2f}")
        summary = {}
        for workload in ("prefill", "decode"):
            for name in ("moe_top1", "moe_top2"):
                values = ratios(results[name][workload], results["dense"][workload])
                key = f"{name}_vs_dense_{workload}"
                summary[key] = statistics.median(values)
                print(f"{key} per repeat: median {summary[key]:.3f} [{min(values):.3f}, {max(values):.3f}]")
                # Same tokens in both, so the CPU-time ratio is dense CPU s / MoE CPU s: on a shared
                # machine it is less disturbed by other processes than wall time.
                by_cpu = ratios(results["dense"][workload + "_cpu"], results[name][workload + "_cpu"])
                print(f"{key} by process CPU time: median {statistics.median(by_cpu):.3f} "
                      f"[{min(by_cpu):.3f}, {max(by_cpu):.3f}]")
        for key, value in summary.items():
            print(f"{key}: {value:.3f}")
        print(f"exports_verified: {verified}/{len(exports)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
