"""`python a2/mychatserver.py` as a program: its transcript, options and signals."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import LOOPBACK, SERVER_SCRIPT, Peer, wait_until


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
