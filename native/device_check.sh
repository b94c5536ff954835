#!/usr/bin/env bash
# One GPU session's check, as run through the workplace's device tool:
#   carry .whl (pydantic and its needs, which the GPU image lacks), then
#   bash native/device_check.sh
# Builds native/, checks every CUDA kernel bit for bit against the numba kernels,
# times them (native/check_gpu.py), then runs the GPU-marked tests of tests/test_native.py.
set -u
OUT=${OUT:-/tmp/qflow-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  python3 -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout "${CHECK_TIMEOUT:-420}" python3 native/check_gpu.py "$@" 2>&1 | tee "$OUT/check_gpu.log"
check=${PIPESTATUS[0]}
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_native.py 2>&1 \
  | tail -15 | tee "$OUT/pytest_gpu.log"
echo "check_gpu exit $check"
exit "$check"
