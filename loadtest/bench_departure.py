#!/usr/bin/env python3
"""bench_departure.py - mass departure and shutdown at scale, on loopback:
how long a newcomer's first message waits when thousands of clients leave at
once, and how long SIGTERM takes with thousands connected, for the relay at
this checkout and (optionally) at an older commit, in the same run.

    python loadtest/bench_departure.py                      # 4,000 leave, 5 runs
    python loadtest/bench_departure.py --previous-commit dcaadb1 --late 0 1.5
    python loadtest/bench_departure.py --scenario sigterm --clients 10000

Per run, a fresh server process (--quiet): `--clients` idle clients connect
(4 KiB receive buffers), then all close at once; after `--late` seconds a
newcomer connects and sends one line; the delay is from its send to an
observer's receipt. "sigterm": the clients stay connected and the delay is
from SIGTERM to the server's exit (status shown). Results: loadtest/BENCHMARK.md,
"Mass departure".
"""

import argparse
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench  # loadtest/bench.py: extract_previous()

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


class Server:
    """A relay process on a free loopback port; counts its log lines."""

    def __init__(self, script, max_clients):
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--quiet", "--host", LOOPBACK, "--port", "0",
             "--max-clients", str(max_clients)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = self.proc.stdout.readline()
        match = re.search(r":(\d+)\s*$", first)
        if not match:
            self.proc.kill()
            raise SystemExit(f"{script}: no listening line, got {first!r}")
        self.address = (LOOPBACK, int(match.group(1)))
        self.joined = self.left = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self):
        for line in self.proc.stdout:
            if line.startswith("New connection"):
                self.joined += 1
            elif " closed (" in line:
                self.left += 1

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.01)  # polling a counter, not synchronising

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def connect_idle(address, count):
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address)
        socks.append(sock)
    return socks


def run_departure(script, clients, late):
    """Seconds from the newcomer's send to the observer's receipt."""
    server = Server(script, clients + 100)
    try:
        observer = socket.create_connection(server.address)
        socks = connect_idle(server.address, clients)
        server.wait(lambda: server.joined >= clients + 1, 60, "every client to join")
        for sock in socks:
            sock.close()
        time.sleep(late)  # the scenario's parameter: when the newcomer comes
        newcomer = socket.create_connection(server.address)
        started = time.monotonic()
        newcomer.sendall(b"first!\n")
        observer.settimeout(30)
        received = b""
        while not received.endswith(b"first!\n"):
            chunk = observer.recv(4096)
            if not chunk:
                raise SystemExit("the observer was disconnected")
            received += chunk
        delay = time.monotonic() - started
        server.wait(lambda: server.left >= clients, 60, "every departure to be logged")
        return delay
    finally:
        server.kill()


def run_sigterm(script, clients):
    """Seconds from SIGTERM to the server's exit, and its exit status."""
    server = Server(script, clients + 100)
    try:
        socks = connect_idle(server.address, clients)
        server.wait(lambda: server.joined >= clients, 60, "every client to join")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(30)
        elapsed = time.monotonic() - started
        for sock in socks:
            sock.close()
        return elapsed, status
    finally:
        server.kill()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["departure", "sigterm"], default="departure")
    parser.add_argument("--clients", type=int, default=4_000, help="idle clients (default 4000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per relay and setting (default 5)")
    parser.add_argument("--late", type=float, nargs="+", default=[0.0],
                        help="seconds between the departure and the newcomer (default 0)")
    parser.add_argument("--previous-commit", help="also measure a2/mychatserver.py at this commit")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 20_000 or not 1 <= args.runs <= 50:
        parser.error("--clients must be 1-20000 and --runs 1-50 (a bounded benchmark)")
    return args


def main(argv=None):
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.clients + 1_000  # per process: ours, and the server inherits the limit
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"needs {needed} file descriptors; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    with tempfile.TemporaryDirectory() as directory:
        relays = [("project", ROOT / "a2" / "mychatserver.py")]
        if args.previous_commit:
            try:
                bench.extract_previous(args.previous_commit, directory)
            except RuntimeError as exc:
                raise SystemExit(str(exc)) from None
            relays.append((f"at {args.previous_commit}", Path(directory) / "a2" / "mychatserver.py"))
        for name, script in relays:
            if args.scenario == "sigterm":
                results = [run_sigterm(script, args.clients) for _ in range(args.runs)]
                times = ", ".join(f"{seconds:.2f} s (exit {status})" for seconds, status in results)
                print(f"{name}: SIGTERM with {args.clients} clients: {times}")
                continue
            for late in args.late:
                delays = [run_departure(script, args.clients, late) for _ in range(args.runs)]
                print(f"{name}: {args.clients} leave, newcomer after {late:g} s: "
                      + ", ".join(f"{d:.3f}" for d in delays)
                      + f" s (median {statistics.median(delays):.3f}, max {max(delays):.3f})",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
