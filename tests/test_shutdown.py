"""Shutdown under load: SIGINT or SIGTERM with hundreds of clients connected,
some of them stuck mid-send, ends the server within 2 s with status 0 and no
traceback, and every client sees its connection closed; so does SIGTERM with
10,000 clients connected, and a signal at any moment of start-up never
shows a traceback of ours."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SERVER_SCRIPT, Peer, running_server, wait_until
from reliability_helpers import connect_idle, raise_fd_limit, tcp_queues
from relayproc import process_usage

IDLE = 300
STUCK = 3
HALF_LINES = 20


def read_to_close(sock, timeout=10.0):
    """Read until the server's FIN (or RST); fail if it never comes."""
    sock.settimeout(timeout)
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"{sock.getsockname()[1]}: connection never closed")
    return total


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_with_hundreds_of_clients_some_stuck_mid_send(server_process, sig):
    server = server_process("--quiet")
    server_port = server.address[1]
    idle = [Peer(server.address) for _ in range(IDLE)]
    # Clients the server is stuck sending to: they never read.
    stuck = []
    for _ in range(STUCK):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.address)
        stuck.append(sock)
    # Clients stuck half-way through a line (and a UTF-8 character).
    halfway = [Peer(server.address) for _ in range(HALF_LINES)]
    talker = Peer(server.address)
    flooder = Peer(server.address)
    everyone = idle + halfway + [talker, flooder]
    total = len(everyone) + STUCK
    server.wait_for_count("New connection", total, timeout=15)

    for i, peer in enumerate(halfway):
        peer.send(b"\nhalf a line " + ("\xf0\x9f" if i % 2 else "and no end").encode("latin-1"))
    # ~200 KB relayed: more than a stuck client's socket buffers hold, less
    # than its 256 KiB budget, so the server's writers for them block in send().
    talker.send(("z" * 990 + "\n") * 200)
    for sock in stuck:
        port = sock.getsockname()[1]
        wait_until(lambda port=port: (tcp_queues(server_port, port) or (0, 0))[0] > 0
                   and (tcp_queues(port, server_port) or (0, 0))[1] > 0, timeout=10,
                   message=f"the server blocked sending to {port}")
    # A client in the middle of sending a flood (blank lines: read and
    # discarded by the server, relayed to nobody) when the signal arrives.
    flood_error = []

    def flood():
        try:
            flooder.send(b" \n" * (64 << 20))
        except OSError as exc:
            flood_error.append(exc)

    flooding = threading.Thread(target=flood)
    flooding.start()
    wait_until(lambda: (tcp_queues(flooder.port, server_port) or (0, 0))[0] > 0,
               message="the flood to be in flight")

    started = time.monotonic()
    status, lines, err = server.stop(sig, timeout=10)
    elapsed = time.monotonic() - started
    assert status == 0
    assert elapsed < 2.0, f"shutdown took {elapsed:.2f}s; stderr: {err[-500:]!r}; stdout ends {lines[-3:]}"
    assert "Traceback" not in err
    assert lines[-2:] == [f"Shutting down: closing {total} connection(s)", "Server stopped"]

    # Every client sees its connection closed: idle clients read what was
    # relayed and then the end; stuck clients too; the flooder's reads see the
    # end while its send is still blocked (see the test below), which we
    # then stop ourselves.
    for peer in everyone:
        read_to_close(peer.sock)
        if peer is not flooder:
            peer.close()
    for sock in stuck:
        assert read_to_close(sock) > 0
        sock.close()
    try:
        flooder.sock.shutdown(socket.SHUT_RDWR)  # unblocks its send, if still blocked
    except OSError:
        pass  # already reset by the server
    flooding.join(10)
    assert not flooding.is_alive()
    flooder.close()


def test_a_client_blocked_sending_when_the_server_stops_gets_an_error_promptly(server_process):
    server = server_process("--quiet")
    flooder = Peer(server.address)
    server.wait_for_count("New connection", 1)
    failed = []

    def flood():
        flooder.sock.settimeout(3.0)
        try:
            flooder.sock.sendall(b" \n" * (64 << 20))
        except OSError as exc:
            failed.append(exc)

    flooding = threading.Thread(target=flood)
    flooding.start()
    wait_until(lambda: (tcp_queues(flooder.port, server.address[1]) or (0, 0))[0] > 0,
               message="the flood to be in flight")
    assert server.stop(signal.SIGTERM)[0] == 0
    flooding.join(10)
    flooder.close()
    assert len(failed) == 1, "the 128 MB flood cannot have been sent in full"
    if isinstance(failed[0], socket.timeout):
        raise failed[0]  # still blocked 3 s after the server exited
    assert isinstance(failed[0], (BrokenPipeError, ConnectionResetError))


def test_clients_leaving_as_the_server_stops_are_logged_before_it_stops(server_process):
    # Their departures race the shutdown: each is logged before the last
    # line, "Server stopped", or not at all (closed by the shutdown).
    # Repeated, since the race is narrow.
    for attempt in range(12):
        server = server_process("--quiet")
        clients = [Peer(server.address) for _ in range(100)]
        server.wait_for_count("New connection", len(clients))
        closer = threading.Thread(target=lambda: [client.close() for client in clients])
        closer.start()
        wait_until(lambda: server.count(" closed (closed)") >= 10)
        status, lines, err = server.stop()
        closer.join()
        assert status == 0 and "Traceback" not in err
        assert lines[-1] == "Server stopped", (attempt, lines[-3:])
        assert sum(" closed (closed)" in line for line in lines) <= len(clients)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", [False, True])
def test_counters_do_not_go_backwards_when_the_server_stops(wait):
    """A scrape after shutdown() (wait=False: the process's exit closes the
    sockets; wait=True: every client closed) still counts what the clients
    that were connected sent: a Prometheus counter never goes down."""
    with running_server() as server:
        a, b = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2)
        a.send("one\ntwo\n")
        b.expect(f"{a.port}: one\n{a.port}: two\n")
        before = server.stats()
        assert before["messages_received_total"] == 2
        server.shutdown(wait=wait)
        after = server.stats()
        for counter in ("messages_received_total", "received_bytes_total", "messages_relayed_total"):
            assert after[counter] == before[counter], counter
        a.close()
        b.close()


# --- 10,000 clients connected (relay core v2; issue 11) -------------------------------

@pytest.mark.timeout(120)
def test_sigterm_with_10000_clients_exits_0_within_2s(server_process):
    raise_fd_limit(10_000 + 1_000)
    server = server_process("--quiet")
    pid = server.proc.pid
    threads0 = process_usage(pid)[0]
    socks = connect_idle(server.address, 10_000)
    try:
        server.wait_for_count("New connection", 10_000, timeout=60)
        wait_until(lambda: process_usage(pid)[0] >= threads0 + 10_000, timeout=30,
                   message="a reader thread for every client")
        started = time.monotonic()
        status, lines, err = server.stop(signal.SIGTERM, timeout=10)
        elapsed = time.monotonic() - started
        assert status == 0 and "Traceback" not in err, err
        assert elapsed < 2.0, f"SIGTERM took {elapsed:.2f}s"
        assert lines[-1] == "Server stopped"
    finally:
        for sock in socks:
            sock.close()


# --- a signal at any moment of start-up -----------------------------------------------

def _signal_caught(pid, signum):
    """True once the process has a handler for `signum` (/proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.timeout(120)
def test_sigint_at_any_moment_of_startup_never_shows_our_traceback():
    """Ctrl-C at delays across the whole start-up. Python itself may be
    interrupted before it runs the file's first line (killed by the signal, or
    a traceback with no line of ours in it); from the first line on, the
    server exits 0 without a traceback."""
    rng = random.Random(os.getpid())
    delays = [i / 1000 for i in range(0, 120, 10)] + [rng.uniform(0, 0.12) for _ in range(6)]
    ours = re.compile(r'mychatserver\.py", line ([1-9]\d*)')
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        time.sleep(delay)  # the moment of the signal is what is under test
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=2)  # a caught SIGINT exits in a fraction of that
        except subprocess.TimeoutExpired:
            # Python's own start-up caught the KeyboardInterrupt and went on,
            # printing it (e.g. "Failed checking if argv[0] is an import path
            # entry") or not (seen once at delay 0: nothing at all): the signal
            # never reached the script. A second one does, and it exits 0.
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=5)
            assert proc.returncode == 0, (delay, proc.returncode, err)
        assert not ours.search(err.decode()), (delay, err.decode())
        if proc.returncode != 0:  # Python's own: killed by the signal, or its KeyboardInterrupt
            assert proc.returncode in (-signal.SIGINT, 1), (delay, proc.returncode, err)
            assert b"KeyboardInterrupt" in err or proc.returncode == -signal.SIGINT, (delay, err)
    # Once SIGTERM is caught the file's first lines have run: always 0 from then on.
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        wait_until(lambda: proc.poll() is not None or _signal_caught(proc.pid, signal.SIGTERM),
                   message="the SIGTERM handler")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and b"Traceback" not in err, err
