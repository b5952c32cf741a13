"""The metrics' values (metrics/exporter.py's ChatCollector): every chat_*
figure equals exactly what happened, against a real ChatServer in this
process, on arbitrary snapshots (hypothesis), and from the real program
started with --metrics-port. How the endpoint is served and what it cannot
do to the room: test_metrics_endpoint.py.

Why these tests exist: issue 4 requires every counter to equal exactly what
happened, also with many clients at once. Values are read the way
Prometheus reads them: over HTTP, parsed with prometheus_client.parser.

The server counts a few things just after the observable event (a sender's
counters after its fan-out, sent bytes after sendall() returns, a disconnect
after the connection's threads finish), so each test waits, with a deadline,
until the scrape equals the exact expected values and then asserts equality:
a wrong value fails with a full diff, never with a timeout alone.

Issue 19 (strangers) adds refusals by reason, flood control, the memory
budget and the log flood gate: each is caused for real against a running
server and its exported value checked exactly.
"""

import itertools
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from a2.mychatserver import (DEFAULT_MEMORY_BUDGET, DISCONNECT_REASONS, LATENCY_BUCKETS, LOG_FLOOD_LINES,
                             REFUSAL_REASONS, VERSION, frame)
from conftest import SERVER_SCRIPT, Peer, running_server, wait_until
from reliability_helpers import listening_ports
from metrics.exporter import BACKBONE_METRIC_NAMES, METRIC_NAMES, ChatCollector, start_metrics_server

METRICS_LINE = re.compile(r"^Metrics on http://([\d.]+):(\d+)/metrics$")
# The contract's accept() failure reasons (core-v2-contract.md), every one exposed from the start.
ACCEPT_ERROR_REASONS = ("emfile", "enfile", "enobufs", "enomem", "other")


# --- helpers ------------------------------------------------------------------

def fetch(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_key(sample):
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}}" if labels else sample.name


def chat_values(text):
    """Every chat_ sample except the latency histogram's: {'name{labels}': value}."""
    return {sample_key(sample): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("chat_")
            and family.type != "histogram" for sample in family.samples}


def expected_values(*, connections, clients, max_clients, received, relayed, received_bytes,
                    sent_bytes, backlog=0, max_backlog=0, accept_errors=None, flow_pauses=0,
                    flow_pause_seconds=0.0, log_dropped=0, version=VERSION, refused=None, throttled=0,
                    throttle_pauses=0, throttled_seconds=0.0, budget_bytes=DEFAULT_MEMORY_BUDGET,
                    log_summarised=0, **disconnects):
    values = {
        "chat_connections_total": connections,
        "chat_clients": clients,
        "chat_max_clients": max_clients,
        "chat_messages_received_total": received,
        "chat_messages_relayed_total": relayed,
        "chat_received_bytes_total": received_bytes,
        "chat_sent_bytes_total": sent_bytes,
        "chat_outbound_backlog_bytes": backlog,
        f'chat_build_info{{version="{version}"}}': 1,
        "chat_max_client_backlog_bytes": max_backlog,
        "chat_flow_control_pauses_total": flow_pauses,
        "chat_flow_control_pause_seconds_total": flow_pause_seconds,
        "chat_log_lines_dropped_total": log_dropped,
        "chat_throttled_clients": throttled,
        "chat_throttle_pauses_total": throttle_pauses,
        "chat_throttled_seconds_total": throttled_seconds,
        "chat_memory_budget_bytes": budget_bytes,
        "chat_log_lines_summarised_total": log_summarised,
    }
    assert set(disconnects) <= set(DISCONNECT_REASONS), disconnects
    for reason in DISCONNECT_REASONS:
        values[f'chat_disconnects_total{{reason="{reason}"}}'] = disconnects.get(reason, 0)
    for reason in ACCEPT_ERROR_REASONS:
        values[f'chat_accept_errors_total{{reason="{reason}"}}'] = (accept_errors or {}).get(reason, 0)
    assert set(refused or {}) <= set(REFUSAL_REASONS), refused
    for reason in REFUSAL_REASONS:
        values[f'chat_refused_connections_total{{reason="{reason}"}}'] = (refused or {}).get(reason, 0)
    return {key: float(value) for key, value in values.items()}


def scrape_until(url, expected, timeout=5.0):
    """Scrape until the chat_ values equal `expected`; then return the full text.
    On timeout, fail with the difference between the last scrape and `expected`.
    `expected` may be a function, called afresh for each scrape (values that
    must settle, e.g. taken from server.stats())."""
    last, want = {}, {}

    def matches():
        nonlocal last, want
        want = expected() if callable(expected) else expected
        text = fetch(url)
        last = chat_values(text)
        return text if last == want else None

    try:
        return wait_until(matches, timeout, message="exact metric values")
    except AssertionError:
        assert last == want  # shows the diff
        raise


def histogram(text, name="chat_relay_latency_seconds"):
    """(les, cumulative bucket values, count, sum) from an exposition."""
    family = families(text)[name]
    assert family.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == name + "_bucket"]
    count = [s.value for s in family.samples if s.name == name + "_count"]
    total = [s.value for s in family.samples if s.name == name + "_sum"]
    assert len(count) == len(total) == 1
    return [le for le, _ in buckets], [v for _, v in buckets], count[0], total[0]


def assert_histogram_matches(text, stats):
    """The exposed histogram is exactly the server's snapshot, made cumulative."""
    les, values, count, total = histogram(text)
    assert les == [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    assert values == [float(v) for v in itertools.accumulate(stats["relay_latency_counts"])]
    assert count == values[-1] == stats["messages_received_total"]
    assert total == stats["relay_latency_sum"]  # repr() round-trips a float exactly


@pytest.fixture
def metered():
    """A factory: metered(**server_kwargs) -> (server, exporter), both stopped at teardown."""
    stack = []

    def start(**kwargs):
        context = running_server(**kwargs)
        server = context.__enter__()
        stack.append(context)
        exporter = start_metrics_server(server, port=0)
        stack.append(exporter)
        return server, exporter

    yield start
    for item in reversed(stack):
        if hasattr(item, "stop"):
            item.stop()
        else:
            item.__exit__(None, None, None)


# --- the exporter in-process ------------------------------------------------------

def test_fresh_server_exposes_every_family_at_zero(metered):
    server, exporter = metered(max_clients=7)
    text = fetch(exporter.url)
    found = families(text)

    assert [name for name in found if name.startswith("chat_")] == [
        "chat_connections", "chat_clients", "chat_max_clients", "chat_messages_received",
        "chat_messages_relayed", "chat_received_bytes", "chat_sent_bytes", "chat_disconnects",
        "chat_outbound_backlog_bytes", "chat_relay_latency_seconds", "chat_build_info",
        "chat_max_client_backlog_bytes", "chat_accept_errors", "chat_flow_control_pauses",
        "chat_flow_control_pause_seconds", "chat_log_lines_dropped",
        "chat_refused_connections", "chat_throttled_clients", "chat_throttle_pauses",
        "chat_throttled_seconds", "chat_memory_budget_bytes", "chat_log_lines_summarised"]
    assert {name: found[name].type for name in found if name.startswith("chat_")} == {
        "chat_connections": "counter", "chat_clients": "gauge", "chat_max_clients": "gauge",
        "chat_messages_received": "counter", "chat_messages_relayed": "counter",
        "chat_received_bytes": "counter", "chat_sent_bytes": "counter",
        "chat_disconnects": "counter", "chat_outbound_backlog_bytes": "gauge",
        "chat_relay_latency_seconds": "histogram", "chat_build_info": "gauge",
        "chat_max_client_backlog_bytes": "gauge", "chat_accept_errors": "counter",
        "chat_flow_control_pauses": "counter", "chat_flow_control_pause_seconds": "counter",
        "chat_log_lines_dropped": "counter",
        "chat_refused_connections": "counter", "chat_throttled_clients": "gauge",
        "chat_throttle_pauses": "counter", "chat_throttled_seconds": "counter",
        "chat_memory_budget_bytes": "gauge", "chat_log_lines_summarised": "counter"}
    assert not any(name.startswith("chat_backbone") for name in found)  # no --backbone
    # METRIC_NAMES (used by the docs tests) is the exposed list, as Prometheus names series.
    assert list(METRIC_NAMES) == [name + "_total" if found[name].type == "counter" else name
                                  for name in found if name.startswith("chat_")]
    assert "queued for every recipient (not to the kernel)" in found["chat_relay_latency_seconds"].documentation

    assert chat_values(text) == expected_values(connections=0, clients=0, max_clients=7, received=0,
                                                relayed=0, received_bytes=0, sent_bytes=0)
    les, values, count, total = histogram(text)
    assert les == ["5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
                   "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "+Inf"]
    assert values == [0.0] * 15 and count == 0.0 and total == 0.0

    # The client library's default collectors, on our own registry.
    for name in ("process_cpu_seconds", "process_open_fds", "process_resident_memory_bytes",
                 "python_info", "python_gc_objects_collected", "python_gc_collections"):
        assert name in found, name


def test_scripted_conversation_every_value_exact(metered):
    server, exporter = metered(max_clients=3)
    a, b, c = Peer(server.address), Peer(server.address), Peer(server.address)
    wait_until(lambda: server.client_count == 3, message="3 clients")

    a.send("hello\n")
    b.expect(frame(a.port, "hello"))
    c.expect(frame(a.port, "hello"))

    b.send("one\ntwo\n")  # two lines in one send are two messages
    for peer in (a, c):
        peer.expect(frame(b.port, "one") + frame(b.port, "two"))

    c.send("exit\n")
    assert c.expect_closed() == b""
    wait_until(lambda: server.client_count == 2, message="c removed")

    d = Peer(server.address)  # the newcomer
    wait_until(lambda: server.client_count == 3, message="d registered")
    e = Peer(server.address)  # one too many: refused
    assert e.expect_closed() == b"Server full (3 clients). Try again later.\n"

    d.send("hi there\n")
    for peer in (a, b):
        peer.expect(frame(d.port, "hi there"))

    a.send("   \n")  # whitespace only: neither counted nor relayed
    a.send("bye\n")
    for peer in (b, d):
        peer.expect(frame(a.port, "bye"))  # exact: nothing for the blank line

    b.close()
    wait_until(lambda: server.client_count == 2, message="b removed")

    sent = (2 * len(frame(a.port, "hello"))
            + 2 * len(frame(b.port, "one") + frame(b.port, "two"))
            + 2 * len(frame(d.port, "hi there"))
            + 2 * len(frame(a.port, "bye")))
    expected = expected_values(
        connections=5,  # a b c d, and e which was refused
        clients=2,      # a d
        max_clients=3,
        received=5,     # hello, one, two, hi there, bye
        relayed=10,     # 2 + 2*2 + 2 + 2
        received_bytes=len(b"hello\n" b"one\ntwo\n" b"exit\n" b"hi there\n" b"   \n" b"bye\n"),
        sent_bytes=sent,  # relayed frames only; e's "Server full" notice is not a chat frame
        exit=1, closed=1, rejected=1, refused={"full": 1})
    text = scrape_until(exporter.url, expected)
    assert_histogram_matches(text, server.stats())
    for peer in (a, d, e):
        peer.close()


def test_many_clients_sending_at_once_counters_exact(metered):
    clients, messages = 16, 40
    server, exporter = metered()
    peers = [Peer(server.address, timeout=15) for _ in range(clients)]
    wait_until(lambda: server.client_count == clients, message=f"{clients} clients")
    lines = {p.port: [f"client {i} message {j}" for j in range(messages)] for i, p in enumerate(peers)}
    inbound = {p.port: sum(len(frame(q.port, m)) for q in peers if q is not p for m in lines[q.port])
               for p in peers}
    start = threading.Barrier(clients + 1)
    failures = []

    def talk(peer):
        try:
            start.wait(10)
            for message in lines[peer.port]:  # one send per message: many small reads
                peer.send(message + "\n")
            peer.read_until(lambda got: len(got) >= inbound[peer.port], timeout=15)
        except Exception as exc:  # reported below, with the client that failed
            failures.append((peer.port, exc))

    # A scraper runs throughout: scraping under load must work, and no counter
    # may ever go backwards (departed connections are folded in atomically).
    stop_scraping = threading.Event()
    scrapes = []

    def scrape_continuously():
        previous = {}
        while not stop_scraping.is_set():
            values = chat_values(fetch(exporter.url))
            for key, value in values.items():
                if key.startswith(("chat_clients", "chat_outbound_backlog_bytes", "chat_max_clients",
                                   "chat_max_client_backlog_bytes", "chat_build_info")):
                    continue  # gauges
                if value < previous.get(key, 0):
                    failures.append(("scraper", f"{key} went from {previous[key]} to {value}"))
            previous = values
            scrapes.append(values)

    threads = [threading.Thread(target=talk, args=(p,)) for p in peers]
    scraper = threading.Thread(target=scrape_continuously)
    for thread in threads + [scraper]:
        thread.start()
    start.wait(10)
    for thread in threads:
        thread.join(20)
    stop_scraping.set()
    scraper.join(10)
    assert failures == []
    assert len(scrapes) >= 1

    for peer in peers:  # every client got every other client's lines, in each sender's order
        got = peer.received.decode().splitlines()
        assert len(got) == (clients - 1) * messages
        for other in peers:
            if other is not peer:
                prefix = f"{other.port}: "
                assert [g[len(prefix):] for g in got if g.startswith(prefix)] == lines[other.port]

    total = clients * messages
    # Back-pressure pauses are not knowable in advance (they depend on thread
    # scheduling); once everything is delivered they no longer change, so the
    # scrape must equal the server's own figures.
    settled = server.stats()
    expected = expected_values(
        connections=clients, clients=clients, max_clients=server.max_clients,
        received=total, relayed=total * (clients - 1),
        received_bytes=sum(len(m) + 1 for ms in lines.values() for m in ms),
        sent_bytes=sum(inbound.values()), flow_pauses=settled["flow_control_pauses_total"],
        flow_pause_seconds=settled["flow_control_pause_seconds_total"])
    text = scrape_until(exporter.url, expected, timeout=10)
    assert_histogram_matches(text, server.stats())
    for peer in peers:
        peer.close()


def test_slow_consumer_drop_is_counted(metered):
    """A client that never reads is dropped (reason slow_consumer); the counters
    that are knowable exactly are exact, the others are bounded."""
    server, exporter = metered(outbound_budget=4096, max_rate=0)  # no flood control: it floods
    sender = Peer(server.address)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill the kernel's buffers sooner
    stuck.connect(server.address)
    wait_until(lambda: server.client_count == 2, message="2 clients")

    payload = "x" * 900
    sent = 0
    deadline = time.monotonic() + 10
    while server.stats()["disconnects_total"]["slow_consumer"] == 0:
        assert time.monotonic() < deadline, "the stuck client was never dropped"
        sender.send((payload + "\n") * 50)
        sent += 50
    wait_until(lambda: server.stats()["messages_received_total"] == sent, message="all messages read")
    wait_until(lambda: server.client_count == 1, message="stuck client removed")

    stats = server.stats()
    relayed = stats["messages_relayed_total"]  # messages queued for `stuck` before it was dropped
    assert 0 < relayed < sent
    assert stats["sent_bytes_total"] <= relayed * len(frame(sender.port, payload))
    expected = expected_values(
        connections=2, clients=1, max_clients=server.max_clients, received=sent, relayed=relayed,
        received_bytes=sent * (len(payload) + 1), sent_bytes=stats["sent_bytes_total"],
        flow_pauses=stats["flow_control_pauses_total"],
        flow_pause_seconds=stats["flow_control_pause_seconds_total"], slow_consumer=1)
    scrape_until(exporter.url, expected)
    stuck.close()
    sender.close()


# --- strangers (issue 19): refusals, flood control, the memory budget ----------------------

PER_HOST_NOTICE = b"Too many connections from your address (1). Try again later.\n"


def refused(address, source=None):
    """Connect (from `source`, e.g. 127.0.0.2: another host on loopback) and
    return the one-line notice the server closed the connection with."""
    peer = Peer(address, source=source)
    try:
        return peer.expect_closed()
    finally:
        peer.close()


def test_refusals_by_reason_every_value_exact(metered):
    """3 per_host, 2 connect_rate and 1 full refusal, each exported under its
    reason, and each one a `rejected` disconnect too."""
    server, exporter = metered(max_clients=3, max_per_host=1, max_connect_rate=0.001,
                               exempt_hosts="127.0.0.1/32")
    holder = Peer(server.address, source="127.0.0.2")  # takes 127.0.0.2's one slot
    wait_until(lambda: server.client_count == 1, message="127.0.0.2's first connection")
    for _ in range(3):
        assert refused(server.address, "127.0.0.2") == PER_HOST_NOTICE

    # 127.0.0.3 spends its one connection token (0.001/s: none comes back in
    # this test), leaves, and its next two connections come too soon.
    visitor = Peer(server.address, source="127.0.0.3")
    wait_until(lambda: server.client_count == 2, message="127.0.0.3 admitted")
    assert visitor.leave() == b""
    wait_until(lambda: server.client_count == 1, message="127.0.0.3 gone")
    for _ in range(2):
        assert refused(server.address, "127.0.0.3") == (
            b"Connecting too often (more than 0.001 a second). Try again later.\n")

    # 127.0.0.1 is exempt from the per-host limits, not from --max-clients.
    locals_ = [Peer(server.address) for _ in range(2)]
    wait_until(lambda: server.client_count == 3, message="3 clients")
    assert refused(server.address) == b"Server full (3 clients). Try again later.\n"

    expected = expected_values(
        connections=10,  # 1 + 3 from 127.0.0.2, 1 + 2 from 127.0.0.3, 2 + 1 from 127.0.0.1
        clients=3, max_clients=3, received=0, relayed=0, received_bytes=len(b"exit"),  # leave()
        sent_bytes=0, exit=1, rejected=6, refused={"per_host": 3, "connect_rate": 2, "full": 1})
    text = scrape_until(exporter.url, expected)
    assert server.stats()["refused_connections_total"] == {"full": 1, "per_host": 3, "connect_rate": 2}
    assert families(text)["chat_refused_connections"].type == "counter"
    for peer in [holder, *locals_]:
        peer.close()


def test_flood_control_pause_is_exported(metered):
    """A client over --max-rate is paused (never dropped): chat_throttled_clients
    is 1 while it waits, and the pause is counted once it ends."""
    server, exporter = metered(max_rate=0.5, max_burst=1)  # one line, then one every 2 s
    flooder, reader = Peer(server.address), Peer(server.address)
    wait_until(lambda: server.client_count == 2, message="2 clients")
    flooder.send("one\ntwo\n")
    reader.expect(frame(flooder.port, "one"))
    # "two" waits 2 s for its token; the flooder is shown paused meanwhile.
    wait_until(lambda: chat_values(fetch(exporter.url))["chat_throttled_clients"] == 1.0,
               message="chat_throttled_clients == 1 during the pause")
    reader.expect(frame(flooder.port, "two"), timeout=10)

    def expected():
        stats = server.stats()
        return expected_values(
            connections=2, clients=2, max_clients=server.max_clients, received=2, relayed=2,
            received_bytes=len(b"one\ntwo\n"),
            sent_bytes=len(frame(flooder.port, "one") + frame(flooder.port, "two")),
            flow_pauses=stats["flow_control_pauses_total"],
            flow_pause_seconds=stats["flow_control_pause_seconds_total"],
            throttled=0, throttle_pauses=1, throttled_seconds=stats["throttled_seconds_total"])

    scrape_until(exporter.url, expected)
    # One pause, of at least the 2 s that one token takes at 0.5 lines/s
    # (a little less if "two" arrived in a later read than "one").
    assert 1.9 <= server.stats()["throttled_seconds_total"] < 10
    flooder.close()
    reader.close()


def test_memory_budget_eviction_and_outbox_total_are_exported(metered):
    """The outbox total is exported exactly while a client does not read; past
    --memory-budget that client is dropped (reason memory_budget) and the total
    returns to 0."""
    budget = 512 * 1024
    server, exporter = metered(max_rate=0, memory_budget=budget, outbound_budget=64 * 1024 * 1024)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # refuses data soon
    stuck.connect(server.address)
    flooder, reader = Peer(server.address, timeout=15), Peer(server.address, timeout=15)
    wait_until(lambda: server.client_count == 3, message="3 clients")
    line = "x" * 900
    sent = 0

    def flood(lines):
        nonlocal sent
        flooder.send(f"{line}\n" * lines)
        sent += lines
        reader.read_until(lambda got: got.count(b"\n") >= sent, timeout=15)

    def settled(**known):
        """Expected values for whatever the server could not know in advance
        (bytes the stuck client's kernel took), from a fresh snapshot."""
        def expected():
            stats = server.stats()
            return expected_values(
                connections=3, clients=server.client_count, max_clients=server.max_clients,
                received=sent, relayed=stats["messages_relayed_total"],
                received_bytes=sent * (len(line) + 1), sent_bytes=stats["sent_bytes_total"],
                backlog=stats["outbound_backlog_bytes"], max_backlog=stats["max_client_backlog_bytes"],
                flow_pauses=stats["flow_control_pauses_total"],
                flow_pause_seconds=stats["flow_control_pause_seconds_total"],
                budget_bytes=budget, **known)
        return expected

    deadline = time.monotonic() + 20
    while server.stats()["outbound_backlog_bytes"] == 0:
        assert time.monotonic() < deadline, "the stuck client's outbox never grew"
        flood(20)
    # Nothing more is sent: the stuck client's outbox stays as it is, and is
    # exported exactly: the only outbox, so the total and the largest agree.
    text = scrape_until(exporter.url, settled())
    values = chat_values(text)
    assert 0 < values["chat_outbound_backlog_bytes"] == values["chat_max_client_backlog_bytes"] < budget

    while server.stats()["disconnects_total"]["memory_budget"] == 0:
        assert time.monotonic() < deadline, "the stuck client was never dropped"
        flood(20)
    wait_until(lambda: server.client_count == 2, message="the stuck client removed")
    text = scrape_until(exporter.url, settled(memory_budget=1))
    values = chat_values(text)
    assert values["chat_outbound_backlog_bytes"] == values["chat_max_client_backlog_bytes"] == 0
    assert 0 < values["chat_messages_relayed_total"] - sent <= sent  # some were queued for `stuck`
    stuck.close()
    flooder.close()
    reader.close()


def test_server_process_exports_refusals_and_summarised_log_lines(server_process):
    """The real command line: per-host refusals from 127.0.0.1 (nothing exempt),
    each one a warning; past LOG_FLOOD_LINES of them the log flood gate holds
    the rest back, and exactly those are counted as summarised."""
    proc = server_process("--metrics-port", "0", "--quiet", "--max-per-host", "1",
                          "--max-connect-rate", "0", "--exempt-hosts", "",
                          "--memory-budget", "1000000")
    match = next(filter(None, map(METRICS_LINE.match, proc.lines)))
    url = f"http://127.0.0.1:{match.group(2)}/metrics"
    holder = Peer(proc.address)
    proc.wait_for_count("New connection", 1)
    refusals = 12
    for _ in range(refusals):
        assert refused(proc.address) == PER_HOST_NOTICE

    def shown():  # warnings written as they are; the summary line starts with "..."
        return sum(line.startswith("Refusing") for line in list(proc.errors))

    def expected():
        return expected_values(
            connections=1 + refusals, clients=1, max_clients=10_000, received=0, relayed=0,
            received_bytes=0, sent_bytes=0, rejected=refusals, refused={"per_host": refusals},
            budget_bytes=1_000_000, log_summarised=refusals - shown())

    scrape_until(url, expected)
    assert LOG_FLOOD_LINES <= shown() < refusals  # some were held back
    holder.close()
    rc, _, err = proc.stop()
    assert rc == 0, err

def test_exporter_defaults_to_loopback_and_stop_closes_the_port():
    with running_server() as server:
        exporter = start_metrics_server(server, port=0)
        try:
            assert exporter.host == "127.0.0.1"
            assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
            fetch(exporter.url)
        finally:
            exporter.stop()
        exporter.stop()  # idempotent
        assert not exporter._thread.is_alive()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", exporter.port), timeout=2).close()


def test_two_exporters_in_one_process_do_not_clash():
    """Own registry per exporter: nothing is registered on the global REGISTRY."""
    with running_server() as one, running_server(max_clients=2) as two:
        first, second = start_metrics_server(one, port=0), start_metrics_server(two, port=0)
        try:
            assert chat_values(fetch(first.url))["chat_max_clients"] == one.max_clients
            assert chat_values(fetch(second.url))["chat_max_clients"] == 2.0
        finally:
            first.stop()
            second.stop()


# --- the translation, on arbitrary snapshots --------------------------------------------

class FakeServer:
    """A stats() source for the translation tests: the thing under test is the
    exporter's translation of a snapshot, so any snapshot will do."""

    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


counts = st.integers(min_value=0, max_value=2**53)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False)
SCALAR_KEYS = ("connections_total", "clients", "max_clients", "messages_received_total",
               "messages_relayed_total", "received_bytes_total", "sent_bytes_total",
               "outbound_backlog_bytes", "max_client_backlog_bytes", "flow_control_pauses_total",
               "log_lines_dropped_total", "throttled_clients", "throttle_pauses_total",
               "memory_budget_bytes", "log_lines_summarised_total")
# The backbone's stats() dict, exactly as metrics/README.md and /work/briefs/backbone-stats.md define it.
BACKBONE_COUNTS = ("entries_out_total", "messages_out_total", "entries_in_total", "messages_in_total",
                   "reconnects_total", "publish_errors_total", "outbox_bytes", "outbox_budget_bytes",
                   "dropped_messages_total", "duplicates_total", "gaps_total", "peers", "losses_total")
REJECT_REASONS = ("fields", "node_id", "size", "frame", "control", "sequence")
DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def backbone_values(backbone):
    """The chat_backbone_ samples (not the histogram) that `backbone` must come out as."""
    values = {"chat_backbone_connected": float(backbone["connected"])}
    for key in BACKBONE_COUNTS:
        values[f"chat_backbone_{key}"] = float(backbone[key])
    for reason, count in backbone["rejected_total"].items():
        values[f'chat_backbone_rejected_total{{reason="{reason}"}}'] = float(count)
    return values


backbones = st.none() | st.fixed_dictionaries({
    "connected": st.booleans(), **{key: counts for key in BACKBONE_COUNTS},
    "rejected_total": st.fixed_dictionaries({reason: counts for reason in REJECT_REASONS}),
    "delay_buckets": st.just(DELAY_BUCKETS),
    "delay_counts": st.lists(st.integers(0, 10**9), min_size=len(DELAY_BUCKETS) + 1,
                             max_size=len(DELAY_BUCKETS) + 1),
    "delay_sum": seconds})


@settings(max_examples=60, deadline=None)
@given(scalars=st.lists(counts, min_size=len(SCALAR_KEYS), max_size=len(SCALAR_KEYS)),
       disconnects=st.lists(counts, min_size=len(DISCONNECT_REASONS), max_size=len(DISCONNECT_REASONS)),
       accept_errors=st.lists(counts, min_size=len(ACCEPT_ERROR_REASONS), max_size=len(ACCEPT_ERROR_REASONS)),
       refused=st.lists(counts, min_size=len(REFUSAL_REASONS), max_size=len(REFUSAL_REASONS)),
       throttled_seconds=seconds,
       latency=st.lists(st.integers(0, 10**9), min_size=len(LATENCY_BUCKETS) + 1,
                        max_size=len(LATENCY_BUCKETS) + 1),
       latency_sum=seconds, pause_seconds=seconds, version=st.sampled_from(["2.0.0", "2.1.0-rc1"]),
       backbone=backbones)
def test_any_snapshot_round_trips_exactly(scalars, disconnects, accept_errors, latency, latency_sum,
                                          pause_seconds, version, backbone, refused, throttled_seconds):
    """Whatever stats() says is what a parser reads back: integers up to 2**53
    and the float sums survive the text format, buckets come out cumulative,
    and the backbone families appear exactly when stats()["backbone"] is a dict."""
    stats = dict(zip(SCALAR_KEYS, scalars))
    stats.update(disconnects_total=dict(zip(DISCONNECT_REASONS, disconnects)),
                 accept_errors_total=dict(zip(ACCEPT_ERROR_REASONS, accept_errors)),
                 relay_latency_buckets=LATENCY_BUCKETS, relay_latency_counts=latency,
                 relay_latency_sum=latency_sum, messages_received_total=sum(latency),
                 flow_control_pause_seconds_total=pause_seconds, version=version, backbone=backbone,
                 refused_connections_total=dict(zip(REFUSAL_REASONS, refused)),
                 throttled_seconds_total=throttled_seconds)
    registry = CollectorRegistry()
    registry.register(ChatCollector(FakeServer(stats)))
    text = generate_latest(registry).decode()

    values = chat_values(text)
    backbone_samples = {key: values.pop(key) for key in list(values) if key.startswith("chat_backbone_")}
    assert values == expected_values(
        connections=stats["connections_total"], clients=stats["clients"],
        max_clients=stats["max_clients"], received=stats["messages_received_total"],
        relayed=stats["messages_relayed_total"], received_bytes=stats["received_bytes_total"],
        sent_bytes=stats["sent_bytes_total"], backlog=stats["outbound_backlog_bytes"],
        max_backlog=stats["max_client_backlog_bytes"],
        accept_errors=stats["accept_errors_total"], flow_pauses=stats["flow_control_pauses_total"],
        flow_pause_seconds=pause_seconds, log_dropped=stats["log_lines_dropped_total"],
        version=version, refused=stats["refused_connections_total"], throttled=stats["throttled_clients"],
        throttle_pauses=stats["throttle_pauses_total"], throttled_seconds=throttled_seconds,
        budget_bytes=stats["memory_budget_bytes"], log_summarised=stats["log_lines_summarised_total"],
        **dict(zip(DISCONNECT_REASONS, disconnects)))
    assert_histogram_matches(text, stats)
    found = families(text)
    if backbone is None:
        assert backbone_samples == {}
        assert not any(name.startswith("chat_backbone") for name in found)
        return
    assert backbone_samples == backbone_values(backbone)
    # The families in BACKBONE_METRIC_NAMES' order, as Prometheus names the series.
    exposed = [name + "_total" if found[name].type == "counter" else name
               for name in found if name.startswith("chat_backbone")]
    assert exposed == list(BACKBONE_METRIC_NAMES)
    les, cumulative, count, total = histogram(text, "chat_backbone_delay_seconds")
    assert les == [repr(b) for b in DELAY_BUCKETS] + ["+Inf"]
    assert cumulative == [float(v) for v in itertools.accumulate(backbone["delay_counts"])]
    assert count == cumulative[-1] and total == backbone["delay_sum"]


def _zero_stats(**overrides):
    stats = dict.fromkeys(SCALAR_KEYS, 0)
    stats.update(disconnects_total={}, accept_errors_total={}, relay_latency_buckets=(0.1, 1.0),
                 relay_latency_counts=[0, 0, 0], relay_latency_sum=0.0,
                 flow_control_pause_seconds_total=0.0, version="2.0.0", backbone=None,
                 refused_connections_total={}, throttled_seconds_total=0.0)
    stats.update(overrides)
    return stats


def test_collector_rejects_mismatched_histogram():
    collector = ChatCollector(FakeServer(_zero_stats(relay_latency_counts=[1, 2])))  # needs 3
    with pytest.raises(ValueError, match="chat_relay_latency_seconds: 2 buckets but 2 counts"):
        collector.collect()
    backbone = dict.fromkeys(BACKBONE_COUNTS, 0)
    backbone.update(connected=True, rejected_total={}, delay_buckets=(0.1,), delay_counts=[0], delay_sum=0.0)  # needs 2
    with pytest.raises(ValueError, match="chat_backbone_delay_seconds: 1 buckets but 1 counts"):
        ChatCollector(FakeServer(_zero_stats(backbone=backbone))).collect()


def test_a_snapshot_missing_a_contract_key_fails_the_scrape_with_500():
    """The exporter reads exactly the contract's keys: a server (or backbone)
    that drifts from it makes the scrape fail loudly, not expose a partial page."""
    broken = _zero_stats()
    del broken["log_lines_dropped_total"]
    exporter = start_metrics_server(FakeServer(broken), port=0)
    try:
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(exporter.url, timeout=5)
        assert failure.value.code == 500
        assert failure.value.read() == b"Cannot collect metrics: KeyError('log_lines_dropped_total')\n"
    finally:
        exporter.stop()


# --- the real command line ---------------------------------------------------------------

def test_server_process_serves_metrics(server_process):
    proc = server_process("--metrics-port", "0", "--quiet")
    match = next(filter(None, map(METRICS_LINE.match, proc.lines)))
    assert match.group(1) == "127.0.0.1"  # loopback by default
    url = f"http://127.0.0.1:{match.group(2)}/metrics"
    # Two listening sockets: the chat port and the metrics port, nothing else.
    assert listening_ports(proc.proc.pid) == sorted([proc.address[1], int(match.group(2))])

    a, b = Peer(proc.address), Peer(proc.address)
    wait_until(lambda: chat_values(fetch(url))["chat_clients"] == 2, message="2 clients registered")
    a.send("ping\n")
    b.expect(frame(a.port, "ping"))
    b.send("exit\n")
    b.expect_closed()
    text = scrape_until(url, expected_values(
        connections=2, clients=1, max_clients=10_000, received=1, relayed=1,
        received_bytes=len(b"ping\nexit\n"), sent_bytes=len(frame(a.port, "ping")), exit=1))
    assert "python_info" in families(text)
    # chat_build_info carries the same version as --version prints.
    version = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--version"], capture_output=True,
                             text=True, timeout=15, stdin=subprocess.DEVNULL)
    assert version.returncode == 0 and version.stdout == f"mychatserver {VERSION}\n"
    assert f'chat_build_info{{version="{VERSION}"}} 1.0\n' in text
    a.close()

    rc, lines, err = proc.stop()
    assert rc == 0, err
    assert lines[-1] == "Server stopped"
    assert err == ""
