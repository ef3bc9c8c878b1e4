#!/usr/bin/env bash
# Install BuPO with its test extra (in ./.venv unless a virtualenv is active), lint it, and run the test suite.
# Extra arguments go to pytest (and skip the lint), e.g. `bash launch/test.sh tests/kernels -x`.
set -euo pipefail
BUPO_EXTRAS=test . "$(dirname "$0")/env.sh"
export PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then
    echo "[bupo] ruff check ."
    python -m ruff check .
fi
exec python -m pytest -ra "$@"
