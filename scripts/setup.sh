# Sourced by demo.sh and test.sh: create .venv with ftmem and its dependencies if it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/ftmem-run" ]; then
  echo "setting up $VENV (torch 2.13.0 CPU, zfec, pyzmq, msgpack, psutil, numpy, crc32c, pytest)..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==2.13.0" zfec pyzmq msgpack psutil numpy crc32c pytest
  "$VENV/bin/pip" install -q -e "$ROOT"
fi
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"
