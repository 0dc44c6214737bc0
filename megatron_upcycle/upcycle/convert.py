"""Dense torch_dist checkpoint -> MoE torch_dist checkpoint, streamed, then verified.

Order of work, so that a mistake never leaves a finished-looking output:
  1. validate everything that can be validated without writing (output free,
     MoE options against the model, source tensors against the model config,
     storage complete, memory for verification);
  2. stream the MoE checkpoint into ``.tmp-<name>.<host>.<pid>`` next to the
     output (temporary outputs of dead earlier attempts are removed first);
  3. write upcycle_meta.json, run the function-preservation check;
  4. rename to the output on success, to ``<name>.failed`` when a required
     check fails; on any error the temporary directory is removed.
SIGTERM, SIGUSR1 and SIGINT stop the conversion at the next safe point (between
tensors, before and after verification): the temporary output is removed and
RequeueRequested (exit 75) is raised; see upcycle.stopping.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_upcycle import __version__
from megatron_upcycle.checkpoint.meta import CheckpointMeta
from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.errors import CheckpointError, ConfigError
from megatron_upcycle.exit_codes import RequeueRequested
from megatron_upcycle.upcycle.options import UpcycleOptions
from megatron_upcycle.upcycle.stopping import (
    StopFlag, owned, release, remove_stale_temp_dirs, stop_on_signals, temp_dir_for,
)

CONVERTER_VERSION = f"megatron-upcycle {__version__} (converter format 1)"
FAILED_MARKER = "VERIFICATION_FAILED.json"


@dataclass
class ConvertResult:
    out: Path  # the finished checkpoint, or the .failed directory
    status: str  # "ok", "unverified" or "failed"
    write_seconds: float
    tensor_bytes: int
    meta: CheckpointMeta
    report: object | None = None  # verify.VerifyReport


def function_preserving(moe: MoEConfig, options: UpcycleOptions) -> tuple[bool, str]:
    """Whether the MoE computes exactly the dense function at step 0, and why not."""
    if options.init != "copy":
        return False, f"'{options.init}' init perturbs the experts"
    if moe.router_pre_softmax:
        if options.router_init == "zero" and moe.granularity == 1:
            return True, "softmax-then-top-k with a zero router: every weight is 1/E, experts scaled by E/k"
        return False, ("softmax-then-top-k routing: the chosen experts' weights sum to less than 1 and depend "
                       "on the router (experts are scaled by E*g/k, exact only for a uniform router)")
    if moe.topk % moe.granularity:
        return False, (f"top-k {moe.topk} is not a multiple of granularity {moe.granularity}: "
                       "the segments of one dense MLP copy are not all chosen together")
    if moe.granularity > 1 and options.router_init == "zero":
        return False, "a zero router ties all experts, so the chosen segments need not form whole copies"
    return True, "copy init with top-k-then-softmax routing"


def _check_output_free(out: Path) -> None:
    if out.exists():
        raise CheckpointError(f"output {out} already exists; the converter never overwrites (choose a new --out)")


def _check_moe_fits_model(model: ModelConfig, moe: MoEConfig) -> None:
    moe.expert_ffn_hidden_size(model)  # raises when g does not divide the MLP width
    if sum(moe.layer_pattern(model.num_layers)) == 0:  # raises for out-of-range layers
        raise ConfigError("--moe-layers selects no layer; nothing would become MoE")


def _verify_memory_bytes(model: ModelConfig, moe: MoEConfig) -> int:
    """fp32 weights of both models plus logits of the verification batch (generous)."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.counts import count_params

    backend = select_backend(force_cpu=True)
    dense = count_params(model, None, backend).total
    sparse = count_params(model, moe, backend).total
    # load_checkpoint holds a second copy of the MoE weights while it loads (measured: 5.3 GB
    # peak for 8x0.1B, whose fp32 weights are 3.2 GB).
    return int((dense + sparse) * 4 * 2.0) + 2 * 256 * model.vocab_size * 4 * 6


def _check_verify_memory(model: ModelConfig, moe: MoEConfig) -> None:
    import psutil

    need = _verify_memory_bytes(model, moe)
    have = psutil.virtual_memory().available
    if need > 0.9 * have:
        raise ConfigError(
            f"verifying {moe.num_experts}x{model.name} in fp32 needs ~{need / 2**30:.1f} GiB of RAM, "
            f"{have / 2**30:.1f} GiB are free: pass --no-verify and run `upcycle verify` on a bigger machine"
        )


def write_moe_checkpoint(
    tmp: Path,
    source,
    model: ModelConfig,
    moe: MoEConfig,
    options: UpcycleOptions,
    stop: StopFlag | None = None,
) -> int:
    """Stream the MoE tensors (and carried moments) into ``tmp``; returns tensor bytes.

    ``stop.check()`` runs before each tensor: a signal stops the writing between two tensors."""
    from megatron_upcycle.upcycle.layout import target_layout
    from megatron_upcycle.upcycle.recipe import MoEParams
    from megatron_upcycle.upcycle.source import MOMENT_PREFIXES
    from megatron_upcycle.upcycle.writer import ChunkSpec, write_torch_dist

    target = target_layout(model, moe)
    builders = {"weight": MoEParams(source, source.slices, source.layout, model, moe, options)}
    prefixes = {"weight": ""}
    common = {"common": {"iteration": 0, "world_size": 1, "has_rng": False}}
    if options.carry_moments:
        moment_slices = source.moment_slices()
        for field, slices in moment_slices.items():
            builders[field] = MoEParams(source, slices, source.layout, model, moe, options, field=field)
            prefixes[field] = MOMENT_PREFIXES[field]
        common["carried_moments"] = {
            "step": source.optimizer_step(),
            "keys": {field: prefix + "<model sharded key>" for field, prefix in MOMENT_PREFIXES.items()},
        }

    chunks, jobs = [], []
    # Weights first, then each moment: one pass over the dense layers per field.
    for field in builders:
        for shard in target.shards:
            chunks.append(ChunkSpec(prefixes[field] + shard.key, shard.offsets, shard.sizes,
                                    shard.global_shape, builders[field].dtype(shard.param)))
            jobs.append((field, shard))

    def produce(i: int) -> torch.Tensor:
        if stop is not None:
            stop.check()
        field, shard = jobs[i]
        return builders[field].shard(shard, target.param_shapes[shard.param])

    return write_torch_dist(tmp, chunks, produce, target.objects, common)


def convert_dense_to_moe(
    dense: str | os.PathLike,
    out: str | os.PathLike,
    moe: MoEConfig,
    options: UpcycleOptions | None = None,
    model: ModelConfig | None = None,
    verify: bool = True,
    require_exact: bool | None = None,
    tolerance: float = 1e-5,
    verify_batch_size: int = 2,
    verify_seq_length: int = 128,
    log=None,
) -> ConvertResult:
    """Convert ``dense`` into an MoE checkpoint at ``out`` (see the module docstring).

    ``require_exact`` (default: whether the options are function preserving) makes a
    max |delta logit| above ``tolerance`` a failure; otherwise the drift is reported.
    """
    from megatron_upcycle.upcycle.groups import single_process_groups
    from megatron_upcycle.upcycle.layout import dense_layout
    from megatron_upcycle.upcycle.source import DenseCheckpoint, dense_model_config

    log = log or (lambda _msg: None)
    options = options or UpcycleOptions()
    out = Path(out)
    _check_output_free(out)
    exact, why = function_preserving(moe, options)
    require = exact if require_exact is None else require_exact
    with stop_on_signals() as stop, single_process_groups():
        model = dense_model_config(dense, model)
        _check_moe_fits_model(model, moe)
        source = DenseCheckpoint(dense, model, dense_layout(model))
        if options.carry_moments:
            source.moment_slices()  # fail now, not halfway through writing
        if verify:
            _check_verify_memory(model, moe)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out, log)
        tmp = temp_dir_for(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        stop.check()
        try:
            with owned(tmp):
                result = _write_and_verify(
                    tmp, out, dense, source, model, moe, options, exact, why, verify, require, tolerance,
                    verify_batch_size, verify_seq_length, stop, log,
                )
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if stop.signum is not None and not isinstance(exc, RequeueRequested):
                # The signal arrived inside a library call that turned our stop into its own error.
                raise stop.requeue() from None
            raise
    return result


def _write_and_verify(tmp, out, dense, source, model, moe, options, exact, why, verify, require, tolerance,
                      verify_batch_size, verify_seq_length, stop, log) -> ConvertResult:
    """Steps 2-4 of the module docstring, inside the owned temporary directory."""
    log(f"writing {moe.num_experts} experts (top-{moe.topk}, init {options.init}) to {tmp.name}")
    start = time.perf_counter()
    tensor_bytes = write_moe_checkpoint(tmp, source, model, moe, options, stop)
    write_seconds = time.perf_counter() - start
    provenance = dict(
        source.provenance(),
        options=options.to_dict(),
        seed=options.seed,
        converter_version=CONVERTER_VERSION,
        function_preserving=exact,
        function_preserving_reason=why,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    meta = CheckpointMeta(
        model=model,
        moe=moe,
        iteration=0,
        tokens=0,
        has_optimizer=options.carry_moments,
        tokenizer=source.meta.tokenizer if source.meta else None,
        run_kind="convert",
        provenance=provenance,
    )
    meta.write(tmp)
    stop.check()
    report = None
    if verify:
        from megatron_upcycle.verify import verify_checkpoints

        log("verifying: same batch through the dense and the MoE model")
        report = verify_checkpoints(
            dense, tmp, model=model, batch_size=verify_batch_size, seq_length=verify_seq_length,
            tolerance=tolerance, require_exact=require,
        )
        stop.check()
        meta.provenance["verification"] = report.summary()
        meta.write(tmp)
        if not report.passed:
            from megatron_upcycle.atomic import unique_failed_name, write_json_atomic

            meta.run_kind = "convert-failed"  # loadable for inspection, never mistaken for a result
            meta.write(tmp)
            write_json_atomic(tmp / FAILED_MARKER, report.to_dict())
            failed = unique_failed_name(out)
            release(tmp)
            os.replace(tmp, failed)
            return ConvertResult(failed, "failed", write_seconds, tensor_bytes, meta, report)
    else:
        meta.provenance["verification"] = None
        meta.write(tmp)
    stop.check()
    release(tmp)
    os.replace(tmp, out)  # the last step: after it, a signal no longer undoes the conversion
    return ConvertResult(out, "ok" if verify else "unverified", write_seconds, tensor_bytes, meta, report)
