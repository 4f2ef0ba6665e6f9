#!/usr/bin/env bash
# Installs what the JavaScript client's checks and tests need: the npm
# packages of clients/js (typescript for `tsc --noEmit`, ws as Node 20's
# WebSocket, puppeteer-core to drive Chromium; exactly the versions in
# package-lock.json, with `npm ci`, only when node_modules is missing or
# older than the lock file), and with --browser Debian's chromium package
# (puppeteer-core downloads no browser). Needs node >= 20 and npm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
browser=0
[[ "${1:-}" == "--browser" ]] && browser=1
command -v node >/dev/null 2>&1 || { echo "scripts/js-deps.sh: node not found: install Node.js >= 20 (e.g. apt-get install nodejs npm)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
((major >= 20)) || { echo "scripts/js-deps.sh: node $(node --version) is too old: the client needs Node.js >= 20" >&2; exit 1; }
if [[ ! -d clients/js/node_modules || clients/js/package-lock.json -nt clients/js/node_modules ]]; then
  echo "scripts/js-deps.sh: npm ci in clients/js" >&2
  (cd clients/js && npm ci --no-audit --no-fund --loglevel=error >&2)
  touch clients/js/node_modules
fi
if ((browser)) && ! command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1; then
  echo "scripts/js-deps.sh: installing chromium (Debian package)" >&2
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "scripts/js-deps.sh: chromium missing and this user cannot install it: run 'apt-get install chromium' as root" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null || true
  $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
  command -v chromium >/dev/null 2>&1 || { echo "scripts/js-deps.sh: chromium still missing after apt-get" >&2; exit 1; }
fi
