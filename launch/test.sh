#!/usr/bin/env bash
# Install BuPO with its test extra (in ./.venv unless a virtualenv is active) and run the test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh tests/kernels -x`.
set -euo pipefail
BUPO_EXTRAS=test . "$(dirname "$0")/env.sh"
export PYTHONUNBUFFERED=1
exec python -m pytest -ra "$@"
