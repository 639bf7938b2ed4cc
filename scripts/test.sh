#!/usr/bin/env bash
# Set up if needed, then run the whole test suite.
source "$(dirname "$0")/setup.sh"
# Two pytest-xdist workers, so that a test leaving a core idle (a single-node job, a wait) overlaps another; the
# multi-node tests, and tests sharing a golden run, stay on one worker each (tests/conftest.py).
exec python -m pytest -q -n 2 --dist loadgroup "$@"
