#!/usr/bin/env bash
# Fetch the wheels bench/gpu_selftest.sh installs on the lent GPU machine (no network there):
# Python 3.12, torch 2.11 CUDA already installed, and with it numpy, packaging, pyyaml, scipy,
# psutil, matplotlib, tokenizers, filelock, safetensors, tensorboard and transformers 5
# (/work/.library/device/KINDS.md lists them). Missing there is megatron-core alone; its
# only other needs (torch, numpy, packaging) are present, so it comes without dependencies.
#
#   bench/fetch_device_wheels.sh [DIR]      (default .device-wheels, gitignored)
#
# Then checks that the wheels resolve for CPython 3.12 offline and that the whole set is
# under the device tool's 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device-wheels}
PY=${PYTHON:-.venv/bin/python}
LIMIT_BYTES=$((64 * 1024 * 1024))
WHEELS=("megatron-core==0.16.1")
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64)

mkdir -p "$DIR"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$DIR" "${WHEELS[@]}"

# Offline resolution for 3.12 (what the device's pip will do, minus the installed packages).
"$PY" -m pip install -q --dry-run --no-index --no-deps --find-links "$DIR" --python-version 3.12 \
    --implementation cp "${platform_args[@]}" --only-binary=:all: --target /tmp/device-wheels-dry-run \
    "${WHEELS[@]}"

total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"/*.whl
echo "device_wheels_bytes: $total (limit $LIMIT_BYTES)"
if [ "$total" -ge "$LIMIT_BYTES" ]; then
    echo "the wheels exceed the 64 MiB the device tool carries" >&2
    exit 1
fi
