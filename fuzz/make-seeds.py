#!/usr/bin/env python3
"""Writes the committed seed inputs for the fuzz targets into seeds/<target>/.

Each seed is a small, meaningful input in the layout its target reads (see
the `//!` header of fuzz_targets/<target>.rs). Run from anywhere:

    python3 fuzz/make-seeds.py

It rewrites seeds/frame_decoder, seeds/handshake and seeds/utf8 from scratch
(files it does not make are removed), so the seeds stay what this script says.
Minimized crash reproducers belong in REPRODUCERS below, not in hand-made files.
"""

import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")

# frame_decoder's LIMITS table: index -> bytes.
LIMIT_INDEX = {0: 0, 1: 1, 125: 2, 126: 3, 1000: 4, 65535: 5, 65536: 6, "none": 7}

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])  # RFC 6455 section 5.7's example key

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode, payload=b"", fin=True, mask=KEY, rsv=0, length_bytes=None, length=None):
    """One frame. `length_bytes` forces the 2- or 8-byte length form;
    `length` overrides the declared length (for lying headers)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask is not None else 0
    if length_bytes is None:
        length_bytes = 0 if n <= 125 else 2 if n <= 0xFFFF else 8
    if length_bytes == 0:
        head = bytes([b0, m | n])
    elif length_bytes == 2:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + mask + body


def close(code, reason=b""):
    return frame(CLOSE, struct.pack(">H", code) + reason)


def fd_seed(wire, client=False, frame_limit=65536, message_limit=65536, chunks=()):
    """frame_decoder layout: flags, chunk count, chunk sizes, wire bytes."""
    flags = (1 if client else 0) | LIMIT_INDEX[frame_limit] << 1 | LIMIT_INDEX[message_limit] << 4
    assert len(chunks) < 8 and all(0 <= c < 256 for c in chunks)
    return bytes([flags, len(chunks), *chunks]) + wire


def frame_decoder_seeds():
    s = {}
    utf8 = "κόσμε".encode()
    # Every opcode, masked as a client must.
    s["text"] = fd_seed(frame(TEXT, b"Hello"))
    s["text-empty"] = fd_seed(frame(TEXT, b""))
    s["text-multibyte"] = fd_seed(frame(TEXT, utf8 + "𝄞".encode()))
    s["binary"] = fd_seed(frame(BINARY, bytes(range(256))[:100]))
    s["ping"] = fd_seed(frame(PING, b"are you there"))
    s["pong"] = fd_seed(frame(PONG, b""))
    s["close-empty"] = fd_seed(frame(CLOSE, b""))
    s["close-1000-reason"] = fd_seed(close(1000, b"bye"))
    s["all-opcodes"] = fd_seed(
        frame(TEXT, b"a") + frame(BINARY, b"\x00\xff") + frame(PING, b"p")
        + frame(PONG, b"q") + close(1001)
    )
    # Fragmented messages, control frames between fragments.
    s["fragmented-text"] = fd_seed(
        frame(TEXT, b"he", fin=False) + frame(CONT, b"ll", fin=False) + frame(CONT, b"o")
    )
    s["fragmented-text-ping-between"] = fd_seed(
        frame(TEXT, b"he", fin=False) + frame(PING, b"") + frame(CONT, b"llo")
    )
    s["fragmented-utf8-split"] = fd_seed(
        frame(TEXT, utf8[:1], fin=False) + frame(CONT, utf8[1:4], fin=False) + frame(CONT, utf8[4:])
    )
    s["fragmented-binary-empty-parts"] = fd_seed(
        frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"x")
    )
    # Invalid UTF-8: at once, across fragments, cut at the end, fail-fast.
    s["text-invalid-utf8"] = fd_seed(frame(TEXT, b"a\xffb"))
    s["text-surrogate"] = fd_seed(frame(TEXT, b"\xed\xa0\x80"))
    s["text-overlong"] = fd_seed(frame(TEXT, b"\xc0\xaf"))
    s["text-utf8-cut-at-end"] = fd_seed(frame(TEXT, b"a", fin=False) + frame(CONT, b"\xce"))
    s["text-invalid-fails-fast"] = fd_seed(
        frame(TEXT, utf8 + b"\xf4\x90\x80\x80" + b"tail" * 10), chunks=(9,)
    )
    # Close codes (section 7.4): valid and invalid, and bad payloads.
    for code in (1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999):
        s[f"close-{code}"] = fd_seed(close(code))
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        s[f"close-invalid-{code}"] = fd_seed(close(code))
    s["close-one-byte"] = fd_seed(frame(CLOSE, b"\x03"))
    s["close-reason-invalid-utf8"] = fd_seed(close(1000, b"\xff"))
    s["close-reason-125"] = fd_seed(close(1000, b"r" * 123))
    s["close-then-text"] = fd_seed(close(1000) + frame(TEXT, b"late"))
    # Lengths: 7-bit edge, 16-bit, 64-bit (non-minimal), lies, top bit.
    s["len-125"] = fd_seed(frame(BINARY, b"x" * 125))
    s["len16-126"] = fd_seed(frame(BINARY, b"y" * 126))
    s["len16-300"] = fd_seed(frame(BINARY, bytes(range(256)) + b"z" * 44))
    s["len16-small-nonminimal"] = fd_seed(frame(TEXT, b"abc", length_bytes=2))
    s["len64-small-nonminimal"] = fd_seed(frame(TEXT, b"abc", length_bytes=8))
    s["len64-4gib-header-only"] = fd_seed(frame(BINARY, b"", length_bytes=8, length=1 << 32))
    s["len64-top-bit"] = fd_seed(frame(BINARY, b"", length_bytes=8, length=1 << 63))
    s["len-declared-longer"] = fd_seed(frame(BINARY, b"short", length=100))
    s["control-len16"] = fd_seed(frame(PING, b"p" * 126))
    s["control-len16-nonminimal"] = fd_seed(frame(PING, b"ping", length_bytes=2))
    s["control-len64-nonminimal"] = fd_seed(frame(CLOSE, b"\x03\xe8", length_bytes=8))
    # Framing rules.
    s["rsv1"] = fd_seed(frame(TEXT, b"a", rsv=4))
    s["rsv3"] = fd_seed(frame(TEXT, b"a", rsv=1))
    s["opcode-3"] = fd_seed(frame(3, b""))
    s["opcode-b"] = fd_seed(frame(0xB, b""))
    s["unmasked-from-client"] = fd_seed(frame(TEXT, b"a", mask=None))
    s["fragmented-ping"] = fd_seed(frame(PING, b"", fin=False))
    s["continuation-first"] = fd_seed(frame(CONT, b"x"))
    s["text-inside-fragmented"] = fd_seed(frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"))
    s["zero-mask"] = fd_seed(frame(TEXT, b"same", mask=b"\x00\x00\x00\x00"))
    # Limits.
    s["frame-over-limit"] = fd_seed(frame(BINARY, b"x" * 126), frame_limit=125)
    s["frame-at-limit"] = fd_seed(frame(BINARY, b"x" * 125), frame_limit=125, message_limit=125)
    s["message-over-limit"] = fd_seed(
        frame(BINARY, b"x" * 100, fin=False) + frame(CONT, b"x" * 26), frame_limit=125, message_limit=125
    )
    s["limit-zero-empty-frames"] = fd_seed(
        frame(TEXT, b"") + frame(PING, b"") + close(1000), frame_limit=0, message_limit=0
    )
    s["limit-none"] = fd_seed(frame(BINARY, b"big" * 50), frame_limit="none", message_limit="none")
    # Client role: the server's frames are unmasked, masked ones refused.
    s["client-text"] = fd_seed(frame(TEXT, b"hi", mask=None), client=True)
    s["client-fragmented"] = fd_seed(
        frame(TEXT, b"h", fin=False, mask=None) + frame(PING, b"", mask=None)
        + frame(CONT, b"i", mask=None) + frame(CLOSE, b"\x03\xe8", mask=None),
        client=True,
    )
    s["client-masked-from-server"] = fd_seed(frame(TEXT, b"x"), client=True)
    # Chunking: a byte at a time, empty reads, uneven reads.
    mixed = (
        frame(TEXT, utf8, fin=False) + frame(PING, b"ping") + frame(CONT, "σμε".encode())
        + frame(BINARY, b"\x09" * 200) + close(1000, b"done")
    )
    s["chunks-byte-at-a-time"] = fd_seed(mixed, chunks=(1,))
    s["chunks-empty-reads"] = fd_seed(mixed, chunks=(0, 1, 0, 2))
    s["chunks-uneven"] = fd_seed(mixed, chunks=(3, 7, 2, 14, 5))
    s["chunks-header-split"] = fd_seed(frame(BINARY, b"q" * 300), chunks=(1, 1, 1, 3, 200))
    return s


HANDSHAKE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example


def upgrade(path="/echo", extra="", key=HANDSHAKE_KEY, version="13", upgrade_hdr="websocket",
            connection="Upgrade", host="Host: gateway.example\r\n", method="GET", http="HTTP/1.1"):
    lines = [f"{method} {path} {http}\r\n", host, f"Upgrade: {upgrade_hdr}\r\n",
             f"Connection: {connection}\r\n"]
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}\r\n")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}\r\n")
    return ("".join(lines) + extra + "\r\n").encode()


def handshake_seeds():
    s = {}
    s["upgrade-rfc-example"] = upgrade()
    s["upgrade-token-lists"] = upgrade(connection="keep-alive, UPGRADE", upgrade_hdr="h2c, WebSocket")
    s["upgrade-protocols-query"] = upgrade(
        path="/echo?token=abc&x=1", extra="Sec-WebSocket-Protocol: corecast.v1, chat\r\n"
    )
    s["upgrade-key-whitespace"] = upgrade(key=" \t" + HANDSHAKE_KEY + " ")
    s["upgrade-then-frame"] = upgrade() + frame(TEXT, b"Hello")
    s["upgrade-content-length-0"] = upgrade(extra="Content-Length: 0\r\n")
    s["upgrade-bare-lf"] = upgrade().replace(b"\r\n", b"\n")
    s["upgrade-partial"] = upgrade()[:40]
    s["get-healthz"] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    s["get-metrics-no-upgrade"] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    s["http-1.0"] = upgrade(http="HTTP/1.0")
    s["post"] = upgrade(method="POST")
    s["no-host"] = upgrade(host="")
    s["upgrade-h2c"] = upgrade(upgrade_hdr="h2c")
    s["connection-close"] = upgrade(connection="close")
    s["version-8"] = upgrade(version="8")
    s["version-missing"] = upgrade(version=None)
    s["version-twice"] = upgrade(extra="Sec-WebSocket-Version: 13\r\n")
    s["key-missing"] = upgrade(key=None)
    s["key-short"] = upgrade(key="c2hvcnQ=")
    s["key-not-base64"] = upgrade(key="!" * 24)
    s["key-trailing-bits"] = upgrade(key="dGhlIHNhbXBsZSBub25jZR==")
    s["key-no-padding"] = upgrade(key=HANDSHAKE_KEY.rstrip("="))
    s["key-twice"] = upgrade(extra=f"Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\n")
    s["body-content-length"] = upgrade(extra="Content-Length: 5\r\n") + b"hello"
    s["body-chunked"] = upgrade(extra="Transfer-Encoding: chunked\r\n")
    s["too-many-headers"] = upgrade(extra="X-A: b\r\n" * 40)
    s["non-utf8-header-value"] = upgrade()[:-2] + b"X-Bin: \xff\xfe\r\n\r\n"
    s["tls-client-hello"] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    s["empty-path"] = b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"
    return s


def utf8_seed(text, sizes=()):
    assert len(sizes) < 8 and all(0 <= c < 256 for c in sizes)
    return bytes([len(sizes), *sizes]) + text


def utf8_seeds():
    s = {}
    kosme = "κόσμε".encode()
    cases = {
        "ascii": b"hello, world",
        "two-byte": "héllo".encode(),
        "three-byte": kosme,
        "four-byte": "𝄞 clef".encode(),
        "max-code-point": b"\xf4\x8f\xbf\xbf",
        "above-max": b"\xf4\x90\x80\x80",
        "surrogate": b"\xed\xa0\x80",
        "overlong-2": b"\xc0\xaf",
        "overlong-3": b"\xe0\x80\xaf",
        "overlong-4": b"\xf0\x80\x80\xaf",
        "lone-continuation": b"\x80",
        "truncated-at-end": b"a\xe2\x82",
        "bad-lead-ff": b"\xff",
        "bad-lead-f5": b"\xf5\x80\x80\x80",
        "fail-fast-6.4.2": kosme + b"\xf4\x90\x80\x80" + b"tail",
        "nul-and-del": b"\x00\x7f",
    }
    for name, text in cases.items():
        s[name] = utf8_seed(text)
    s["split-every-byte"] = utf8_seed(kosme + "𝄞".encode(), (1,))
    s["split-empty-pieces"] = utf8_seed("héllo𝄞".encode(), (0, 1, 0, 2))
    s["split-inside-4-byte"] = utf8_seed(b"ab\xf0\x9d\x84\x9ecd", (3, 1, 1, 4))
    s["split-invalid-second-byte"] = utf8_seed(b"\xe2\x28\xa1", (1, 1, 1))
    s["split-long-ascii-then-bad"] = utf8_seed(b"x" * 70 + b"\xc3\x28", (64, 7))
    return s


# Minimized crash inputs, kept so they are replayed on every run:
# target -> {name: bytes} (written as seeds/<target>/crash-<name>).
REPRODUCERS = {
    "frame_decoder": {
        # An empty ping whose length is written in the 16-bit form: we refuse
        # it as ControlFrameTooLong, tungstenite reads Ping([]). See README.md.
        "ping-len16-zero": bytes.fromhex("6c0089fe0000008a4d8a"),
    },
}


def write(target, seeds):
    out = os.path.join(SEEDS, target)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(out)}")


def main():
    targets = {
        "frame_decoder": frame_decoder_seeds(),
        "handshake": handshake_seeds(),
        "utf8": utf8_seeds(),
    }
    for target, found in REPRODUCERS.items():
        for name, data in found.items():
            targets[target][f"crash-{name}"] = data
    for target, seeds in targets.items():
        write(target, seeds)


if __name__ == "__main__":
    main()
