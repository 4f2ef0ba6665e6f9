#!/usr/bin/env python3
"""RS256 and ES256 test keys and tokens, made with Python `cryptography`.

  jwt-keys.py keys DIR [--kid-rsa K] [--kid-ec K]
      writes DIR/{rsa,ec}.key (private, PKCS#8), DIR/{rsa,ec}.pub.pem (SPKI),
      DIR/rsa.pkcs1.pem (PKCS#1 RSA PUBLIC KEY) and DIR/jwks.json (both keys,
      with their kids, plus one encryption key that a verifier must skip).
  jwt-keys.py sign DIR {RS256|ES256} SUB [--kid K] [--exp UNIX] [--tamper]
      prints a token signed with DIR's key for that algorithm.

The gateway's tests use it to check RS256/ES256 verification end to end; the
router's unit tests use files it made (router/src/auth/testdata).
"""
import argparse
import base64
import json
import pathlib
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def keys(args):
    d = pathlib.Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = ec.generate_private_key(ec.SECP256R1())
    for name, key in (("rsa", r), ("ec", e)):
        (d / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (d / "rsa.pkcs1.pem").write_bytes(r.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    rn = r.public_key().public_numbers()
    en = e.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "RSA", "kid": args.kid_rsa, "use": "sig", "alg": "RS256",
         "n": uint(rn.n), "e": uint(rn.e)},
        {"kty": "EC", "kid": args.kid_ec, "crv": "P-256", "alg": "ES256",
         "x": b64(en.x.to_bytes(32, "big")), "y": b64(en.y.to_bytes(32, "big"))},
        {"kty": "RSA", "kid": "enc-1", "use": "enc", "n": uint(rn.n), "e": uint(rn.e)},
    ]}
    (d / "jwks.json").write_text(json.dumps(jwks, indent=1) + "\n")


def sign(args):
    d = pathlib.Path(args.dir)
    name = {"RS256": "rsa", "ES256": "ec"}[args.alg]
    key = serialization.load_pem_private_key((d / f"{name}.key").read_bytes(), None)
    header = {"alg": args.alg, "typ": "JWT"}
    if args.kid:
        header["kid"] = args.kid
    claims = {"sub": args.sub}
    if args.exp is not None:
        claims["exp"] = args.exp
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if args.alg == "RS256":
        sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if args.tamper:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    print(f"{signing_input}.{b64(sig)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys")
    k.add_argument("dir")
    k.add_argument("--kid-rsa", default="rsa-1")
    k.add_argument("--kid-ec", default="ec-1")
    s = sub.add_parser("sign")
    s.add_argument("dir")
    s.add_argument("alg", choices=["RS256", "ES256"])
    s.add_argument("sub")
    s.add_argument("--kid")
    s.add_argument("--exp", type=int)
    s.add_argument("--tamper", action="store_true")
    args = p.parse_args()
    {"keys": keys, "sign": sign}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
