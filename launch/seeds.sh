#!/usr/bin/env bash
# The CPU demo's claim over seeds: GRPO, BuPO (pi^8, raw residual) and BuPO with the normed internal policy, each
# with seeds 0, 1 and 2 (the demo's settings otherwise), then `python -m bupo.evals.compare` over the nine runs.
# Runs two at a time, one thread each (on 2 cores as fast as one run with two threads). A finished run is skipped,
# so an interrupted sweep continues where it stopped (an unfinished run resumes from its checkpoint).
# Usage: bash launch/seeds.sh [OUT_ROOT] [--section.field=value ...]
#   OUT_ROOT: default runs/seeds (relative to the current folder); each run's log is OUT_ROOT/<name>_s<seed>.log.
#   Overrides go to every run, after the sweep's own (e.g. --trainer.total_steps=10 for a shorter sweep).
set -euo pipefail
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $1 (see bash launch/seeds.sh --help)" >&2; exit 2; }
root="runs/seeds"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then root=$1; shift; fi
for a in "$@"; do
    case "$a" in
        -h|--help) usage; exit 0 ;;
        # what tells the nine runs apart is the sweep's own
        --trainer.seed=*|--trainer.out_dir=*|--bupo.iterative_steps=*|--bupo.norm=*)
            die "$a: the sweep sets ${a%%=*} itself (it is what tells its runs apart)" ;;
        --*.*=*) ;;
        *) die "$a: expected --section.field=value" ;;
    esac
done
[ -n "$root" ] || die "OUT_ROOT is empty"
case "$root" in /*) ;; *) root="$PWD/$root" ;; esac  # env.sh moves to the repository root
[ ! -e "$root" ] || [ -d "$root" ] || die "OUT_ROOT $root is a file, not a folder"
export SEEDS_ROOT="$root" SEEDS_EXTRA="${*@Q}"  # the overrides, quoted for the runs' shells
BUPO_EXTRAS=demo . "$(dirname "$0")/env.sh"
# a misspelt or mistyped override fails here, once, not in each of the nine runs
python -c 'import sys; from bupo.cli import run_main; from bupo.config import load_config; run_main(load_config, sys.argv[1:])' \
    --config launch/configs/cpu_demo.toml "$@" > /dev/null
mkdir -p -- "$SEEDS_ROOT"
run() {  # name seed overrides...
    local name=$1 seed=$2 out="$SEEDS_ROOT/$1_s$2"
    shift 2
    if [ -f "$out/final/model.safetensors" ]; then echo "[seeds] $out: already done"; return; fi
    echo "[seeds] $out: start $(date -u +%H:%M:%S)"
    local t0=$SECONDS
    eval "local extra=($SEEDS_EXTRA)"
    python -m bupo.train --config launch/configs/cpu_demo.toml --trainer.seed="$seed" --trainer.out_dir="$out" \
        --trainer.threads=1 "$@" "${extra[@]}" > "$out.log" 2>&1 || { echo "[seeds] $out: FAILED (see $out.log)"; return 1; }
    echo "[seeds] $out: done in $((SECONDS - t0)) s"
}
export -f run
for s in 0 1 2; do
    printf 'grpo %s --bupo.iterative_steps=0\nbupo %s\nbupo_norm %s --bupo.norm=true\n' "$s" "$s" "$s"
done | xargs -P 2 -L 1 bash -c 'run "$@"' _
# the trailing slashes keep the globs to the run folders (the logs beside them match the same names)
python -m bupo.evals.compare "$SEEDS_ROOT"/grpo_s*/ "$SEEDS_ROOT"/bupo_s*/ "$SEEDS_ROOT"/bupo_norm_s*/ --window 5 \
    --out "$SEEDS_ROOT/compare"
