# Sourced by demo.sh and test.sh: create .venv with ftmem and its dependencies if it is missing, and install
# them again when pyproject.toml changed since (a stamp in the venv records which one it was set up from).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.ftmem-pyproject"
if [ ! -x "$VENV/bin/ftmem-run" ] || ! cmp -s "$ROOT/pyproject.toml" "$STAMP"; then
  echo "setting up $VENV (torch 2.13.0 CPU, zfec, pyzmq, msgpack, psutil, numpy, crc32c, cryptography, pytest, pytest-xdist)..." >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  cp "$ROOT/pyproject.toml" "$STAMP"
fi
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"
