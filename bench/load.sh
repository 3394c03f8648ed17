#!/bin/sh
# The full load run of issue 4: 10,000 requests at concurrency 100, bodies
# from 0 to 8 MiB (log-uniform), every body sha256-checked.  About 5 GB move
# each way; the default test suite runs the same test with 1,000 requests.
cd "$(dirname "$0")/.." || exit 1
TUNNEL_LOAD_REQUESTS=${TUNNEL_LOAD_REQUESTS:-10000} exec .venv/bin/python -m pytest -q \
    --durations=1 tests/test_load.py "$@"
