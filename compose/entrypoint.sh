#!/bin/sh
# Entry point of the gangway images: advertise this container's address, claim one GPU when asked
# (GPU_CLAIM_DIR), then exec the command (`gangway worker`, `gangway coordinator`, ...).
set -eu

# Peers dial GANGWAY_WORKER_HOST (torch MASTER_ADDR, the XGBoost tracker, LightGBM's machine list) and
# the worker binds its port block on it, so it must be this container's own IP address: LightGBM
# finds its rank by matching the machine list against local interface addresses, not hostnames.
if [ -z "${GANGWAY_WORKER_HOST:-}" ]; then
    GANGWAY_WORKER_HOST=$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')
    case "$GANGWAY_WORKER_HOST" in
        127.*)
            echo "gangway: this container's hostname resolves to $GANGWAY_WORKER_HOST, which other" \
                 "containers cannot dial; set GANGWAY_WORKER_HOST to an address peers reach" >&2
            exit 1 ;;
    esac
    export GANGWAY_WORKER_HOST
fi

# `--scale worker-gpu=N` cannot give each replica its own device (a compose reservation of `count: 1`
# is GPU 0 in every replica), so every replica sees all GPUs and takes the first one whose lock no
# other replica holds. The lock lives as long as this process (it is inherited through exec), so a
# stopped container frees its GPU; CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's index nvidia-smi's.
if [ -n "${GPU_CLAIM_DIR:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    if ! gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1); then
        echo "gangway: cannot list GPUs (nvidia-smi: $gpus); is the NVIDIA Container Toolkit installed" \
             "and the service's GPU reservation in place?" >&2
        exit 1
    fi
    if [ -z "$gpus" ]; then
        echo "gangway: nvidia-smi lists no GPU in this container; check the service's GPU reservation" >&2
        exit 1
    fi
    mkdir -p "$GPU_CLAIM_DIR"
    # GPUS_PER_WORKER=K: claim K GPUs (one lock, one file descriptor 3..9, each), for ranks that
    # ask WorkerResourceConfig(num_gpus=K).
    want=${GPUS_PER_WORKER:-1}
    case "$want" in
        [1-7]) ;;
        *) echo "gangway: GPUS_PER_WORKER=$want: a worker container claims 1 to 7 GPUs" >&2; exit 1 ;;
    esac
    fd=3
    claimed=""
    for gpu in $gpus; do
        eval "exec $fd>\"\$GPU_CLAIM_DIR/gpu$gpu.lock\""
        if flock -n "$fd"; then
            claimed="${claimed:+$claimed,}$gpu"
            fd=$((fd + 1))
            if [ "$fd" -eq $((3 + want)) ]; then
                CUDA_VISIBLE_DEVICES=$claimed
                GANGWAY_WORKER_GPUS=$claimed
                export CUDA_VISIBLE_DEVICES GANGWAY_WORKER_GPUS
                echo "gangway: claimed GPU $claimed ($GPU_CLAIM_DIR/gpu*.lock)" >&2
                exec "$@"
            fi
        else
            eval "exec $fd>&-"
        fi
    done
    echo "gangway: fewer than $want free GPUs on this host ($(echo $gpus | tr ' ' ',')); the others are held by" \
         "other worker containers (locks in $GPU_CLAIM_DIR); scale worker-gpu to at most" \
         "$(( $(echo $gpus | wc -w) / want ))" >&2
    exit 1
fi

exec "$@"
