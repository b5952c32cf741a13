"""The reader threads (a2/mychatserver.py, Readers): a reader whose client
has left serves the next newcomer or ends after READER_LINGER (x 1-2); every
client handed out is served exactly once, whatever the timing; close() ends
the waiting ones at once. Against the real server: churn does not start a
thread per connection, a room that empties returns to its threads, and
4,000 clients leaving at once barely delay a newcomer (issue 11)."""

import os
import random
import threading
import time

import pytest

from conftest import Peer, wait_until
from reliability_helpers import connect_idle, raise_fd_limit
from relayproc import process_usage

from a2 import mychatserver
from a2.mychatserver import Readers


class FakeClient:
    """Stands in for a ClientConnection: records which thread read it, and
    holds that thread until released."""

    def __init__(self, name, hold=False):
        self.name = name
        self.read_by = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def read_until_gone(self):
        self.read_by.append(threading.get_native_id())
        self.started.set()
        assert self.release.wait(10), f"{self.name} never released"


def serve_held(readers, count):
    """Hand `count` clients that hold their readers to `readers`; wait until each is being read."""
    clients = [FakeClient(f"c{i}", hold=True) for i in range(count)]
    for client in clients:
        readers.serve(client)
    wait_until(lambda: all(c.started.is_set() for c in clients), message="every client served")
    return clients


def alive(clients):
    """How many of the threads that read these clients are still running
    (other tests' threads ending meanwhile do not count)."""
    return sum(os.path.exists(f"/proc/self/task/{tid}") for tid in {c.read_by[0] for c in clients})


@pytest.mark.timeout(30)
def test_a_reader_whose_client_left_serves_the_next_newcomer():
    readers = Readers()
    first = FakeClient("first")
    readers.serve(first)
    wait_until(lambda: readers._waiting, message="the first reader waiting for a newcomer")
    second = FakeClient("second")
    readers.serve(second)
    wait_until(second.started.is_set, message="the second client served")
    assert second.read_by == first.read_by  # the same thread, not a new one
    readers.close()


@pytest.mark.timeout(30)
def test_a_reader_nobody_needs_ends_after_its_linger():
    readers = Readers()
    clients = serve_held(readers, 20)
    assert alive(clients) == 20  # one thread per client being served
    left = time.monotonic()
    for client in clients:
        client.release.set()
    wait_until(lambda: alive(clients) == 0, timeout=2 * mychatserver.READER_LINGER + 5,
               message="the idle readers to end")
    assert time.monotonic() - left >= mychatserver.READER_LINGER * 0.9  # they did linger
    assert not readers._waiting


@pytest.mark.timeout(30)
def test_close_ends_the_waiting_readers_at_once():
    readers = Readers()
    clients = serve_held(readers, 20)
    for client in clients:
        client.release.set()
    wait_until(lambda: len(readers._waiting) == 20, message="20 readers waiting")
    assert alive(clients) == 20
    closed = time.monotonic()
    readers.close()
    # Well inside READER_LINGER: they end because of close(), not their wait.
    wait_until(lambda: alive(clients) == 0, timeout=mychatserver.READER_LINGER * 0.8,
               message="the waiting readers to end on close()")
    assert time.monotonic() - closed < mychatserver.READER_LINGER
    late = FakeClient("late")
    readers.serve(late)  # after close(): served, and its reader then ends
    wait_until(late.started.is_set, message="a client served after close()")
    wait_until(lambda: alive([late]) == 0, timeout=mychatserver.READER_LINGER * 0.8,
               message="the late reader to end")


@pytest.mark.timeout(60)
def test_every_client_is_served_exactly_once_while_readers_time_out(monkeypatch):
    """Hand-overs racing with waits that run out (a linger of 0-2 ms): no
    client is lost or served twice."""
    monkeypatch.setattr(mychatserver, "READER_LINGER", 0.001)
    readers = Readers()
    rng = random.Random(1158)
    clients = [FakeClient(f"c{i}") for i in range(3_000)]
    for client in clients:
        readers.serve(client)
        if rng.random() < 0.2:
            time.sleep(rng.choice([0, 0.0005, 0.002]))  # pacing the load, not a synchronisation
    wait_until(lambda: all(c.started.is_set() for c in clients), timeout=30,
               message=lambda: f"{sum(not c.started.is_set() for c in clients)} clients never served")
    assert [len(c.read_by) for c in clients] == [1] * len(clients)
    assert len({c.read_by[0] for c in clients}) < len(clients)  # readers were reused
    readers.close()


@pytest.mark.timeout(60)
def test_churn_reuses_reader_threads_and_an_empty_room_returns_to_its_threads(server_process):
    server = server_process("--quiet")
    pid = server.proc.pid
    baseline = process_usage(pid)[0]
    for i in range(40):  # one at a time: each newcomer finds the last one's reader waiting
        peer = Peer(server.address)
        server.wait_for_count("New connection", i + 1)
        peer.close()
        server.wait_for_count(" closed (", i + 1)
        assert process_usage(pid)[0] <= baseline + 2, f"connection {i}: a thread per connection"
    crowd = [Peer(server.address) for _ in range(50)]
    server.wait_for_count("New connection", 90)
    assert process_usage(pid)[0] >= baseline + 50
    for peer in crowd:
        peer.close()
    server.wait_for_count(" closed (", 90)
    wait_until(lambda: process_usage(pid)[0] == baseline, timeout=2 * mychatserver.READER_LINGER + 5,
               message=lambda: f"threads back to {baseline}, now {process_usage(pid)[0]}")
    status, _, err = server.stop()
    assert status == 0, err


# --- 4,000 clients leaving at once (issue 11): the readers' linger at work ------------

@pytest.mark.timeout(120)
def test_4000_leaving_at_once_barely_delays_a_newcomer(server_process):
    raise_fd_limit(4_000 + 1_000)
    server = server_process("--quiet")
    observer = Peer(server.address)
    socks = connect_idle(server.address, 4_000)
    server.wait_for_count("New connection", 4_001, timeout=60)
    for sock in socks:
        sock.close()
    newcomer = Peer(server.address)
    started = time.monotonic()
    newcomer.send("first!\n")
    try:
        observer.read_until(lambda got: got.endswith(b"first!\n"), timeout=10)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the server's stderr: {server.errors[-5:]}; "
                             f"its last stdout lines: {server.lines[-3:]}") from None
    delay = time.monotonic() - started
    server.wait_for_count(" closed (", 4_000, timeout=30)
    # Issue 11's target (the previous design took 5.6 s).
    assert delay < 0.5, f"the newcomer's message took {delay:.2f}s"
    status, _, err = server.stop()
    assert status == 0, err
