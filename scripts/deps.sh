#!/usr/bin/env bash
# Installs what the build and the tests need beyond cargo, from Debian's
# packages: libzmq3-dev and pkg-config (the cross-node mesh links the
# system's libzmq) and redis-server (the storage and cluster tests start
# private servers on loopback ports). Does nothing when all are there.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libzmq 2>/dev/null || missing+=(libzmq3-dev)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "scripts/deps.sh: installing ${missing[*]} (Debian packages)" >&2
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "scripts/deps.sh: ${missing[*]} missing and this user cannot install them: run 'apt-get install ${missing[*]}' as root" >&2
    exit 1
  }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null || true
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
# Debian's redis package starts a system-wide server on 6379; the tests do
# not use it, and they must not depend on it either.
command -v redis-server >/dev/null 2>&1 || { echo "scripts/deps.sh: redis-server still missing after apt-get" >&2; exit 1; }
pkg-config --exists libzmq || { echo "scripts/deps.sh: libzmq still missing after apt-get" >&2; exit 1; }
