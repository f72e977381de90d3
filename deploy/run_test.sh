#!/usr/bin/env bash
# Tests the MONAI Deploy app in its own virtual environment (never the bundle's main one: the
# SDK changes what `import monai` needs). Creates/updates the venv when the requirements change,
# then runs tests/test_deploy.py there, which runs `python deploy/app.py` on sample/defective_skull.nrrd
# and checks the written implant.nrrd.
#   DEPLOY_VENV   venv location (default: ~/.cache/cranial_implant_pcdiff/venv_deploy)
#   extra arguments go to pytest, e.g. `bash deploy/run_test.sh -k sample`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cranial_implant_pcdiff/venv_deploy}"
REQS=(requirements.txt requirements-dev.txt deploy/requirements.txt constraints-cpu.txt)

if ! ldconfig -p 2>/dev/null | grep libusb-1.0 >/dev/null; then  # not grep -q (its early exit fails the pipe)
  echo "open3d needs libusb-1.0 at import time: run 'bash setup.sh' (or apt-get install libusb-1.0-0) first" >&2
  exit 1
fi
stamp="$(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
  echo "installing the deploy venv in $VENV (about 3 GB, a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch==2.13.0 + the CPU constraints keep pip on the local CPU wheel of torch (no CUDA build)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 \
    -r requirements.txt -r requirements-dev.txt -r deploy/requirements.txt -c constraints-cpu.txt
  echo "$stamp" > "$VENV/.requirements.sha256"
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
ulimit -s 32768 2>/dev/null || true   # Holoscan warns below a 32 MB stack
"$VENV/bin/python" -m pytest tests/test_deploy.py -v "$@"
