#!/usr/bin/env bash
# Set up if needed, then run the whole test suite.
source "$(dirname "$0")/setup.sh"
exec python -m pytest -q "$@"
