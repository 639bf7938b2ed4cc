#!/usr/bin/env bash
# Set up if needed, then run the demo: a training job with a failure injected and recovered.
source "$(dirname "$0")/setup.sh"
exec python examples/demo.py "$@"
