"""The /metrics endpoint as served: only when asked (without --metrics-port
the server stays stdlib-only, with no second listening socket; issue 4),
exit 1 when it cannot be served, and it cannot hurt the room (issue 14):
bounded connections, request and response timeouts, one thread, and one
snapshot per window for a scrape storm. Real server processes and real
sockets; counts, not timings. What the metrics say: test_metrics_values.py.

Why these tests exist: prometheus-client's start_http_server, used before,
kept one thread and one descriptor per connection with no timeout. 300 idle
connections held 300 threads and, under a low `ulimit -n`, took the
descriptors chat newcomers needed; each scrape walked every connection.
metrics/exporter.py's MetricsHTTPServer bounds all of that; here each bound is
observed from outside, in /proc and on the wire.
"""

import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import SERVER_SCRIPT, Peer, running_server, wait_until
from metrics import exporter as exporter_module
from metrics.exporter import MAX_CONNECTIONS, REQUEST_TIMEOUT, start_metrics_server
from reliability_helpers import listening_ports, tcp_sockets
from relayproc import process_usage

METRICS_LINE = re.compile(r"^Metrics on http://([\d.]+):(\d+)/metrics$")
IDLE_FLOOD = 300


def metrics_address(server):
    match = next(filter(None, map(METRICS_LINE.match, server.lines)))
    return match.group(1), int(match.group(2))


def scrape(address, timeout=5.0):
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=timeout) as response:
        assert response.status == 200
        return response.read()


def open_idle(address, n):
    """n connections that never send a byte."""
    return [socket.create_connection(address, timeout=5) for _ in range(n)]


def wait_all_closed_by_peer(socks, timeout):
    """Wait until the server has closed every socket in `socks` (EOF or reset)."""
    open_ = set(socks)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while open_:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(open_)} of {len(socks)} idle connections still open"
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", "the server sent something to a connection that never asked"
                selector.unregister(key.fileobj)
                open_.discard(key.fileobj)


def open_descriptors(pid):
    """What the process' descriptors are (for failure messages)."""
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def http_connections(pid, port):
    """How many of the process' descriptors are connections accepted on `port`."""
    return sum(1 for local, state in tcp_sockets(pid) if local == port and state != "0A")  # 0A = LISTEN


def close_all(socks):
    for sock in socks:
        sock.close()


# --- bounded under attack (issue 14) -------------------------------------------------

def test_300_idle_connections_hold_no_thread_and_few_descriptors(server_process):
    server = server_process("--quiet", "--metrics-port", "0")
    address = metrics_address(server)
    pid = server.proc.pid
    # The baseline: the accept loop is surely running (a client was served and
    # has left), and no HTTP connection is open (the server closes a scraped
    # one just after the client has read its answer).
    threads_before = process_usage(pid)[0]  # every thread the server starts before listening
    peer = Peer(server.address)
    server.wait_for_count("New connection", 1)
    peer.close()
    server.wait_for_count("closed (closed)", 1)
    wait_until(lambda: process_usage(pid)[0] == threads_before, message="the client's threads ended")
    scrape(address)
    wait_until(lambda: http_connections(pid, address[1]) == 0, message="the scrape's connection closed")
    fds_before = process_usage(pid)[1]

    idle = open_idle(address, IDLE_FLOOD)
    try:
        # Every one of them was accepted (none is left in the kernel's backlog
        # to be counted later) and only the newest MAX_CONNECTIONS stay open.
        wait_until(lambda: process_usage(pid)[1] <= fds_before + MAX_CONNECTIONS, timeout=10,
                   message="the metrics server to evict old idle connections")
        threads, fds, _ = process_usage(pid)
        assert threads == threads_before  # no thread per connection
        assert fds <= fds_before + MAX_CONNECTIONS

        # A real scrape is served at once, while the idle ones are still open
        # (a newcomer evicts the oldest connection that has not asked yet).
        body = scrape(address, timeout=REQUEST_TIMEOUT)
        assert b"chat_clients 0.0" in body

        # The idle ones are all closed by the server: the oldest at once, the
        # last MAX_CONNECTIONS when their REQUEST_TIMEOUT runs out.
        wait_all_closed_by_peer(idle, timeout=REQUEST_TIMEOUT + 5)
        wait_until(lambda: process_usage(pid)[1] == fds_before, timeout=5,
                   message=lambda: f"the server's descriptors back to {fds_before}: {open_descriptors(pid)}")
        assert process_usage(pid)[0] == threads_before
        assert b"chat_clients 0.0" in scrape(address)
    finally:
        close_all(idle)
    rc, _, err = server.stop()
    assert rc == 0 and err == ""


# The server's own descriptors (stdio, listeners, selectors, wake-up pairs: about
# 15) plus MAX_CONNECTIONS leave room for 80 clients; before, the flood took all.
FD_LIMIT = 128


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_chat_newcomers_are_served_under_a_low_fd_limit_during_an_idle_flood(server_process):
    """Under `ulimit -n 128`, 300 idle metrics connections used to take every
    descriptor; now they hold at most MAX_CONNECTIONS, and chat clients (who
    need one each) are all served and chat."""
    server = server_process("--quiet", "--metrics-port", "0", preexec_fn=low_fd_limit)
    address = metrics_address(server)
    idle = open_idle(address, IDLE_FLOOD)
    try:
        room = [Peer(server.address) for _ in range(20)]
        server.wait_for_count("New connection", len(room))
        for sender in room[:3]:
            sender.send(f"hello from {sender.port}\n")
            for receiver in room:
                if receiver is not sender:
                    receiver.expect(f"{sender.port}: hello from {sender.port}\n")
        assert b"chat_clients 20.0" in scrape(address)
        assert not any("Cannot accept" in line for line in server.errors)
        for peer in room:
            peer.close()
    finally:
        close_all(idle)
    rc, _, err = server.stop()
    assert rc == 0 and err == ""


class CountingServer:
    """Wraps a real ChatServer's stats() to count the snapshots taken."""

    def __init__(self, server):
        self._server = server
        self.calls = 0
        self._lock = threading.Lock()

    def stats(self):
        with self._lock:
            self.calls += 1
        return self._server.stats()


def test_a_storm_of_200_concurrent_scrapes_costs_one_snapshot():
    with running_server() as server:
        counting = CountingServer(server)
        exporter = start_metrics_server(counting, port=0, snapshot_window=30.0)
        try:
            peers = [Peer(server.address) for _ in range(5)]
            wait_until(lambda: server.client_count == 5, message="5 clients")
            start = threading.Barrier(200)
            bodies, failures = [], []

            def scraper():
                try:
                    start.wait(10)
                    bodies.append(scrape((exporter.host, exporter.port), timeout=20))
                except Exception as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=scraper) for _ in range(200)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert failures == []
            assert len(bodies) == 200 and len(set(bodies)) == 1
            assert b"chat_clients 5.0" in bodies[0]
            assert counting.calls == 1
            assert exporter.httpd.expositions == 1 and exporter.httpd.scrapes == 200
            for peer in peers:
                peer.close()
        finally:
            exporter.stop()


def test_the_snapshot_is_renewed_after_its_window():
    with running_server() as server:
        counting = CountingServer(server)
        window = 0.3
        exporter = start_metrics_server(counting, port=0, snapshot_window=window)
        address = (exporter.host, exporter.port)
        try:
            first_time = time.monotonic()
            first = scrape(address)
            peer = Peer(server.address)
            wait_until(lambda: server.client_count == 1, message="1 client")
            if time.monotonic() - first_time < window:  # still inside the window: the same bytes
                assert scrape(address) == first
            assert b"chat_clients 0.0" in first
            fresh = wait_until(lambda: (lambda body: body if b"chat_clients 1.0" in body else None)(
                scrape(address)), timeout=5, message="a new snapshot")
            assert time.monotonic() - first_time >= window
            assert fresh != first and counting.calls >= 2
            peer.close()
        finally:
            exporter.stop()


def test_newcomer_beyond_the_limit_evicts_the_oldest_idle_connection():
    with running_server() as server:
        exporter = start_metrics_server(server, port=0, max_connections=4, request_timeout=30.0)
        address = (exporter.host, exporter.port)
        idle = open_idle(address, 4)
        try:
            wait_until(lambda: len(exporter.httpd._connections) == 4, message="4 connections accepted")
            scrape(address)  # the fifth: served although 4 are open and idle
            wait_all_closed_by_peer(idle[:1], timeout=5)  # the oldest made room (long before 30 s)
            for sock in idle[1:]:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)  # still open, nothing sent to them
        finally:
            close_all(idle)
            exporter.stop()


def test_a_half_sent_request_is_closed_after_the_request_timeout():
    with running_server() as server:
        exporter = start_metrics_server(server, port=0, request_timeout=0.3)
        try:
            sock = socket.create_connection((exporter.host, exporter.port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
            started = time.monotonic()
            wait_all_closed_by_peer([sock], timeout=5)
            assert time.monotonic() - started >= 0.25  # not before its deadline
            sock.close()
            scrape((exporter.host, exporter.port))  # and the endpoint still serves
        finally:
            exporter.stop()


def raw_request(address, request):
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data


def test_http_answers_are_exact():
    with running_server() as server:
        exporter = start_metrics_server(server, port=0, snapshot_window=30.0)
        address = (exporter.host, exporter.port)
        try:
            body = scrape(address)
            get = raw_request(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = raw_request(address, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            expected_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            assert get == expected_head + body
            assert head == expected_head
            assert raw_request(address, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == (
                b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: 18\r\nConnection: close\r\n\r\nOnly GET and HEAD\n")
            assert raw_request(address, b"hello\r\n\r\n") == (
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: 12\r\nConnection: close\r\n\r\nBad request\n")
            too_long = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * exporter_module.MAX_REQUEST_BYTES
            assert raw_request(address, too_long) == (
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: 22\r\nConnection: close\r\n\r\nRequest head too long\n")
        finally:
            exporter.stop()


def test_stop_closes_open_connections_at_once():
    with running_server() as server:
        exporter = start_metrics_server(server, port=0, request_timeout=30.0)
        idle = open_idle((exporter.host, exporter.port), 3)
        try:
            wait_until(lambda: len(exporter.httpd._connections) == 3, message="3 connections accepted")
            exporter.stop()
            wait_all_closed_by_peer(idle, timeout=2)
            assert not exporter._thread.is_alive()
        finally:
            close_all(idle)


def test_accepts_are_capped_per_second_whatever_the_storm_offers():
    """The token bucket: at most burst + rate x elapsed connections are served,
    however many scrapers hammer the port; the others wait in the kernel's backlog."""
    rate, burst = 20.0, 4
    with running_server() as server:
        exporter = start_metrics_server(server, port=0, accept_rate=rate, max_connections=burst)
        address = (exporter.host, exporter.port)
        try:
            stop = threading.Event()
            served = []

            def hammer():
                while not stop.is_set():
                    try:
                        scrape(address, timeout=5)
                        served.append(1)
                    except OSError:
                        pass

            started = time.monotonic()
            threads = [threading.Thread(target=hammer) for _ in range(20)]
            for thread in threads:
                thread.start()
            wait_until(lambda: time.monotonic() - started >= 1.0 and len(served) >= 1, timeout=10,
                       message="a second of scraping")
            stop.set()
            for thread in threads:
                thread.join(10)
            elapsed = time.monotonic() - started
            assert 1 <= exporter.httpd.scrapes <= burst + rate * elapsed + 1, (exporter.httpd.scrapes, elapsed)
            assert len(served) == exporter.httpd.scrapes
        finally:
            exporter.stop()


# --- served only when asked, and only where it can be ----------------------------------

def test_server_without_metrics_port_is_stdlib_only(server_process):
    """-X importtime makes the real server list every module it imports on stderr."""
    proc = server_process(python_args=("-X", "importtime"))
    assert listening_ports(proc.proc.pid) == [proc.address[1]]  # no second socket
    assert not any("Metrics on" in line for line in proc.lines)
    rc, _, err = proc.stop()
    assert rc == 0
    imported = {line.rsplit("|", 1)[1].strip() for line in err.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"socket", "selectors", "threading"} <= imported  # the listing worked
    assert sorted(m for m in imported if m.split(".")[0] in ("prometheus_client", "metrics")) == []


def test_metrics_port_without_prometheus_client_exits_1():
    """python -S: no site-packages, so prometheus_client cannot be imported."""
    result = subprocess.run([sys.executable, "-S", str(SERVER_SCRIPT), "--port", "0", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "No module named 'prometheus_client'" in result.stderr
    assert result.stderr.rstrip().endswith("(./run-tests creates it; . .venv/bin/activate)")


def test_metrics_port_in_use_exits_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--port", "0", "--metrics-port", str(port)],
                                capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Cannot serve metrics on 127.0.0.1:{port}: ")
    assert len(result.stderr.splitlines()) == 1
