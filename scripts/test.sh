#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the
# default workspace members (gateway, router, loadgen). Needs only cargo.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo test --locked "$@"
