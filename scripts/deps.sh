#!/usr/bin/env bash
# Installs what the build and the tests need beyond cargo, from Debian's
# packages: libzmq3-dev and pkg-config (the cross-node mesh links the
# system's libzmq), redis-server (the storage and cluster tests start
# private servers on loopback ports) and Python's cryptography (the token
# tests make RS256/ES256 keys with scripts/jwt-keys.py; from PyPI if the
# python3 on PATH is not Debian's), and Python websockets ≥ 13 from PyPI (the
# wss:// tests use it as an independent client; Debian's is older), and
# curl (the server API tests call the API with it). Does nothing when all
# are there.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v curl >/dev/null 2>&1 || missing+=(curl)
pkg-config --exists libzmq 2>/dev/null || missing+=(libzmq3-dev)
have_cryptography() { python3 -c 'import cryptography' >/dev/null 2>&1; }
have_cryptography || missing+=(python3-cryptography)
have_websockets() { python3 -c 'from websockets.asyncio.client import connect' >/dev/null 2>&1; }
get_websockets() {
  have_websockets && return 0
  echo "scripts/deps.sh: installing Python websockets>=13 from PyPI" >&2
  python3 -m pip install --quiet 'websockets>=13' >&2 ||
    python3 -m pip install --quiet --break-system-packages 'websockets>=13' >&2 || true
  have_websockets || { echo "scripts/deps.sh: python3 cannot import websockets.asyncio: run 'python3 -m pip install \"websockets>=13\"'" >&2; exit 1; }
}
if [[ ${#missing[@]} -eq 0 ]]; then
  get_websockets
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
if ! have_cryptography; then
  # The python3 on PATH is not Debian's (pyenv, a venv): give it its own.
  python3 -m pip install --quiet cryptography >&2 || true
  have_cryptography || { echo "scripts/deps.sh: python3 cannot import cryptography: run 'python3 -m pip install cryptography'" >&2; exit 1; }
fi
get_websockets
