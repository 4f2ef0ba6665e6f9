#!/usr/bin/env python3
"""Start/stop stress: start the gateway many times, check that every start
serves and every stop exits 0 in time.

Each start runs `gateway --listen 127.0.0.1:0 --shards S` (S cycles over
--shards, default 1,2,4), reads the bound port from its log, and must, within
--serve-s (default 2 s) of the process starting, answer `GET /healthz` with
200 and echo one WebSocket text message on `/echo`. Then it gets SIGTERM and
must exit 0 within its drain timeout plus one second, with no panic logged.
Half of the starts (alternating blocks of --burn-block starts) run beside a
CPU-bound process (`python3 -c 'while True: pass'`), because the start wedge
this guards against only showed when the cores were busy.

A start that fails is kept: its log, the per-thread CPU time and, when gdb
is installed, every thread's stack go to --keep DIR (default a fresh
temporary directory). Exit status 0 only if every start passed.

This is a stress run, not a benchmark: it prints counts, not timings.
"""

import argparse
import base64
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default="target/release/gateway", help="the gateway binary")
    p.add_argument("--starts", type=int, default=1000,
                   help="starts per shard count (default 1000)")
    p.add_argument("--shards", default="1,2,4", help="shard counts to cycle over")
    p.add_argument("--serve-s", type=float, default=2.0,
                   help="how long a start may take to serve /healthz and one echo")
    p.add_argument("--drain-timeout-ms", type=int, default=3000,
                   help="passed to the gateway; the stop must finish within it plus 1 s")
    p.add_argument("--burn-block", type=int, default=10,
                   help="starts per block; every other block runs beside a CPU burner")
    p.add_argument("--keep", default=None, help="directory for the logs of failed starts")
    p.add_argument("--max-failures", type=int, default=20,
                   help="stop after this many failed starts")
    p.add_argument("extra", nargs="*", help="more gateway flags, after --")
    return p.parse_args()


def http_get(port, path, timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0]


def ws_echo(port, timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return "closed during the handshake"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            return "handshake: " + head.split(b"\r\n", 1)[0].decode(errors="replace")
        payload = b"start-stop"
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while len(rest) < 2 + len(payload):
            chunk = s.recv(4096)
            if not chunk:
                return "closed before the echo"
            rest += chunk
        if rest[:2 + len(payload)] != bytes([0x81, len(payload)]) + payload:
            return f"unexpected echo {rest[:20]!r}"
        # A clean close, so the server does not count a dropped connection.
        s.sendall(bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\x03\xe8")))
        return None


def thread_report(pid):
    lines = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            utime, stime = int(fields[11]), int(fields[12])
            try:
                with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                wchan = "?"
            lines.append(f"{tid} {name}: state {fields[0]} utime {utime} stime {stime} ticks, wchan {wchan}")
    except OSError as e:
        lines.append(f"no /proc for {pid}: {e}")
    return "\n".join(lines)


def stacks(pid):
    try:
        out = subprocess.run(["gdb", "-batch", "-p", str(pid), "-ex", "thread apply all bt"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no stacks: {e}"


class Start:
    def __init__(self, args, shards, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [args.bin, "--listen", "127.0.0.1:0", "--shards", str(shards),
               "--drain-timeout-ms", str(args.drain_timeout_ms), *args.extra]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env,
                                     stdin=subprocess.DEVNULL)

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read()

    def port(self, deadline):
        while time.monotonic() < deadline:
            m = LISTENING.search(self.read_log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                return None
            time.sleep(0.002)
        return None

    def serve(self, deadline):
        """None if it served in time, else what went wrong."""
        port = self.port(deadline)
        if port is None:
            return "no 'listening on' line" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        checks = [("healthz", lambda t: None if http_get(port, "/healthz", t).startswith(b"HTTP/1.1 200")
                   else "healthz not 200"),
                  ("echo", lambda t: ws_echo(port, t))]
        for name, check in checks:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"{name}: no answer within the deadline"
                try:
                    problem = check(left)
                    if problem:
                        return f"{name}: {problem}"
                    break
                except ConnectionRefusedError:
                    time.sleep(0.005)
                except (socket.timeout, TimeoutError):
                    return f"{name}: no answer within the deadline"
                except OSError as e:
                    return f"{name}: {e}"
        return None

    def stop(self, limit_s):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            return "did not exit within the drain timeout after SIGTERM"
        if code != 0:
            return f"exited {code} after SIGTERM"
        if b"panicked" in self.read_log():
            return "a panic was logged"
        return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main():
    args = parse_args()
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"start-stop: {args.bin} is not an executable (cargo build --release first, or pass --bin)")
    shard_counts = [int(s) for s in args.shards.split(",")]
    keep = args.keep or tempfile.mkdtemp(prefix="corecast-start-stop-")
    os.makedirs(keep, exist_ok=True)
    log_path = os.path.join(keep, "current.log")
    counts = {s: {"starts": 0, "wedged": 0, "stop": 0, "burning": 0} for s in shard_counts}
    failures = 0
    burner = None
    total = args.starts * len(shard_counts)
    try:
        for i in range(total):
            burn = (i // args.burn_block) % 2 == 1
            if burn and burner is None:
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            elif not burn and burner is not None:
                burner.kill()
                burner.wait()
                burner = None
            shards = shard_counts[i % len(shard_counts)]
            c = counts[shards]
            c["starts"] += 1
            c["burning"] += burn
            start = Start(args, shards, log_path)
            problem = start.serve(start.started + args.serve_s)
            kind = "wedged"
            report = ""
            if problem is None:
                kind = "stop"
                problem = start.stop(args.drain_timeout_ms / 1000 + 1)
            if problem is not None and start.proc.poll() is None:
                report = thread_report(start.proc.pid) + "\n\n" + stacks(start.proc.pid)
            start.kill()
            if problem is not None:
                failures += 1
                c[kind] += 1
                name = os.path.join(keep, f"failed-{i}-shards-{shards}.log")
                with open(name, "wb") as f:
                    f.write(start.read_log())
                    f.write(f"\n--- start {i}, --shards {shards}, burner {'on' if burn else 'off'}: {problem}\n".encode())
                    f.write(report.encode())
                print(f"start {i} (--shards {shards}, burner {'on' if burn else 'off'}): {problem}; log in {name}",
                      flush=True)
                if failures >= args.max_failures:
                    print(f"start-stop: {failures} failures, stopping early")
                    break
            if (i + 1) % 100 == 0:
                print(f"{i + 1}/{total} starts, {failures} failed", flush=True)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    print()
    print("| --shards | starts | beside a CPU burner | did not serve within "
          f"{args.serve_s:g} s | stop failed |")
    print("|---:|---:|---:|---:|---:|")
    for s, c in counts.items():
        print(f"| {s} | {c['starts']} | {c['burning']} | {c['wedged']} | {c['stop']} |")
    done = sum(c["starts"] for c in counts.values())
    print(f"\nstart-stop: {done - failures} passed, {failures} failed")
    if failures == 0 and not args.keep:
        for f in os.listdir(keep):
            os.remove(os.path.join(keep, f))
        os.rmdir(keep)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
