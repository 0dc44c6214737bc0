#!/usr/bin/env bash
# `upcycle selftest --gpu` plus the longer MFU measurement on a GPU machine with no network
# (the lent H200: Python 3.12, torch 2.11 CUDA, no megatron-core). One call, under 8 minutes:
#
#   here:        bench/fetch_device_wheels.sh                 # .device-wheels/ (2.6 MB, gitignored)
#   device tool: run(command="bash bench/gpu_selftest.sh", carry=[".device-wheels"], timeout_s=480)
#
# Installs the carried wheels into /tmp/site (offline, no dependencies: the machine has
# the rest), installs this checkout with `pip install --no-index --no-deps -e .` (falls back
# to PYTHONPATH), runs the battery with its work directory in /tmp, and copies what comes
# back into $OUT/selftest/ (the device tool returns at most 8 files, 2 folders down):
# selftest.json, selftest.log, mfu.json, gpu_selftest.log and the converter/exporter logs.
# Exit status: the battery's (0: every check passed or was skipped with a reason).
#
# Dry run of everything but the GPU here (nothing installed, the shared venv untouched):
#   SKIP_WHEELS=1 SELFTEST_DEVICE=--cpu SELFTEST_ARGS=--quick OUT=/tmp/dry PYTHON=.venv/bin/python bash bench/gpu_selftest.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-selftest-out}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device-wheels}
DEVICE_FLAG=${SELFTEST_DEVICE:---gpu}
WORK=/tmp/upcycle-selftest
RESULTS="$OUT/selftest"
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_selftest.log") 2>&1
export PYTHONUNBUFFERED=1 MEGATRON_UPCYCLE_CACHE=/tmp/upcycle-cache

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    echo "== wheels ($(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) from $WHEELS)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # The checkout itself: editable, offline, with the machine's setuptools (no build isolation).
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
        echo "editable install failed: running from the checkout through PYTHONPATH"
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import megatron.core, megatron_upcycle; from importlib.metadata import version; print("megatron-core", version("megatron-core"))' \
    || { echo "megatron-core does not import"; exit 1; }

echo "== upcycle selftest $DEVICE_FLAG ${SELFTEST_ARGS:-}"
timeout -k 10 300 "$PY" -m megatron_upcycle.cli selftest $DEVICE_FLAG ${SELFTEST_ARGS:-} --out "$WORK"
status=$?
echo "selftest exit status: $status"

echo "== MFU: 0.1B dense and 8x0.1B MoE, 3 warm-up + 10 timed steps"
timeout -k 10 100 "$PY" -m megatron_upcycle.selftest.throughput --out "$RESULTS/mfu.json" --warmup 3 --steps 10 \
    || echo "MFU measurement failed (exit $?)"

for f in selftest.json selftest.log selftest-offline-convert.log selftest-offline-export.log; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$RESULTS/"
done
ls -l "$RESULTS"
exit $status
