#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the
# default workspace members (gateway, router, loadgen). Installs redis-server
# first if it is missing (scripts/deps.sh): the storage tests start their own
# on free loopback ports. Extra arguments go to `cargo test` (e.g. a test
# name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh
exec cargo test --locked "$@"
