#!/usr/bin/env bash
# Start the training entry point under torchrun on this node.
#
#   local, one node:   bash launch/train.sh --config RUNS/<run>/config.yaml
#   SLURM, any nodes:  srun --ntasks-per-node=1 bash launch/train.sh --config ...
#                      (slurm/run.sbatch does this)
#
# Environment (each falls back to SLURM's value, then to a single-node default):
#   NNODES          SLURM_JOB_NUM_NODES, else 1
#   NODE_RANK       SLURM_NODEID, else 0
#   MASTER_ADDR     first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
#   MASTER_PORT     20000 + SLURM_JOB_ID % 20000 (jobs sharing a node get different ports)
#   NPROC_PER_NODE  SLURM_GPUS_ON_NODE, else the GPUs in CUDA_VISIBLE_DEVICES / nvidia-smi, else 1 (CPU)
#   PYTHON          the checkout's .venv/bin/python, else the virtualenv the package is in, else python3
#   UPCYCLE_TRAIN_ENTRY  what torchrun runs (default "-m megatron_upcycle.train"; tests use a script)
#
# Requeue protocol: on SIGUSR1 or SIGTERM the engine saves a checkpoint and
# exits 75. Under srun, Slurm delivers the signal to every process of the step
# (this script, torchrun, the workers); elsewhere (the local executor, a plain
# `kill`) only this script gets it and passes SIGTERM on to torchrun, which
# passes it to the workers and waits for them. torchrun is told to handle
# SIGUSR1 too (by default it would die of it, and the step would end while the
# workers are still saving); it runs as megatron_upcycle.train.torchrun, which
# ends such a stop with one line where plain torchrun prints the traceback of
# its SignalException. torchrun reports any failure as exit 1 whatever the
# workers returned, so the engine writes its real exit code to
# $UPCYCLE_EXIT_STATUS_FILE and this script exits with it (75 only after a save).
set -uo pipefail

# The interpreter: a checkout's .venv, or the virtualenv this package is installed
# in, found by walking up from this file's real location (it lives inside the
# package: megatron_upcycle/resources/launch/; the checkout's launch/ is a symlink).
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    dir="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
    while [ "$dir" != / ]; do
        if [ -x "$dir/.venv/bin/python" ]; then PYTHON="$dir/.venv/bin/python"; break; fi
        if [ -f "$dir/pyvenv.cfg" ] && [ -x "$dir/bin/python" ]; then PYTHON="$dir/bin/python"; break; fi
        dir="$(dirname "$dir")"
    done
fi

NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        NPROC_PER_NODE="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        NPROC_PER_NODE=1
    fi
fi

if [ "$NNODES" -gt 1 ] || [ -n "${MASTER_ADDR:-}" ]; then
    if [ -z "${MASTER_ADDR:-}" ]; then
        if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
            echo "train.sh: NNODES=$NNODES needs MASTER_ADDR (or a SLURM allocation)" >&2
            exit 2
        fi
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    fi
    MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
    rendezvous=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
else
    # One node and no address given: let torchrun pick a free port, so that
    # several local runs can share the machine.
    rendezvous=(--standalone --nnodes=1)
fi

read -r -a entry <<< "${UPCYCLE_TRAIN_ENTRY:--m megatron_upcycle.train}"
# Seconds the workers get to save their checkpoint before torchrun kills them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
# torchrun's --signals-to-handle, read from the environment (older torchruns ignore it).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"

# torchrun reports any failed worker as exit 1: the engine's local rank 0 writes its
# real exit code (megatron_upcycle.exit_codes) here, and this script passes it on.
UPCYCLE_EXIT_STATUS_FILE="$(mktemp "${TMPDIR:-/tmp}/upcycle-exit.XXXXXX")"
export UPCYCLE_EXIT_STATUS_FILE
trap 'rm -f "$UPCYCLE_EXIT_STATUS_FILE"' EXIT

echo "train.sh: node ${NODE_RANK}/${NNODES} ${SLURMD_NODENAME:-$(hostname)}: torchrun ${rendezvous[*]} --nproc_per_node=$NPROC_PER_NODE ${entry[*]} $*" >&2
"$PYTHON" -m megatron_upcycle.train.torchrun "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" "${entry[@]}" "$@" &
child=$!
signalled=""
on_signal() {
    signalled="$1"
    # In a Slurm step torchrun has the signal already; so has it after a terminal's Ctrl-C.
    if [ -z "${SLURM_STEP_ID:-}" ] && [ "$1" != INT ]; then kill -TERM "$child" 2>/dev/null; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# `wait` returns early (> 128) whenever a trapped signal arrives: wait again
# until torchrun itself has exited, then collect its status.
while true; do
    wait "$child"; rc=$?
    if [ "$rc" -le 128 ] || ! kill -0 "$child" 2>/dev/null; then break; fi
done
if [ "$rc" -gt 128 ]; then wait "$child" 2>/dev/null; last=$?; [ "$last" -ne 127 ] && rc=$last; fi

engine_rc="$(cat "$UPCYCLE_EXIT_STATUS_FILE" 2>/dev/null)"
if [[ "$engine_rc" =~ ^[0-9]+$ ]]; then
    # The engine said how it ended: 75 only after it saved a checkpoint, 73 when another
    # process holds the run, 1 when a save failed, ...
    if [ "$engine_rc" -eq 75 ]; then echo "train.sh: checkpoint saved: exiting 75 to be requeued" >&2; fi
    exit "$engine_rc"
fi
if [ -n "$signalled" ] && [ "$rc" -ne 0 ]; then
    # No word from the engine: it was killed before it could answer (a signal before its
    # handlers were installed, or torchrun's shutdown timeout). Requeue: the next start
    # resumes from the last checkpoint it did write.
    echo "train.sh: stopped by SIG$signalled (torchrun exit $rc) with no exit status from the engine:" \
         "exiting 75 to be requeued from its last checkpoint" >&2
    exit 75
fi
exit "$rc"
