#!/usr/bin/env bash
# Sets up (packages, test tools, build) and runs every test. GPU tests (ctest label `gpu`) skip
# themselves where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
cd build
ctest --output-on-failure -j "$(( $(nproc) + 1 ))" --timeout 900 "$@"
