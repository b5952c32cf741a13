#!/usr/bin/env python3
"""bench_scrape.py - what attacks on the /metrics endpoint cost the chat room, before and after.

Why it exists (issue 14): with prometheus-client's start_http_server, 200
concurrent scrapers raised the room's relay latency p50 from 13 ms to ~750 ms,
and 300 idle connections held 300 threads and, under `ulimit -n 256`, left
chat newcomers waiting. metrics/exporter.py now serves /metrics from one
bounded thread with one snapshot per window. This script measures both
endpoints in ONE run, on the same machine, with the same room:

    before  a ChatServer with prometheus-client's start_http_server around the
            same registry (metrics.exporter.build_registry): one thread per
            connection, no timeout, every scrape collects afresh
            (reproduced here with --serve-before, since the server no longer has it)
    after   python a2/mychatserver.py --metrics-port 0 (metrics/exporter.py)

For each: a room of --clients clients, --senders of them sending --rate
timestamped messages per second each; relay latency (send to receipt at
four observers, one clock: time.monotonic_ns) is measured quiet and then
during a storm of --scrapers concurrent scrapers (a separate process, each
thread scraping in a loop). Then --idle connections that never send a
request: the server's threads and descriptors, and how long one real scrape
takes meanwhile. Then the same idle flood under `ulimit -n 256`: how many of
20 chat newcomers are served. Everything on loopback, bounded in time
(about 2 minutes in all, most of it waiting for the
"before" server to accept the idle connections). Owner: the metrics helper (metrics/, this file).

    python loadtest/bench_scrape.py            # the run in loadtest/BENCHMARK.md
    python loadtest/bench_scrape.py --help
"""

import argparse
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "a2" / "mychatserver.py"
NEWCOMERS = 20
LOW_FD_LIMIT = 256


# --- the "before" server: prometheus-client's start_http_server ------------------------

def serve_before():
    """A ChatServer whose metrics are served the way they were before issue 14."""
    sys.path.insert(0, str(ROOT))
    import signal

    from prometheus_client import start_http_server

    from a2.mychatserver import ChatServer, configure_logging
    from metrics.exporter import build_registry

    configure_logging()
    server = ChatServer("127.0.0.1", 0, quiet=True)
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=build_registry(server))
    print(f"Metrics on http://127.0.0.1:{httpd.server_address[1]}/metrics", flush=True)
    print(f"Server listening on 127.0.0.1:{server.address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop_serving())
    server.serve_forever()
    server.shutdown()
    httpd.shutdown()


# --- the scrape storm (its own process, so it does not share our GIL) ------------------

def storm(url, threads, seconds):
    # The attacker shares this machine's two cores with the room; a real one
    # would be on other machines. Niced, it takes CPU the relay and the
    # measuring clients leave idle, so what is measured is the endpoint's cost.
    os.nice(19)
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def scraper():
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                outcome = "ok"
            except OSError:
                outcome = "failed"
            with lock:
                counts[outcome] += 1

    workers = [threading.Thread(target=scraper, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 15)
    print(json.dumps(counts), flush=True)


# --- measuring -------------------------------------------------------------------------

def proc_usage(pid):
    threads = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One relay under test as a subprocess; its chat and metrics addresses."""

    def __init__(self, variant, fd_limit=None):
        if variant == "before":
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-before"]
        else:
            command = [sys.executable, str(SERVER), "--port", "0", "--quiet", "--metrics-port", "0"]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))) if fd_limit else None
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, preexec_fn=limit)
        self.metrics = self.chat = None
        deadline = time.monotonic() + 15
        while self.chat is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"{variant} server did not start")
            line = self.proc.stdout.readline()
            if line.startswith("Metrics on http://"):
                self.metrics = int(line.rsplit(":", 1)[1].split("/")[0])
            elif line.startswith("Server listening on"):
                self.chat = int(line.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain
        self.url = f"http://127.0.0.1:{self.metrics}/metrics"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Room:
    """--clients chat clients read by one selector thread; senders stamp each
    message with time.monotonic_ns(), observers record send-to-receipt latency."""

    def __init__(self, port, clients, senders, rate):
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(clients)]
        self.senders = self.socks[:senders]
        self.observers = set(self.socks[senders:senders + 4])
        self.rate = rate
        self.latencies = []
        self.recording = False
        self._stop = threading.Event()
        self._buffers = {sock: b"" for sock in self.observers}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send, daemon=True)

    def wait_ready(self, timeout=15):
        """Until a probe from the first sender reaches every observer (all registered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.latencies.clear()
            self.recording = True
            self.senders[0].sendall(f"probe {time.monotonic_ns()}\n".encode())
            probe_deadline = time.monotonic() + 1
            while time.monotonic() < probe_deadline and len(self.latencies) < len(self.observers):
                time.sleep(0.01)
            self.recording = False
            if len(self.latencies) >= len(self.observers):
                self.latencies.clear()
                self._sender.start()
                return
        raise SystemExit("the room never got ready")

    def _read(self):
        with selectors.DefaultSelector() as selector:
            for sock in self.socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.2):
                    try:
                        data = key.fileobj.recv(262144)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    if key.fileobj in self.observers:
                        now = time.monotonic_ns()
                        buffer = self._buffers[key.fileobj] + data
                        *lines, self._buffers[key.fileobj] = buffer.split(b"\n")
                        if self.recording:
                            for line in lines:
                                stamp = line.rsplit(b" ", 1)[-1]
                                if stamp.isdigit():
                                    self.latencies.append((now - int(stamp)) / 1e6)

    def _send(self):
        interval = 1.0 / (self.rate * len(self.senders))
        next_time = time.monotonic()
        n = 0
        while not self._stop.is_set():
            sock = self.senders[n % len(self.senders)]
            try:
                sock.sendall(f"m{n} {time.monotonic_ns()}\n".encode())
            except BlockingIOError:
                pass  # the relay pushes back: skip, it shows as fewer samples
            except OSError:
                return
            n += 1
            next_time += interval
            delay = next_time - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def measure(self, seconds):
        self.latencies.clear()
        self.recording = True
        time.sleep(seconds)
        self.recording = False
        return list(self.latencies)

    def close(self):
        self._stop.set()
        self._reader.join(5)
        for sock in self.socks:
            sock.close()


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_scrape(url, timeout=10.0):
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
        return time.monotonic() - started, "ok"
    except OSError as exc:
        return time.monotonic() - started, type(exc).__name__


def connect_many(port, n, timeout=3.0):
    """n connections started at once (non-blocking); those established within
    `timeout` (a full listen backlog drops the rest's SYNs)."""
    pending = []
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        pending.append(sock)
    connected = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            selector.register(sock, selectors.EVENT_WRITE)
        while len(selector.get_map()) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fileobj)
                if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.append(key.fileobj)
                else:
                    key.fileobj.close()
    for sock in pending:
        if sock not in connected:
            sock.close()
    return connected


def open_idle(port, n, deadline_seconds=60.0):
    """n connections that never send, opened one after the other, each waiting
    (up to 3 s: a SYN dropped by a full listen backlog is re-sent after 1 s)
    until the kernel has it; bounded by `deadline_seconds` in all.
    prometheus-client's server listens with a backlog of 5 and accepted idle
    connections at ~6/s here, so "before" takes most of a minute."""
    socks, deadline = [], time.monotonic() + deadline_seconds
    while len(socks) < n and time.monotonic() < deadline:
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=3.0))
        except OSError:
            if socks and time.monotonic() < deadline:
                continue  # a full backlog: try again until the deadline
            break
    return socks


def settle(pid, still=0.5, seconds=5.0):
    """The server's (threads, fds) once they have not changed for `still` s."""
    last, since = proc_usage(pid), time.monotonic()
    deadline = since + seconds
    while time.monotonic() < deadline and time.monotonic() - since < still:
        time.sleep(0.1)
        now = proc_usage(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def peak_under_flood(pid, done, seconds=10.0, stall=3.0):
    """Peak (threads, fds) while a flood is being accepted: until done(threads,
    fds), or no new peak for `stall` s, or `seconds`. Patient, because a
    thread-per-connection server accepts idle connections slowly (~7/s measured
    here for prometheus-client's, in bursts as the kernel re-sends SYN-ACKs past
    its listen backlog of 5), while the clients already count as connected."""
    peak, since, started = proc_usage(pid), time.monotonic(), time.monotonic()
    while (not done(*peak) and time.monotonic() - since < stall
           and time.monotonic() - started < seconds):
        time.sleep(0.1)
        threads, fds = proc_usage(pid)
        if threads > peak[0] or fds > peak[1]:
            peak, since = (max(threads, peak[0]), max(fds, peak[1])), time.monotonic()
    return peak


T0 = time.monotonic()


def progress(text):
    print(f"[{time.monotonic() - T0:5.1f}s] {text}", file=sys.stderr, flush=True)


def run_variant(variant, args):
    result = {"variant": variant}
    progress(f"{variant}: starting the server and the room")
    server = Server(variant)
    room = Room(server.chat, args.clients, args.senders, args.rate)
    try:
        room.wait_ready()
        progress(f"{variant}: quiet phase")
        cpu0 = cpu_seconds(server.proc.pid)
        quiet = room.measure(args.seconds)
        cpu1 = cpu_seconds(server.proc.pid)
        scrapers = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--storm", server.url,
             "--scrapers", str(args.scrapers), "--seconds", str(args.seconds)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        progress(f"{variant}: scrape storm")
        peak_threads = 0
        storm_latencies = []
        room.latencies.clear()
        room.recording = True
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(0.25)
            peak_threads = max(peak_threads, proc_usage(server.proc.pid)[0])
        room.recording = False
        storm_latencies = list(room.latencies)
        cpu2 = cpu_seconds(server.proc.pid)
        out, _ = scrapers.communicate(timeout=args.seconds + 30)
        counts = json.loads(out.strip().splitlines()[-1])
        result.update(
            quiet_samples=len(quiet), quiet_p50_ms=percentile(quiet, 0.5), quiet_p99_ms=percentile(quiet, 0.99),
            quiet_cpu=(cpu1 - cpu0) / args.seconds,
            storm_samples=len(storm_latencies), storm_p50_ms=percentile(storm_latencies, 0.5),
            storm_p99_ms=percentile(storm_latencies, 0.99), storm_cpu=(cpu2 - cpu1) / args.seconds,
            storm_scrapes_ok=counts["ok"], storm_scrapes_failed=counts["failed"],
            storm_peak_threads=peak_threads)
    finally:
        room.close()

    # Idle flood: connections that never send a request.
    progress(f"{variant}: idle flood")
    threads0, fds0 = settle(server.proc.pid)
    idle = open_idle(server.metrics, args.idle)
    threads1, fds1 = peak_under_flood(server.proc.pid, lambda t, f: f >= fds0 + len(idle))
    scrape_seconds, scrape_outcome = timed_scrape(server.url)
    result.update(idle_opened=len(idle), idle_threads_before=threads0, idle_threads=threads1,
                  idle_fds_before=fds0, idle_fds=fds1, idle_scrape_seconds=scrape_seconds,
                  idle_scrape=scrape_outcome)
    progress(f"{variant}: stopping")
    for sock in idle:
        sock.close()
    server.stop()

    # The same flood under ulimit -n 256: are chat newcomers served?
    progress(f"{variant}: idle flood under ulimit -n {LOW_FD_LIMIT}")
    server = Server(variant, fd_limit=LOW_FD_LIMIT)
    threads_before = settle(server.proc.pid)[0]
    idle = open_idle(server.metrics, args.idle)
    peak = peak_under_flood(server.proc.pid, lambda t, f: f >= LOW_FD_LIMIT)
    result["low_fd_threads"] = peak[0] - threads_before
    served = newcomers_served(server.chat)
    result.update(low_fd_idle_opened=len(idle), low_fd_newcomers_served=served, low_fd_fds=peak[1])
    for sock in idle:
        sock.close()
    server.stop()
    return result


def newcomers_served(port, timeout=3.0):
    """How many of NEWCOMERS chat clients hear a message the first one sends
    (each must have been accepted into the room) within `timeout`."""
    socks = connect_many(port, NEWCOMERS, timeout)
    if not socks:
        return 0
    heard = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(heard) < len(socks) - 1:
        try:  # repeated: a client accepted later hears a later one
            socks[0].send(b"anyone there?\n")
        except OSError:
            pass  # not accepted (yet): its send buffer fills, or it was reset
        time.sleep(0.05)
        for sock in socks[1:]:
            if sock in heard:
                continue
            try:
                if b"anyone there?" in sock.recv(4096):
                    heard.add(sock)
            except OSError:
                pass
    served = len(heard) + (1 if heard else 0)  # the sender was in the room if anyone heard it
    for sock in socks:
        sock.close()
    return served


def main():
    parser = argparse.ArgumentParser(description="Room latency and endpoint resources under attacks on "
                                                 "/metrics: prometheus-client's server (before) vs ours (after).")
    parser.add_argument("--clients", type=int, default=100, help="clients in the room (default %(default)s)")
    parser.add_argument("--senders", type=int, default=4, help="of them sending (default %(default)s)")
    parser.add_argument("--rate", type=float, default=25.0, help="messages/s per sender (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase (default %(default)s)")
    parser.add_argument("--scrapers", type=int, default=200, help="concurrent scrapers (default %(default)s)")
    parser.add_argument("--idle", type=int, default=300, help="idle connections (default %(default)s)")
    parser.add_argument("--only", choices=("before", "after"), help="measure one endpoint only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve-before", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--storm", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_before:
        return serve_before()
    if args.storm:
        return storm(args.storm, args.scrapers, args.seconds)

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    started = time.monotonic()
    results = [run_variant(v, args) for v in (("before", "after") if args.only is None else (args.only,))]
    print(f"scrape-storm benchmark: {args.clients} clients, {args.senders} senders x {args.rate:g} msg/s, "
          f"{args.seconds:g} s per phase, {args.scrapers} scrapers, {args.idle} idle connections; "
          f"{os.cpu_count()} CPUs, loopback")
    print(f"{'endpoint':8} {'quiet p50/p99 ms':>17} {'storm p50/p99 ms':>17} {'scrapes ok/failed':>18} "
          f"{'cpu quiet/storm':>16} {'peak thr':>8}")
    for r in results:
        print(f"{r['variant']:8} {r['quiet_p50_ms']:8.1f}/{r['quiet_p99_ms']:<8.1f} "
              f"{r['storm_p50_ms']:8.1f}/{r['storm_p99_ms']:<8.1f} "
              f"{r['storm_scrapes_ok']:>9}/{r['storm_scrapes_failed']:<8} "
              f"{r['quiet_cpu']:7.2f}/{r['storm_cpu']:<8.2f} {r['storm_peak_threads']:>8}")
    print(f"{'endpoint':8} {'idle conns':>10} {'threads before/peak':>20} {'fds before/peak':>16} "
          f"{'scrape meanwhile':>17} {'ulimit 256: newcomers served':>29}")
    for r in results:
        print(f"{r['variant']:8} {r['idle_opened']:>10} {r['idle_threads_before']:>10}/{r['idle_threads']:<9} "
              f"{r['idle_fds_before']:>7}/{r['idle_fds']:<8} {r['idle_scrape_seconds']:8.2f}s {r['idle_scrape']:<8} "
              f"{r['low_fd_newcomers_served']:>13} of {NEWCOMERS} (fds {r['low_fd_fds']})")
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
