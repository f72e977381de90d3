#!/usr/bin/env bash
# Installs everything the bundle needs on a fresh Debian/Ubuntu machine (CPU).
# Users with a GPU: `pip install -r requirements.txt` with the CUDA build of torch instead.
set -euo pipefail
cd "$(dirname "$0")"
if ! ldconfig -p 2>/dev/null | grep libusb-1.0 >/dev/null; then  # open3d needs libusb; not grep -q (its early exit fails the pipe)
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints-cpu.txt
