"""Fit to face strangers: per-host limits, connection storms, flood control,
one memory budget for all clients, IPv6, log floods. Distinct hosts are
127.0.0.2, 127.0.0.3 ... (each client binds before it connects), with
loopback's exemption narrowed to 127.0.0.1/32."""

import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from a2.mychatserver import LogFloodGate, TokenBucket
from conftest import CLIENT_SCRIPT, LOOPBACK, Peer, reset, running_server, wait_until
from relayproc import process_usage

pytestmark = pytest.mark.timeout(60)

PER_HOST_NOTICE = b"Too many connections from your address (%d). Try again later.\n"


def chat(sender, text, receivers):
    sender.send(text + "\n")
    for receiver in receivers:
        receiver.expect(f"{sender.port}: {text}\n")


def lines_of(peer, wanted, timeout=10.0):
    """Read until `wanted` complete lines have arrived; return them (decoded)."""
    peer.read_until(lambda got: got.count(b"\n") >= wanted, timeout)
    text = bytes(peer.received).decode()
    lines = text.split("\n")[:wanted]
    peer.received = bytearray(text.encode()[len("\n".join(lines)) + 1:])
    return lines


# --- per-host limits ------------------------------------------------------------------

def test_one_host_cannot_take_every_slot():
    with running_server(max_clients=200, max_per_host=50, exempt_hosts="127.0.0.1/32") as server:
        crowd = [Peer(server.address, source="127.0.0.2") for _ in range(60)]
        wait_until(lambda: server.stats()["refused_connections_total"]["per_host"] == 10,
                   message="10 per-host refusals")
        refused = []
        for peer in crowd:  # the refused ones are told in one line, then closed
            peer.sock.settimeout(0.05)
            try:
                data = peer.sock.recv(1024)
            except socket.timeout:
                continue
            refused.append(data)
        assert refused == [PER_HOST_NOTICE % 50] * 10
        assert server.client_count == 50

        # Another host joins and chats with the crowd's admitted members.
        newcomer = Peer(server.address, source="127.0.0.3")
        wait_until(lambda: server.client_count == 51, message="the newcomer admitted")
        members = [peer for peer in crowd if peer.received == b""][:3]
        newcomer.send("hello from another host\n")
        for member in members:
            member.read_until(lambda got: b"hello from another host" in got)
        # The exempt host fills the rest of the server.
        locals_ = [Peer(server.address) for _ in range(120)]
        wait_until(lambda: server.client_count == 171, message="120 exempt clients admitted")
        stats = server.stats()
        assert stats["refused_connections_total"] == {"full": 0, "per_host": 10, "connect_rate": 0}
        for peer in crowd + locals_ + [newcomer]:
            peer.close()


def test_a_host_that_leaves_gets_its_slots_back():
    with running_server(max_per_host=2, max_connect_rate=0, exempt_hosts="") as server:
        first, second = (Peer(server.address, source="127.0.0.2") for _ in range(2))
        third = Peer(server.address, source="127.0.0.2")
        assert third.expect_closed() == PER_HOST_NOTICE % 2
        first.leave()
        wait_until(lambda: server.client_count == 1, message="the first one gone")
        again = Peer(server.address, source="127.0.0.2")
        wait_until(lambda: server.client_count == 2, message="its slot reused")
        chat(again, "back", [second])
        # 127.0.0.1 is not exempt either ("" exempts nothing).
        local = [Peer(server.address) for _ in range(3)]
        assert local[2].expect_closed() == PER_HOST_NOTICE % 2
        for peer in (second, again, *local):
            peer.close()


def test_an_ipv6_host_is_its_slash_64_and_ipv4_mapped_is_ipv4():
    with running_server(max_per_host=1, exempt_hosts="") as server:
        assert server._host_key("2001:db8::1") == server._host_key("2001:db8::ffff:1")
        assert server._host_key("2001:db8::1") != server._host_key("2001:db8:0:1::1")
        assert str(server._host_key("::ffff:10.0.0.1")) == "10.0.0.1"
    with running_server(exempt_hosts="127.0.0.0/8,::1") as server:
        assert server._host_key("127.0.0.9") is None
        assert server._host_key("::ffff:127.0.0.1") is None
        assert server._host_key("::1") is None
        assert server._host_key("10.0.0.1") is not None


def test_a_connection_storm_is_refused_by_rate_and_logged_in_few_lines(server_process):
    server = server_process("--quiet", "--max-connect-rate", "20", "--exempt-hosts", "127.0.0.1/32")
    alice, bob = Peer(server.address), Peer(server.address)
    server.wait_for_count("New connection", 2)
    deadline = time.monotonic() + 3.0
    attempts = 0
    latencies = []
    while time.monotonic() < deadline:  # connect, send a line, reset: 3 s of it
        for _ in range(20):
            storm = socket.create_connection(server.address, source_address=("127.0.0.2", 0))
            try:
                storm.send(b"storm\n")
            except OSError:
                pass
            reset(storm)
            attempts += 1
        started = time.perf_counter()
        alice.send(f"still here {attempts}\n")  # bob hears the admitted storm lines too
        bob.read_until(lambda got: f"{alice.port}: still here {attempts}\n".encode() in got)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)  # alice chats at under 20 lines a second, within flood control
    # At most the burst (16, the per-host limit) and 20 a second got in.
    refused = server.count("Refusing", server.errors)
    admitted = server.count("New connection from ('127.0.0.2'")
    assert admitted <= 16 + 20 * 3.5 + 5, admitted
    latencies.sort()
    assert latencies[int(len(latencies) * 0.99) - 1] < 0.05, latencies[-5:]
    # Hundreds of refusals and resets, a handful of lines on stderr.
    assert attempts > 300
    assert refused <= 5
    assert len(server.errors) <= 30, server.errors


# --- flood control ----------------------------------------------------------------------

def test_a_flooder_is_slowed_to_its_rate_and_loses_nothing():
    rate, burst, sent = 100, 50, 400
    with running_server(max_rate=rate, max_burst=burst) as server:
        flooder, chatter, sleeper = Peer(server.address), Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 3, message="3 clients")
        started = time.monotonic()
        flooder.send("".join(f"flood {i}\n" for i in range(sent)))
        # After 1 s at most burst + rate lines have come (10% slack).
        chatter.read_until(lambda got: got.count(b"\n") >= burst)
        wait_until(lambda: time.monotonic() - started >= 1.0, timeout=2)
        early = chatter.received.count(b"\n")
        assert early <= (burst + rate * (time.monotonic() - started)) * 1.1, early
        assert server.stats()["throttled_clients"] == 1
        # Everything arrives, in order, each line once; the flooder is still here.
        got = lines_of(chatter, sent, timeout=10)
        assert got == [f"{flooder.port}: flood {i}" for i in range(sent)]
        elapsed = time.monotonic() - started
        assert elapsed >= (sent - burst) / rate * 0.9, elapsed
        assert lines_of(sleeper, sent) == got
        chat(flooder, "still connected", [chatter, sleeper])
        stats = server.stats()
        assert stats["throttle_pauses_total"] > 0 and stats["throttled_clients"] == 0
        assert stats["disconnects_total"]["slow_consumer"] == 0


def test_at_the_defaults_a_reader_that_pauses_1s_during_a_flood_is_kept():
    with running_server() as server:
        flooder, pauser = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2, message="2 clients")
        line = "f" * 990
        flood = b"".join(f"{i:05d} {line}\n".encode() for i in range(20000))  # 20 MB
        flooder.sock.setblocking(False)
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < 1.5:  # flood as fast as TCP takes it; pauser reads nothing
            try:
                sent += flooder.sock.send(flood[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.001)
        assert server.stats()["disconnects_total"]["slow_consumer"] == 0
        relayed = server.stats()["messages_relayed_total"]
        assert 100 <= relayed <= (100 + 50 * 1.5) * 1.1 + 5, relayed  # burst + rate
        got = lines_of(pauser, relayed, timeout=10)
        assert got == [f"{flooder.port}: {i:05d} {line}" for i in range(relayed)]


def test_a_flooders_exit_comes_after_its_lines():
    with running_server(max_rate=50, max_burst=10) as server:
        flooder, chatter = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2, message="2 clients")
        flooder.send("".join(f"line {i}\n" for i in range(60)) + "exit\n")
        got = lines_of(chatter, 60)
        assert got == [f"{flooder.port}: line {i}" for i in range(60)]
        assert flooder.expect_closed() == b""


def test_max_rate_0_turns_flood_control_off():
    with running_server(max_rate=0) as server:
        flooder, chatter = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2, message="2 clients")
        flooder.send("".join(f"line {i}\n" for i in range(2000)))
        assert len(lines_of(chatter, 2000)) == 2000
        assert server.stats()["throttle_pauses_total"] == 0


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 200),
       steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 300)), max_size=30))
def test_token_bucket_never_gives_more_than_burst_plus_rate_times_time(rate, burst, steps):
    now = 100.0
    bucket = TokenBucket(rate, burst, now)
    given_out = 0
    for pause, wanted in steps:
        now += pause
        taken = bucket.take(wanted, now)
        assert 0 <= taken <= wanted
        given_out += taken
        assert given_out <= burst + rate * (now - 100.0) + 1e-6
        if taken < wanted:  # wait() says when the next token is there
            assert bucket.take(1, now + bucket.wait() + 1e-9) == 1
            now += bucket.wait() + 1e-9
            given_out += 1


# --- one memory budget for all clients -------------------------------------------------

def _non_reader(address, receive_buffer):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(address)
    return sock


def test_past_the_memory_budget_the_largest_outbox_is_dropped_first():
    budget = 512 * 1024
    with running_server(max_rate=0, memory_budget=budget, outbound_budget=64 * 1024 * 1024) as server:
        big = _non_reader(server.address, 4096)        # refuses data first: the largest outbox
        small = _non_reader(server.address, 1024 * 1024)  # its kernel takes a megabyte first
        flooder, reader = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 4, message="4 clients")
        line = "x" * 900
        peak = 0
        for i in range(2000):
            flooder.send(f"{i} {line}\n")
            reader.read_until(lambda got: got.count(b"\n") >= i + 1)
            peak = max(peak, server.stats()["outbound_backlog_bytes"])
            if server.stats()["disconnects_total"]["memory_budget"]:
                break
        wait_until(lambda: server.stats()["disconnects_total"]["memory_budget"] == 1,
                   message="one memory-budget drop")
        assert peak <= budget
        # The big one was dropped; the small one is still a member.
        big.settimeout(5)
        received = b""
        while True:
            chunk = big.recv(65536)
            if not chunk:
                break
            received += chunk
        assert server.client_count == 3
        small.settimeout(5)
        assert small.recv(10) != b""
        for sock in (big, small):
            sock.close()
        flooder.close()
        reader.close()


def test_memory_held_by_dropped_clients_is_given_back(server_process):
    """Tens of megabytes of outboxes, dropped: RSS returns near where it was."""
    server = server_process("--quiet", "--max-rate", "0", "--memory-budget", str(16 * 1024 * 1024))
    pid = server.proc.pid
    flooder, reader = Peer(server.address), Peer(server.address)
    server.wait_for_count("New connection", 2)
    chat(flooder, "warm up", [reader])
    before = process_usage(pid)[2]
    sleepers = [_non_reader(server.address, 4096) for _ in range(200)]
    server.wait_for_count("New connection", 202)
    line = ("y" * 990 + "\n").encode()
    deadline = time.monotonic() + 20
    peak = before
    received = 0
    while time.monotonic() < deadline and server.count("memory budget", server.errors) == 0:
        flooder.send(line * 50)
        received += 50
        reader.read_until(lambda got: got.count(b"\n") >= received)
        peak = max(peak, process_usage(pid)[2])
    assert server.count("memory budget", server.errors) >= 1
    for sock in sleepers:
        sock.close()
    wait_until(lambda: server.count("closed (", None) >= 200, timeout=20,
               message="the sleepers gone")
    flooder.send("after\n")
    reader.read_until(lambda got: got.endswith(f"{flooder.port}: after\n".encode()))
    wait_until(lambda: process_usage(pid)[2] <= before + 24 * 1024, timeout=20,
               message=lambda: f"RSS back near {before} KiB (now {process_usage(pid)[2]} KiB, peak {peak})")
    assert peak - before <= (16 + 96) * 1024, (before, peak)


# --- IPv6 ----------------------------------------------------------------------------------

def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_ipv6_loopback_relays_with_the_senders_port(server_process):
    server = server_process("--host", "::1")
    assert server.address[0] == "::1"
    assert server.count(f"Server listening on [::1]:{server.address[1]}") == 1
    a, b = Peer(server.address), Peer(server.address)
    server.wait_for_count("New connection from ('::1', ", 2)
    chat(a, "over IPv6", [b])
    server.wait_for_line(f"{a.port}: over IPv6")


@needs_ipv6
def test_the_ipv6_any_address_takes_ipv4_clients_too(server_process):
    server = server_process("--host", "::")
    port = server.address[1]
    v6, v4 = Peer(("::1", port)), Peer((LOOPBACK, port))
    server.wait_for_count("New connection", 2)
    chat(v6, "from six", [v4])
    chat(v4, "from four", [v6])
    assert server.count("Warning: listening on ::", server.errors) == 1  # reachable from afar


@needs_ipv6
def test_the_client_talks_to_an_ipv6_server(server_process):
    import subprocess
    import sys
    server = server_process("--host", "::1")
    listener = Peer(server.address)
    server.wait_for_count("New connection", 1)
    client = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), "--host", "::1",
                               "--port", str(server.address[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        server.wait_for_count("New connection", 2)
        client.stdin.write("hello six\n")
        client.stdin.flush()
        listener.read_until(lambda got: b"hello six\n" in got)
        client.stdin.write("exit\n")
        client.stdin.flush()
        assert client.wait(5) == 0
    finally:
        client.kill()
        client.wait()


# --- log floods ----------------------------------------------------------------------------

def test_log_flood_gate_shows_a_few_then_sums_up_the_rest():
    gate = LogFloodGate(lines=3, window=10.0)
    shown = [gate.admit("Refusing %s", f"Refusing {i}", 100.0 + i * 0.01) for i in range(1000)]
    assert shown == [True] * 3 + [False] * 997
    assert gate.admit("Dropping %s", "Dropping 1", 100.5)  # another kind has its own count
    assert gate.due(109.9) == []
    assert gate.next_due(109.9) == pytest.approx(0.1)
    assert gate.due(110.0) == ['... and 997 more like "Refusing 0" in the last 10 s']
    assert gate.summarised == 997
    assert gate.due(110.5) == []  # "Dropping" was shown, nothing held back
    assert gate.next_due(111.0) is None
    assert gate.admit("Refusing %s", "Refusing again", 111.0)  # a new window


def test_thousands_of_refusals_write_a_handful_of_lines(server_process):
    server = server_process("--quiet", "--max-per-host", "1", "--exempt-hosts", "127.0.0.1/32")
    holder = Peer(server.address, source="127.0.0.2")
    server.wait_for_count("New connection", 1)
    for _ in range(500):
        refused = Peer(server.address, source="127.0.0.2")
        refused.close()
    probe = Peer(server.address, source="127.0.0.2")
    assert probe.expect_closed() == PER_HOST_NOTICE % 1
    assert server.count("Refusing", server.errors) == 5
    assert len(server.errors) <= 6
    holder.close()


@needs_ipv6
def test_metrics_on_ipv6(server_process):
    import urllib.request
    server = server_process("--quiet", "--metrics-port", "0", "--metrics-host", "::1")
    match = wait_until(lambda: server.find(r"^Metrics on http://\[::1\]:(\d+)/metrics$"),
                       message="the metrics line")
    with urllib.request.urlopen(f"http://[::1]:{match.group(1)}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'chat_refused_connections_total' in body or "chat_clients" in body
