#!/usr/bin/env bash
# The prepared GPU run of tools/device_check.py (tools/README.md):
#   bash tools/device_check.sh prepare   # on a machine with the bundle's requirements and internet:
#                                         # wheels the GPU image lacks + Open3D condition points -> .device/
#   bash tools/device_check.sh [ARGS]    # on the GPU machine (carry .device): report + log -> $OUT
# ARGS go to `python -m tools.device_check` (--device, --sections, --tiny, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  shift
  # pure-Python packages of requirements.txt that the GPU image (Python 3.12, torch, numpy, scipy,
  # scikit-image, matplotlib) lacks; open3d-cpu (about 100 MB) does not fit the 64 MiB that travels,
  # hence cached condition points
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .device/wheels \
    monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pynrrd==1.1.3 fire==0.7.1 termcolor==3.3.0
  exec python3 -m tools.device_check --prepare "$@"
fi
if ! python3 -c "import monai" 2>/dev/null && compgen -G ".device/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec python3 -m tools.device_check --out "${OUT:-device_check_out}" "$@"
