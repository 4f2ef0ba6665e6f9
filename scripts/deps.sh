#!/usr/bin/env bash
# Installs what the tests need beyond cargo: redis-server (Debian's package),
# which the storage tests start privately on loopback ports. Does nothing
# when it is already installed.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
echo "scripts/deps.sh: installing redis-server (Debian package) for the storage tests" >&2
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "scripts/deps.sh: redis-server is missing and this user cannot install it: run 'apt-get install redis-server' as root" >&2
    exit 1
  }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null || true
$sudo apt-get install -y -qq redis-server >/dev/null
# Debian's package starts a system-wide server on 6379; the tests do not use
# it, and they must not depend on it either.
command -v redis-server >/dev/null 2>&1 || { echo "scripts/deps.sh: redis-server still missing after apt-get" >&2; exit 1; }
