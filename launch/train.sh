#!/usr/bin/env bash
# Launcher for the trainer: one process per GPU, one or many nodes. Arguments go to `python -m bupo.train`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash launch/train.sh [--config FILE.toml] [--section.field=value ...]

Runs `python -m bupo.train`, one process per GPU. Settings come from the environment:
  NNODES          number of nodes (default 1)
  NPROC_PER_NODE  processes (GPUs) per node (default: GPUs listed by `nvidia-smi -L`, or 1 without nvidia-smi)
  NODE_RANK       rank of this node, 0..NNODES-1 (default 0)
  MASTER_ADDR     address of node 0, reachable from every node (default 127.0.0.1; set it for NNODES > 1)
  MASTER_PORT     a free TCP port on node 0 (default 29500)

Examples:
  bash launch/train.sh --config launch/configs/debug_1gpu.toml                # one GPU
  bash launch/train.sh --config launch/configs/bupo_qwen3_4b.toml             # all GPUs of this node
  # two nodes, 8 GPUs each: run on every node, NODE_RANK=0 on the node whose address is MASTER_ADDR
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/train.sh --config launch/configs/bupo_qwen3_8b.toml
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/train.sh --config launch/configs/bupo_qwen3_8b.toml
Every node must see the same repository, model folder and data; out_dir is written by rank 0 (checkpoints by all
ranks), so on several nodes put trainer.out_dir on a shared filesystem.

Errors: a user error (config, model folder, data, out_dir) ends the output with one line `error: ...` naming the
field, file or row, and a non-zero exit code.
  - One process (NNODES=1 and NPROC_PER_NODE=1): no torchrun; `python -m bupo.train` runs directly.
  - Several processes: torchrun runs through `python -m bupo.cli`, which replaces torchrun's ChildFailedError report
    with one last line `error: rank R: <that rank's error>` (read from the rank's torchrun error file; for a rank
    that crashed: its exit code or signal, its traceback above) and exits with that rank's exit code. Rank 0 also
    prints its own error line when it fails; other ranks leave theirs to that last line.
  - BUPO_TRACEBACK=1 shows the full Python traceback instead (torchrun's report included).
EOF
}

for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        usage
        exit 0
    fi
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpus_visible() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # torchrun ranks index the visible devices only
            n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
        fi
        echo "${n:-1}" | awk '{print ($1 > 0) ? $1 : 1}'
    else
        echo 1
    fi
}

NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(gpus_visible)}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
for var in NNODES NPROC_PER_NODE MASTER_PORT; do
    if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $var=${!var} must be a positive integer (run with -h for help)" >&2
        exit 2
    fi
done
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "error: NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) for NNODES=$NNODES (run with -h for help)" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ "$MASTER_ADDR" = "127.0.0.1" ]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR set to the address of node 0 (run with -h for help)" >&2
    exit 2
fi

export PYTHONUNBUFFERED=1
if [ "$NNODES" -eq 1 ] && [ "$NPROC_PER_NODE" -eq 1 ]; then
    echo "[bupo] one process: python -m bupo.train (no torchrun)"
    exec python -m bupo.train "$@"
fi
echo "[bupo] torchrun: nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE node_rank=$NODE_RANK" \
    "master=$MASTER_ADDR:$MASTER_PORT"
exec python -m bupo.cli \
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m bupo.train "$@"
