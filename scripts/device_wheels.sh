#!/usr/bin/env bash
# Run here, where PyPI is reachable: download into .whl/ the wheels of ftmem's dependencies that a GPU machine
# without a package index lacks (its image has torch, numpy, msgpack, psutil, pytest and pytest-xdist), for that
# machine's Python (default 3.12). scripts/device_check.sh installs them there; .whl/ is git-ignored, so name it
# in what travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  zfec pyzmq crc32c cryptography cffi pycparser
ls .whl
