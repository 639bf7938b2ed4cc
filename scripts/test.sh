#!/usr/bin/env bash
# Set up if needed, then run the whole test suite.
source "$(dirname "$0")/setup.sh"
# Two pytest-xdist workers, so that a test leaving a core idle (a single-node job, a wait) overlaps another. Each
# test file runs on one worker, in order: its module-scoped golden run or SMPs are set up once, and no two
# multi-node jobs (tests/test_multinode.py) compete for the two cores.
exec python -m pytest -q -n 2 --dist loadfile "$@"
