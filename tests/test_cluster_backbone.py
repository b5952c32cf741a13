"""cluster/backbone.py against a real redis-server (127.0.0.1, a free port).

The relay node is replaced here, and only here, by a tiny stand-in exposing
the two hooks the backbone calls (relay_remote, disconnect_all), so that
each Redis failure can be staged exactly: what reached the stand-in is
compared byte for byte with what was published. The end-to-end tests with
real nodes are in test_cluster_nodes.py."""

import logging
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from cluster import backbone as backbone_module
from cluster.backbone import DELAY_BUCKETS, parse_url, start_backbone
from cluster.local import RedisServer, free_port
from conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(30)


class StandIn:
    """What the backbone sees of a relay node: relay_remote and disconnect_all.
    relay_remote can be held (a node whose reader is busy or paused)."""

    def __init__(self):
        self.frames = bytearray()
        self.count = 0
        self.calls = []          # ("relay", count) / ("disconnect", reason), in order
        self.hold = threading.Event()
        self.hold.set()
        self.held = threading.Event()

    def relay_remote(self, frames, count):
        if not self.hold.is_set():
            self.held.set()
            self.hold.wait(20)
        self.frames += frames
        self.count += count
        self.calls.append(("relay", count))

    def disconnect_all(self, reason):
        self.calls.append(("disconnect", reason))

    @property
    def reasons(self):
        return [what for kind, what in self.calls if kind == "disconnect"]


def frames(port, texts):
    return b"".join(f"{port}: {text}\n".encode() for text in texts)


@pytest.fixture
def redis_server():
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def backbones():
    """backbones(url) -> (Backbone, StandIn); all stopped at teardown."""
    made = []

    def start(url, node_port=None):
        stand_in = StandIn()
        backbone = start_backbone(stand_in, url, node_port=node_port)
        made.append((backbone, stand_in))
        return backbone, stand_in

    yield start
    for backbone, stand_in in made:
        stand_in.hold.set()
        backbone.stop()


def connected(*nodes):
    wait_until(lambda: all(node.stats()["connected"] for node in nodes), message="backbones connected")


def stat(node, key):
    return node.stats()[key]


def a_heard_at_b(backbones, url, first):
    """Backbones a and b on `url`, connected, and a's message `first` heard at
    b: (a, b, b's stand-in)."""
    a, _ = backbones(url)
    b, b_room = backbones(url)
    connected(a, b)
    a.publish(40001, [first])
    wait_until(lambda: b_room.count == 1)
    return a, b, b_room


def test_delivery_is_exact_batched_and_never_echoed(redis_server, backbones):
    a, a_room = backbones(redis_server.url(), node_port=1)
    b, b_room = backbones(redis_server.url(), node_port=2)
    connected(a, b)
    texts = [f"message {i}" for i in range(2000)]
    for i in range(0, 2000, 4):  # as readers do: one publish() per read's messages
        a.publish(40001, texts[i:i + 4])
    wait_until(lambda: b_room.count == 2000, message=lambda: f"2000 messages at b (have {b_room.count})")
    assert bytes(b_room.frames) == frames(40001, texts)
    assert a_room.count == 0 and b_room.reasons == []  # nothing echoed back to a
    wait_until(lambda: stat(a, "outbox_bytes") == 0)
    sa, sb = a.stats(), b.stats()
    assert sa["messages_out_total"] == 2000 and sb["messages_in_total"] == 2000
    data_entries = [fields for _, fields in redis.Redis(port=redis_server.port).xrange("chat:room")
                    if b"f" in fields]
    assert sum(int(fields[b"c"]) for fields in data_entries) == 2000
    assert len(data_entries) < 2000 / 4, "frames are batched: many per entry"
    assert sa["entries_out_total"] >= len(data_entries)
    assert (sb["duplicates_total"], sb["gaps_total"], sb["dropped_messages_total"]) == (0, 0, 0)
    wait_until(lambda: stat(a, "peers") == 1 and stat(b, "peers") == 1)  # heartbeats, ~1 s
    assert sum(sb["delay_counts"]) == 2000 and len(sb["delay_counts"]) == len(DELAY_BUCKETS) + 1
    assert sb["delay_sum"] > 0
    assert sorted(sa) == sorted(["connected", "entries_out_total", "messages_out_total",
                                 "entries_in_total", "messages_in_total", "reconnects_total",
                                 "publish_errors_total", "outbox_bytes", "outbox_budget_bytes",
                                 "dropped_messages_total", "duplicates_total", "gaps_total",
                                 "peers", "losses_total", "rejected_total",
                                 "delay_buckets", "delay_counts", "delay_sum"])
    assert sa["rejected_total"] == sb["rejected_total"] == dict.fromkeys(
        ("fields", "node_id", "size", "frame", "control", "sequence"), 0)


def test_a_resent_entry_is_dropped_as_a_duplicate(redis_server, backbones):
    a, b, b_room = a_heard_at_b(backbones, redis_server.url(), "once")
    direct = redis.Redis(port=redis_server.port)
    (_, fields), = [entry for entry in direct.xrange("chat:room") if entry[1].get(b"f")]
    direct.xadd("chat:room", fields)  # what redis-py's retry of a lost reply does
    wait_until(lambda: stat(b, "duplicates_total") == 1)
    a.publish(40001, ["twice?"])
    wait_until(lambda: b_room.count == 2)
    assert bytes(b_room.frames) == frames(40001, ["once", "twice?"])
    assert b_room.reasons == [] and stat(b, "gaps_total") == 0


def test_a_gap_closes_the_local_clients_after_what_came_before(redis_server, backbones):
    b, b_room = backbones(redis_server.url())
    connected(b)
    direct = redis.Redis(port=redis_server.port)

    def entry(seq, text=None):
        fields = {"n": "feedfacefeedface", "s": seq, "c": 0 if text is None else 1, "t": time.time()}
        if text is not None:
            fields["f"] = f"40009: {text}\n"
        direct.xadd("chat:room", fields)

    entry(1, "one")
    entry(2, "two")
    entry(4, "four")        # 3 never came
    entry(4)                # heartbeat: up to 4, fine
    entry(6)                # heartbeat: 5 never came
    wait_until(lambda: len(b_room.reasons) == 2, message=lambda: f"two gaps (calls {b_room.calls})")
    assert bytes(b_room.frames) == frames(40009, ["one", "two", "four"])
    first_gap = b_room.calls.index(("disconnect", "backbone_gap"))
    assert sum(n for kind, n in b_room.calls[:first_gap] if kind == "relay") == 2  # before the close
    assert b_room.reasons == ["backbone_gap", "backbone_gap"]
    assert stat(b, "gaps_total") == 2 and stat(b, "messages_in_total") == 3


def test_redis_killed_and_restarted_on_its_aof_loses_nothing(redis_server, backbones):
    a, a_room = backbones(redis_server.url())
    b, b_room = backbones(redis_server.url())
    connected(a, b)
    texts = [f"m{i}" for i in range(1500)]
    for text in texts[:500]:
        a.publish(40001, [text])
    wait_until(lambda: b_room.count == 500)
    redis_server.kill(signal.SIGKILL)
    wait_until(lambda: not stat(a, "connected") and not stat(b, "connected"), message="outage seen")
    for text in texts[500:1000]:  # the local room goes on; these wait in the outbox
        a.publish(40001, [text])
    assert stat(a, "outbox_bytes") > 0
    redis_server.start()
    connected(a, b)
    for text in texts[1000:]:
        a.publish(40001, [text])
    wait_until(lambda: b_room.count == 1500, message=lambda: f"1500 at b (have {b_room.count})")
    assert bytes(b_room.frames) == frames(40001, texts)
    assert b_room.reasons == [] and a_room.reasons == []
    assert stat(a, "reconnects_total") == 1 and stat(b, "reconnects_total") == 1
    assert stat(a, "publish_errors_total") >= 1 and stat(b, "gaps_total") == 0


def test_redis_restarted_empty_with_nothing_lost_recovers_by_sequence(redis_server, backbones, caplog):
    caplog.set_level(logging.INFO, logger="mychatserver.backbone")
    a, b, b_room = a_heard_at_b(backbones, redis_server.url(), "before")
    wait_until(lambda: stat(a, "outbox_bytes") == 0)
    redis_server.kill(signal.SIGKILL)
    redis_server.start(wipe=True)
    connected(a, b)
    a.publish(40001, ["after"])
    wait_until(lambda: b_room.count == 2)
    assert bytes(b_room.frames) == frames(40001, ["before", "after"])
    assert b_room.reasons == [] and stat(b, "gaps_total") == 0
    wait_until(lambda: "the stream went backwards" in caplog.text)


def test_redis_restarted_empty_after_losing_entries_is_a_gap_never_silent(redis_server, backbones):
    a, _ = backbones(redis_server.url())
    b, b_room = backbones(redis_server.url())
    connected(a, b)
    b_room.hold.clear()  # b's reader will stop in its next relay_remote
    a.publish(40001, ["m0"])
    wait_until(b_room.held.is_set)
    for i in range(1, 10):  # acknowledged by Redis, never read by b
        a.publish(40001, [f"m{i}"])
    wait_until(lambda: stat(a, "outbox_bytes") == 0)
    redis_server.kill(signal.SIGKILL)
    redis_server.start(wipe=True)  # they are gone
    b_room.hold.set()
    connected(a, b)
    a.publish(40001, ["m10"])
    wait_until(lambda: b"m10" in b_room.frames)
    assert b_room.reasons == ["backbone_gap"]
    assert bytes(b_room.frames) == frames(40001, ["m0", "m10"])
    assert b_room.calls.index(("disconnect", "backbone_gap")) < len(b_room.calls) - 1  # m10 after it
    assert stat(b, "gaps_total") == 1


def test_a_reader_behind_the_retention_closes_its_clients(redis_server, backbones):
    url = redis_server.url(maxlen=50)
    a, _ = backbones(url)
    b, b_room = backbones(url)
    connected(a, b)
    b_room.hold.clear()
    a.publish(40001, ["m0"])
    wait_until(b_room.held.is_set)
    for i in range(1, 400):  # one entry each: wait for each to be acknowledged
        done = stat(a, "messages_out_total")
        a.publish(40001, [f"m{i}"])
        wait_until(lambda: stat(a, "messages_out_total") > done)
    direct = redis.Redis(port=redis_server.port)
    assert direct.xlen("chat:room") < 300  # trimmed: b's next entries are gone
    b_room.hold.set()
    wait_until(lambda: b"m399" in b_room.frames)
    assert b_room.reasons == ["backbone_gap"]
    assert stat(b, "gaps_total") == 1


def test_past_the_outbox_budget_messages_are_dropped_and_the_others_see_the_gap(redis_server, backbones):
    url = redis_server.url(outbox=2000)
    a, _ = backbones(url)
    b, b_room = backbones(url)
    connected(a, b)
    redis_server.kill(signal.SIGKILL)
    wait_until(lambda: not stat(a, "connected"))
    texts = [f"{i:04d} " + "x" * 40 for i in range(100)]  # 53 bytes a frame: 37 fit in 2000
    for text in texts:
        a.publish(40001, [text])
    kept = 2000 // len(frames(40001, texts[:1]))
    assert stat(a, "dropped_messages_total") == 100 - kept
    assert stat(a, "outbox_bytes") == kept * len(frames(40001, texts[:1]))
    redis_server.start()
    wait_until(lambda: b_room.reasons, message="b to see the gap")
    wait_until(lambda: b_room.count == kept)
    assert bytes(b_room.frames) == frames(40001, texts[:kept])
    assert b_room.reasons == ["backbone_gap"]


def test_near_the_budget_a_sender_waits_bounded_and_nothing_is_dropped(redis_server, backbones):
    url = redis_server.url(outbox=10_000)
    a, _ = backbones(url)
    b, b_room = backbones(url)
    connected(a, b)
    redis_server.kill(signal.SIGSTOP)  # alive but not answering: a's link still looks up
    try:
        texts = [f"{i:04d} " + "y" * 90 for i in range(80)]  # 103 bytes: 75% of 10,000 at 73
        for text in texts[:74]:
            a.publish(40001, [text])
        assert stat(a, "outbox_bytes") >= 7500
        started = time.monotonic()
        a.publish(40001, [texts[74]])  # over the high-water mark: waits, bounded
        waited = time.monotonic() - started
    finally:
        redis_server.kill(signal.SIGCONT)
    assert 0.8 <= waited <= 3.0, waited  # FLOW_CONTROL_WAIT is 1 s; a loaded machine is slower
    for text in texts[75:]:
        a.publish(40001, [text])
    wait_until(lambda: b_room.count == 80, timeout=10)
    assert bytes(b_room.frames) == frames(40001, texts)
    assert stat(a, "dropped_messages_total") == 0 and b_room.reasons == []


def test_redis_down_at_start_is_not_an_error(backbones, caplog):
    caplog.set_level(logging.INFO, logger="mychatserver.backbone")
    port = free_port()
    a, _ = backbones(f"redis://127.0.0.1:{port}/0")
    a.publish(40001, ["waiting"])
    wait_until(lambda: "cannot reach Redis" in caplog.text)
    assert not stat(a, "connected")
    with RedisServer(port=port):
        connected(a)
        wait_until(lambda: stat(a, "messages_out_total") == 1)
        assert stat(a, "reconnects_total") == 0  # the first connect is not a reconnect
    assert caplog.text.count("cannot reach Redis") == 1


def test_a_silent_peer_is_forgotten(redis_server, backbones, monkeypatch):
    monkeypatch.setattr(backbone_module, "FORGET_AFTER", 1.5)
    a, _ = backbones(redis_server.url())
    b, _ = backbones(redis_server.url())
    connected(a, b)
    wait_until(lambda: stat(b, "peers") == 1 and stat(a, "peers") == 1)
    a.stop()  # its heartbeats stop; b's own go on, and move the stream's clock
    wait_until(lambda: stat(b, "peers") == 0, timeout=6, message="a forgotten")


def test_stop_returns_fast_even_with_redis_hung(redis_server, backbones):
    a, _ = backbones(redis_server.url())
    connected(a)
    redis_server.kill(signal.SIGSTOP)
    try:
        a.publish(40001, ["into a hung Redis"])
        started = time.monotonic()
        a.stop()
        assert time.monotonic() - started < 1.0  # two joins of 0.2 s, on a loaded machine
    finally:
        redis_server.kill(signal.SIGCONT)


def test_url_options_are_ours_and_bad_urls_are_value_errors():
    assert parse_url("redis://127.0.0.1:6379/0?maxlen=200&outbox=5000&stream=r1") == (
        "redis://127.0.0.1:6379/0", "r1", 200, 5000)
    assert parse_url("redis://h:1/2?socket_keepalive=true")[0] == "redis://h:1/2?socket_keepalive=true"
    for bad in ("http://127.0.0.1:6379", "redis://h:1/0?maxlen=0", "redis://h:1/0?outbox=x"):
        with pytest.raises(ValueError):
            parse_url(bad)
        with pytest.raises(ValueError):
            start_backbone(StandIn(), bad)


def test_without_the_redis_package_start_backbone_raises_import_error():
    code = ("import sys; sys.modules['redis'] = None\n"
            "from cluster.backbone import start_backbone\n"
            "try:\n    start_backbone(None, 'redis://127.0.0.1:1/0')\n"
            "except ImportError as exc:\n    print('ImportError', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=20)
    assert out.stdout.startswith("ImportError"), out
