"""`python a2/mychatserver.py` as a program: its transcript, options and
signals; its log output when nobody reads it; the warning when it listens
beyond loopback."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import LOOPBACK, SERVER_SCRIPT, Peer, reset, wait_until
from relayproc import listening_address


def connected(server, n):
    wait_until(lambda: sum(line.startswith("New connection") for line in server.lines) == n,
               message=f"{n} connections logged")


def test_transcript_matches_the_assignment_example(server_process):
    server = server_process(python_args=("-S",))  # -S: no site-packages, stdlib only
    c1 = Peer(server.address)
    connected(server, 1)
    c2 = Peer(server.address)
    connected(server, 2)
    c3 = Peer(server.address)
    connected(server, 3)
    for sender, text, readers in ((c1, "Hi!", (c2, c3)), (c2, "Hello!", (c1, c3)),
                                  (c3, "How are you guys doing?", (c1, c2)), (c2, "Good.", (c1, c3))):
        sender.send(text)
        for reader in readers:
            reader.expect(f"{sender.port}: {text}\n")
    for n, peer in enumerate((c1, c2, c3), 1):
        peer.leave()
        wait_until(lambda: sum("closed (exit)" in line for line in server.lines) == n)
    status, lines, err = server.stop()
    host, port = server.address
    address = {c: f"('127.0.0.1', {c.port})" for c in (c1, c2, c3)}
    assert lines[:8] == [
        f"Server listening on {host}:{port}",
        f"New connection from {address[c1]}",
        f"New connection from {address[c2]}",
        f"New connection from {address[c3]}",
        f"{c1.port}: Hi!",
        f"{c2.port}: Hello!",
        f"{c3.port}: How are you guys doing?",
        f"{c2.port}: Good.",
    ]
    assert lines[8:] == [f"Connection from {address[c]} closed (exit)" for c in (c1, c2, c3)] + [
        "Server stopped"]
    assert status == 0
    assert err == ""


def test_quiet_omits_message_lines(server_process):
    server = server_process("--quiet")
    a, b = Peer(server.address), Peer(server.address)
    connected(server, 2)
    a.send("secret\n")
    b.expect(f"{a.port}: secret\n")
    a.close()
    b.close()
    status, lines, err = server.stop()
    assert (status, err) == (0, "")
    assert not any("secret" in line for line in lines)


def test_port_in_use_is_one_line_and_status_1():
    with socket.create_server((LOOPBACK, 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--port", str(port)],
                                capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("args, complaint", [
    (["--port", "70000"], "argument --port: must be 0-65535, got 70000"),
    (["--port", "http"], "argument --port: invalid _port value: 'http'"),
    (["--max-clients", "0"], "argument --max-clients: must be at least 1, got 0"),
])
def test_bad_options_are_usage_errors(args, complaint):
    result = subprocess.run([sys.executable, str(SERVER_SCRIPT), *args],
                            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(complaint)


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--help"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    for option in ("--host", "--port", "--quiet", "--max-clients", "--outbound-budget",
                   "--metrics-port", "--metrics-host"):
        assert option in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_with_clients_connected_stops_cleanly_within_2s(server_process, sig):
    server = server_process("--quiet")
    idle = [Peer(server.address) for _ in range(20)]
    # One client stuck mid-send from our side: the server is blocked sending
    # to it (it never reads), with its queue full.
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(server.address)
    talker = Peer(server.address)
    connected(server, 22)
    talker.send(("y" * 900 + "\n") * 300)
    idle[0].read_until(lambda got: len(got) > 100_000)
    started = time.monotonic()
    status, lines, err = server.stop(sig, timeout=5)
    elapsed = time.monotonic() - started
    assert status == 0
    assert elapsed < 2.0
    assert "Traceback" not in err
    assert lines[-2:] == ["Shutting down: closing 22 connection(s)", "Server stopped"]
    for peer in idle + [talker]:
        peer.expect_closed(timeout=2)
        peer.close()
    stuck.close()


# --- a stalled log output does not stall the room (relay core v2) ---------------------

def _unread_server(*args):
    """A server whose stdout and stderr pipes nobody reads after its first line."""
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = proc.stdout.readline().decode()
    address = listening_address(first)
    assert address, first
    return proc, address


@pytest.mark.timeout(60)
def test_a_stalled_log_output_does_not_freeze_the_room():
    proc, address = _unread_server("--max-rate", "0")  # a sends 400 lines at once
    try:
        # b is accepted, so joins the room, before a: it hears all of a's messages.
        b = Peer(address)
        a = Peer(address)
        a.send("hello\n")
        b.read_until(lambda got: got.endswith(b"hello\n"))
        b.received = bytearray()
        # 400 lines of ~1 KB each: the transcript is far more than a pipe holds.
        lines = [f"{i:04d} " + "x" * 900 for i in range(400)]
        expected = "".join(f"{a.port}: {line}\n" for line in lines).encode()
        for line in lines:
            a.send(line + "\n")
        assert b.read_until(lambda got: len(got) >= len(expected), timeout=20) == expected
        # Churn under a stalled stderr too: warnings (resets) cannot block either.
        for _ in range(50):
            reset(Peer(address).sock)  # the server's recv() fails: a warning on stderr
        a.send("still here\n")
        b.received = bytearray()
        b.expect(f"{a.port}: still here\n", timeout=10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 2.0
        a.close()
        b.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_a_closed_stdout_costs_the_transcript_only_not_a_traceback():
    """`mychatserver.py | head -1`: once the pipe is closed, the transcript's
    lines go nowhere, and stderr says nothing about it (no "Logging error"
    traceback per line); the room goes on and the server stops cleanly."""
    proc, address = _unread_server()
    proc.stdout.close()  # as `head -1` does after the first line
    try:
        b = Peer(address)
        a = Peer(address)
        for i in range(20):
            a.send(f"line {i}\n")
        b.expect("".join(f"{a.port}: line {i}\n" for i in range(20)), timeout=10)
        a.close()
        b.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# --- exposure: listening beyond loopback is never silent ------------------------------

@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)])
def test_listening_beyond_loopback_prints_one_warning(server_process, host, warned):
    server = server_process("--host", host)
    status, lines, err = server.stop()
    assert status == 0
    warning = f"Warning: listening on {host}: the chat is reachable from other machines\n"
    assert err == (warning if warned else "")
