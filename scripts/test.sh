#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the
# default workspace members (gateway, router, loadgen). Installs what they
# need first if it is missing (scripts/deps.sh): redis-server (the storage
# tests start their own on free loopback ports) and Python's cryptography
# (the RS256/ES256 token tests make keys with scripts/jwt-keys.py). Extra arguments go to `cargo test` (e.g. a test
# name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh
exec cargo test --locked "$@"
