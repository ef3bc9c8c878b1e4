#!/usr/bin/env bash
# Install BuPO (in ./.venv unless a virtualenv is active) and run the CPU demo: BuPO then GRPO on the real
# SmolLM2-135M-Instruct, learning the built-in arithmetic task. Extra arguments are config overrides,
# e.g. `bash launch/demo.sh --bupo.iterative_steps=0 --trainer.out_dir=runs/cpu_demo_grpo` for the GRPO baseline.
set -euo pipefail
BUPO_EXTRAS=demo . "$(dirname "$0")/env.sh"
export PYTHONUNBUFFERED=1
exec python -m bupo.train --config launch/configs/cpu_demo.toml "$@"
