"""Limits: what happens at --max-clients, when the process runs out of file
descriptors, with clients that never speak, and with a client that never
reads. Each limit costs the newcomer or the offender, never the room."""

import logging
import resource
import socket
import threading
import time

import pytest

from a2.mychatserver import LOG_FLOOD_LINES
from conftest import Peer, running_server, wait_until
from reliability_helpers import parse_frames
from relayproc import cpu_seconds, process_usage

FULL_NOTICE = "Server full ({n} clients). Try again later.\n"


def say(sender, text, room):
    """`sender` says one line; everyone else in `room` receives exactly it."""
    sender.send(text + "\n")
    for receiver in room:
        if receiver is not sender:
            receiver.expect(f"{sender.port}: {text}\n")


def chat_round(room):
    for sender in room:
        say(sender, f"round from {sender.port}", room)


# --- --max-clients ---------------------------------------------------------------

def test_max_clients_newcomers_get_a_notice_and_the_room_is_untouched(server_process):
    server = server_process("--quiet", "--max-clients", "3")
    members = [Peer(server.address) for _ in range(3)]
    server.wait_for_count("New connection", 3)
    chat_round(members)

    notice = FULL_NOTICE.format(n=3).encode()
    polite = Peer(server.address)  # waits to be told
    assert polite.expect_closed() == notice
    talker = Peer(server.address)  # talks at once, before reading anything
    talker.send("let me in\n" * 50)
    assert talker.expect_closed() == notice
    crowd = [Peer(server.address) for _ in range(20)]
    for newcomer in crowd:
        assert newcomer.expect_closed() == notice

    # Nobody in the room heard of any of it, and the room still chats.
    for member in members:
        member.assert_silent()
    chat_round(members)

    # Once someone leaves, the next newcomer is a member like any other.
    members[0].send("exit")
    members[0].expect_closed()
    server.wait_for_count("closed (exit)", 1)
    late = Peer(server.address)
    members = members[1:] + [late]
    server.wait_for_count(f"New connection from ('127.0.0.1', {late.port})", 1)
    chat_round(members)
    for peer in members + [polite, talker] + crowd:
        peer.close()

    status, lines, err = server.stop()
    assert status == 0
    # The first LOG_FLOOD_LINES refusals are shown, the rest summed up in one line.
    refused = [polite, talker] + crowd
    refusals = [line for line in err.splitlines() if line.startswith("Refusing")]
    assert refusals == [f"Refusing ('127.0.0.1', {p.port}): Server full (3 clients). Try again later."
                        for p in refused[:LOG_FLOOD_LINES]]
    more = len(refused) - LOG_FLOOD_LINES
    assert f'... and {more} more like "{refusals[0]}" in the last 10 s' in err.splitlines()
    assert "Traceback" not in err


def test_rejections_are_counted(caplog):
    with running_server(max_clients=2) as server:
        members = [Peer(server.address) for _ in range(2)]
        wait_until(lambda: server.client_count == 2)
        for _ in range(5):
            newcomer = Peer(server.address)
            assert newcomer.expect_closed() == FULL_NOTICE.format(n=2).encode()
            newcomer.close()
        # Counted just after the refused socket is closed, so wait for it.
        wait_until(lambda: server.stats()["disconnects_total"]["rejected"] == 5)
        stats = server.stats()
        assert stats["clients"] == 2
        assert stats["connections_total"] == 7
        assert stats["disconnects_total"]["rejected"] == 5
        for member in members:
            member.close()


# --- file descriptors ------------------------------------------------------------

FD_LIMIT = 64


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.mark.timeout(60)
def test_out_of_descriptors_the_server_backs_off_and_recovers(server_process):
    server = server_process("--quiet", preexec_fn=low_fd_limit)
    pid = server.proc.pid
    # The server's own descriptors (stdio, listener, wake-up pair, epoll),
    # counted once it is surely serving: with one client in, less that one.
    clients = [Peer(server.address)]
    server.wait_for_count("New connection", 1)
    own = process_usage(pid)[1] - 1
    capacity = FD_LIMIT - own
    clients += [Peer(server.address) for _ in range(capacity + 11)]  # the kernel's backlog holds the rest
    server.wait_for_count("New connection", capacity)
    server.wait_for_error("Cannot accept a connection: Too many open files; pausing 0.1s")
    admitted = [c for c in clients if server.count(f"New connection from ('127.0.0.1', {c.port})")]
    pending = [c for c in clients if c not in admitted]
    assert len(admitted) == capacity and len(pending) == 12
    assert process_usage(pid)[1] == FD_LIMIT

    # Existing clients keep chatting: one message reaches every admitted client.
    first = admitted[0]
    say(first, "still here", admitted)
    say(admitted[1], "me too", admitted)
    for client in pending:
        client.assert_silent()

    # It backs off rather than spinning (one attempt per 0.1 s): over a second
    # it uses a small share of a CPU; and the warning, repeated every attempt,
    # is shown at most LOG_FLOOD_LINES times (the rest are summed up later).
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(1.0)  # the interval measured, not a synchronisation
    cpu = cpu_seconds(pid) - cpu_before
    assert cpu < 0.25, f"{cpu:.2f} s of CPU in {time.monotonic() - started:.2f} s: spinning"
    assert server.count("Cannot accept a connection", server.errors) <= LOG_FLOOD_LINES

    # Ten leave; the ten oldest pending clients are served; then the rest.
    for client in admitted[-10:]:
        client.leave()
    admitted = admitted[:-10]
    server.wait_for_count("New connection", capacity + 10)
    served, pending = pending[:10], pending[10:]
    for client in served:
        assert server.count(f"New connection from ('127.0.0.1', {client.port})") == 1
    for client in admitted[-2:]:
        client.leave()
    admitted = admitted[:-2]
    server.wait_for_count("New connection", capacity + 12)

    # The clients that waited in the backlog are members like any other.
    room = admitted + served + pending
    say(served[0], "I waited", room)
    say(pending[-1], "me too", room)
    say(first, "welcome", room)
    for client in room:
        client.close()
    server.wait_for_count(" closed (", len(clients))
    wait_until(lambda: process_usage(pid)[1] == own, message="descriptors released")
    status, lines, err = server.stop()
    assert status == 0
    assert "Traceback" not in err


# --- clients that never speak ------------------------------------------------------

@pytest.mark.timeout(60)
def test_clients_that_connect_and_never_speak_are_harmless(server_process):
    server = server_process("--quiet")
    pid = server.proc.pid
    threads0 = process_usage(pid)[0]
    silent = [Peer(server.address) for _ in range(200)]
    # Half a line from a line client, a raw client's lone byte: then silence.
    half, one_byte = Peer(server.address), Peer(server.address)
    a, b = Peer(server.address), Peer(server.address)
    server.wait_for_count("New connection", 204)
    half.send("first\nhalf a li")
    b.expect(f"{half.port}: first\n")
    one_byte.send("x")
    b.expect(f"{one_byte.port}: x\n")

    # Idle, they cost no CPU: no polling, no timers, every thread blocked.
    wait_until(lambda: process_usage(pid)[0] == threads0 + 204, message="all threads started")
    before, started = cpu_seconds(pid), time.monotonic()
    threading.Event().wait(1.0)  # a measurement window, not synchronisation
    used = cpu_seconds(pid) - before
    assert used <= 0.05 * (time.monotonic() - started) + 0.02, f"{used:.3f}s CPU while idle"

    # The room works at full speed and the silent ones hear everything.
    for i in range(50):
        a.send(f"message {i}\n")
    expected = "".join(f"{a.port}: message {i}\n" for i in range(50))
    b.expect(expected, timeout=10)
    want = {half.port: ["first"], one_byte.port: ["x"], a.port: [f"message {i}" for i in range(50)]}
    size = sum(len(f"{port}: {text}\n") for port, texts in want.items() for text in texts)
    for peer in silent:
        frames = parse_frames(peer.read_until(lambda got: len(got) >= size, timeout=10), peer.port)
        assert {port: [t for p, t in frames if p == port] for port in want} == want
        assert len(frames) == 52
    for peer in silent + [half, one_byte, a, b]:
        peer.close()
    server.wait_for_count(" closed (", 204)
    status, lines, err = server.stop()
    assert status == 0 and "Traceback" not in err


# --- the client that never reads ------------------------------------------------------

def never_reading_client(address):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    return sock


def read_all(sock, timeout=10.0):
    """Everything the server sent until it closed (what a late reader finds)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def test_a_client_that_never_reads_is_dropped_logged_and_counted(caplog):
    # Messages one at a time, each waited for by a reader: no flood racing
    # the reader for the GIL of this in-process server (the flooded case, as
    # a process, is tests/test_isolation.py), so only the stuck client can
    # fall behind.
    caplog.set_level(logging.INFO, logger="mychatserver")
    budget = 16 * 1024
    with running_server(outbound_budget=budget) as server:
        stuck = never_reading_client(server.address)
        talker, reader = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 3)
        expected = bytearray()
        for i in range(2000):
            line = f"{i:04d} " + "s" * 700
            talker.send(line + "\n")
            reader.expect(f"{talker.port}: {line}\n")
            expected += f"{talker.port}: {line}\n".encode()
            if server.stats()["disconnects_total"]["slow_consumer"]:
                break
        else:
            raise AssertionError("the client that never reads was never dropped")
        # Dropped once its socket buffers and its 16 KiB budget were full:
        # well under 2000 messages (about 1.4 MB), well over the budget.
        assert len(expected) > budget
        stats = server.stats()
        assert stats["clients"] == 2
        assert stats["disconnects_total"]["slow_consumer"] == 1
        assert stats["disconnects_total"]["error"] == 0
        address = f"('127.0.0.1', {stuck.getsockname()[1]})"
        messages = [r.getMessage() for r in caplog.records]
        assert f"Dropping {address}: more than {budget} bytes waiting to be sent (slow consumer)" in messages
        wait_until(lambda: f"Connection from {address} closed (slow_consumer)"
                   in [r.getMessage() for r in caplog.records])
        # What it finally reads is a prefix of the stream, then the close:
        # less than everything, and never a byte that was not sent.
        got = read_all(stuck)
        assert 0 < len(got) < len(expected)
        assert bytes(expected).startswith(got)
        # The others never noticed.
        reader.send("all good?\n")
        talker.expect(f"{reader.port}: all good?\n")
        for peer in (talker, reader):
            peer.close()
        stuck.close()


def test_a_client_behind_by_less_than_its_budget_is_kept_and_gets_everything():
    with running_server(max_rate=0) as server:  # the default budget: 256 KiB; 280 lines at once
        lagging = never_reading_client(server.address)
        talker, reader = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 3)
        lines = [f"{i:04d} " + "k" * 700 for i in range(280)]  # ~200 KB, under 256 KiB
        expected = b"".join(f"{talker.port}: {line}\n".encode() for line in lines)
        talker.send("".join(line + "\n" for line in lines))
        assert reader.read_until(lambda got: len(got) >= len(expected), timeout=30) == expected
        talker.send("exit")
        talker.expect_closed()
        wait_until(lambda: server.client_count == 2)
        assert server.stats()["disconnects_total"]["slow_consumer"] == 0
        # It reads at last, and finds every byte, in order.
        lagging.settimeout(10)
        got = bytearray()
        while len(got) < len(expected):
            chunk = lagging.recv(65536)
            assert chunk, "closed before everything arrived"
            got += chunk
        assert got == expected
        for sock in (lagging, reader):
            sock.close()
