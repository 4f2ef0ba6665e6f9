#!/usr/bin/env bash
# Makes a throwaway certificate authority and server certificates for trying
# and testing wss:// on this machine:
#   scripts/tls-certs.sh DIR
# writes DIR/ca.pem (trust this one: loadgen --ca, SSL_CERT_FILE, a browser),
# DIR/cert.pem + DIR/key.pem (EC P-256, PKCS#8) and DIR/cert2.pem +
# DIR/key2.pem (RSA 2048, PKCS#1: a second certificate, for reload tests),
# both for DNS:localhost and IP:127.0.0.1, valid for 10 years. Needs openssl.
# Not for production: use your CA's certificates there.
set -euo pipefail
dir=${1:?usage: scripts/tls-certs.sh DIR}
command -v openssl >/dev/null || { echo "tls-certs.sh: openssl is missing (apt-get install openssl)" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
ext=$(mktemp)
trap 'rm -f "$ext" leaf.csr ca.srl' EXIT
cat >"$ext" <<'X'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
X
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout ca.key -out ca.pem -days 3650 -subj "/CN=corecast test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() { # name keyfile-args...
    local name=$1 key=$2
    openssl req -new -key "$key" -out leaf.csr -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out "$name" -days 3650 -extfile "$ext" 2>/dev/null
}
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem 2>/dev/null
leaf cert.pem key.pem
openssl genrsa -traditional -out key2.pem 2048 2>/dev/null
leaf cert2.pem key2.pem
echo "tls-certs.sh: wrote $dir/{ca.pem,cert.pem,key.pem,cert2.pem,key2.pem}"
