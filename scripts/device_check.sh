#!/usr/bin/env bash
# The checks that need a CUDA GPU, or a machine whose SMPs have cores of their own, in one run on such a machine
# with no package index: install the wheels of scripts/device_wheels.sh (from .whl/) and ftmem itself into a
# private target, then run the CUDA test (side-stream copies into registered SMP memory, a crash and a
# bit-identical restore) and bench_protect.py --quick (the SMP path against raw zfec, where the serving peers do
# not share the encoder's cores). Logs go to $OUT (default ./device-out). PY picks the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT="${OUT:-$PWD/device-out}"
SITE="${SITE:-/tmp/ftmem-site}"
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . \
  || { echo "device_check: installing into $SITE failed" >&2; exit 1; }
export PYTHONPATH="$SITE" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
{ nvidia-smi -L 2>&1; "$PY" -c "import os, torch; print(os.cpu_count(), 'cores; torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  | tee "$OUT/machine.txt"
rc=0
"$PY" -m pytest -q -n 0 -p no:cacheprovider -rA tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" || rc=1
"$PY" bench/bench_protect.py --quick --rdzv-conf keep_alive_interval=1,keep_alive_max_attempt=3 \
  --json "$OUT/bench_protect.json" 2>&1 | tee "$OUT/bench_protect.log" || rc=1
exit $rc
