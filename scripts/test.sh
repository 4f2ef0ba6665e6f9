#!/usr/bin/env bash
# The test command from the README: every unit and integration test of the
# default workspace members (gateway, router, loadgen). Installs what they
# need first if it is missing (scripts/deps.sh): redis-server (the storage
# tests start their own on free loopback ports) and Python's cryptography
# (the RS256/ES256 token tests make keys with scripts/jwt-keys.py); then
# the JavaScript client's type check, unit tests and integration tests
# (scripts/js-deps.sh installs its npm packages). Extra arguments go to
# `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh
cargo test --locked "$@"
# The JavaScript client (clients/js): its types, its state machine, and the
# client against the gateway cargo just built (gateways and redis-server of
# its own on free loopback ports).
scripts/js-deps.sh
cd clients/js
npm run --silent check
npm test --silent
CORECAST_GATEWAY="${CORECAST_GATEWAY:-$(pwd)/../../target/debug/gateway}" npm run --silent test:integration
