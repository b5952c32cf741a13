"""An untrusted stream (issue #20, item 4) and a stream bounded in bytes (item 7).

Whoever can write the stream writes forged entries into a real
redis-server; the backbone (with a stand-in for the node, as in
test_cluster_backbone.py) and real nodes with real clients must deliver no
escape byte, adopt no implausible sequence number, keep delivering the
real node's traffic, log each kind of rejection naming the entry, and count
it. Then the stream is filled with the largest entries a node publishes,
and its memory measured against the stated bound."""

import logging
import time

import pytest
import redis

from cluster import backbone as backbone_module
from cluster.backbone import ENTRY_MAX_BYTES, ENTRY_MAX_MESSAGES, STREAM_MEMORY_BOUND
from cluster.local import RedisServer, start_nodes
from cluster.validate import JumpGuard, Rejected, Rescue, check_entry
from conftest import Peer, wait_until
from test_cluster_backbone import a_heard_at_b, backbones, connected, frames, stat  # noqa: F401 - backbones: a fixture

pytestmark = pytest.mark.timeout(40)

NODE = b"0123456789abcdef"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b[31mred\x07"


def fields(**overrides):
    entry = {b"n": NODE, b"s": b"7", b"c": b"1", b"t": b"1796193274.9709167", b"f": b"40001: hi\n"}
    entry.update({key.encode(): value for key, value in overrides.items()})
    return {key: value for key, value in entry.items() if value is not None}


@pytest.mark.parametrize("entry, reason", [
    (fields(x=b"1"), "fields"),
    (fields(t=None), "fields"),
    (fields(s=b"-1"), "fields"),
    (fields(s=b"07"), "fields"),
    (fields(c=b"0"), "fields"),                      # a heartbeat with frames
    (fields(f=None), "fields"),
    (fields(t=b"nan"), "fields"),
    (fields(n=b"0123456789ABCDEF"), "node_id"),
    (fields(n=b"\x1b[2J" + NODE[4:]), "node_id"),
    (fields(s=str(2 ** 53 + 1).encode()), "sequence"),
    (fields(c=str(ENTRY_MAX_MESSAGES + 1).encode()), "size"),
    (fields(f=b"1: " + b"x" * ENTRY_MAX_BYTES + b"\n"), "size"),
    (fields(f=b"1: " + b"x" * 1021 + b"\n"), "size"),  # a 1,025-byte frame
    (fields(f=b"hello\n"), "frame"),
    (fields(f=b"70000: hi\n"), "frame"),
    (fields(f=b"40001: hi"), "frame"),
    (fields(c=b"2"), "frame"),
    (fields(f=b"40001:    \n"), "frame"),
    (fields(f=b"40001: \xff\xfe\n"), "frame"),
    (fields(f=f"40001: {ESCAPES}\n".encode()), "control"),
    (fields(f=b"40001: a\x07b\n"), "control"),
    (fields(f="40001: a\u202eb\n".encode()), "control"),  # bidi override
    (fields(f=b"40001: a\rb\n"), "control"),
])
def test_each_kind_of_bad_entry_is_rejected(entry, reason):
    with pytest.raises(Rejected) as rejected:
        check_entry(entry, ENTRY_MAX_MESSAGES, ENTRY_MAX_BYTES)
    assert rejected.value.reason == reason


def test_good_entries_pass_exactly_as_published():
    data = "40001: héllo\twörld 👍🏽\n2: x\n".encode()
    entry = check_entry(fields(c=b"2", f=data), ENTRY_MAX_MESSAGES, ENTRY_MAX_BYTES)
    assert (entry.node, entry.seq, entry.count, entry.frames) == (NODE, 7, 2, data)
    beat = check_entry(fields(c=b"0", f=None, s=b"0"), ENTRY_MAX_MESSAGES, ENTRY_MAX_BYTES)
    assert beat.heartbeat and beat.frames == b""
    biggest = b"".join(b"65535: " + b"y" * 1016 + b"\n" for _ in range(ENTRY_MAX_BYTES // 1024))
    assert check_entry(fields(c=str(ENTRY_MAX_BYTES // 1024).encode(), f=biggest),
                       ENTRY_MAX_MESSAGES, ENTRY_MAX_BYTES).frames == biggest


def test_a_jump_is_allowed_only_as_far_as_time_allows():
    guard = JumpGuard(base=1000, rate=10_000.0)
    assert guard.allows(NODE, 10 ** 12, None, 0.0)          # never heard: its baseline
    guard.accepted(NODE, 100.0)
    assert guard.allows(NODE, 1005, 5, 100.0)               # 1,000 ahead: within the base
    assert not guard.allows(NODE, 1006, 5, 100.0)
    assert guard.allows(NODE, 5 + 1000 + 20_000, 5, 102.0)  # two seconds later
    assert not guard.allows(NODE, 10 ** 12, 5, 102.0)


def test_rescue_tells_a_conflict_and_a_late_entry_from_a_duplicate():
    rescue = Rescue(window=3, ranges=2)
    for seq in (1, 2, 3):
        rescue.delivered(NODE, seq, seq * 10)
    assert rescue.check(NODE, 2, 20) is None            # a real resend: a duplicate
    assert rescue.check(NODE, 3, 31) == "conflict"      # same number, other contents
    assert rescue.check(NODE, 3, 31) is None            # that copy again: a duplicate
    rescue.skipped(NODE, 4, 9)                          # a jump to 10 declared 4..9 missing
    rescue.delivered(NODE, 10, 100)
    assert [rescue.check(NODE, seq, seq) for seq in (4, 5, 4, 9, 11)] == ["late", "late", None, "late", None]
    rescue.skipped(NODE, 20, 20)
    rescue.skipped(NODE, 30, 30)                        # only the last 2 ranges are kept
    assert rescue.check(NODE, 6, 6) is None and rescue.check(NODE, 30, 30) == "late"
    assert rescue.check(b"another node....", 1, 1) is None


@pytest.fixture
def redis_server():
    with RedisServer(appendonly=False) as server:
        yield server


def test_forged_entries_are_rejected_logged_counted_and_the_real_node_goes_on(redis_server, backbones,
                                                                              caplog):
    caplog.set_level(logging.INFO, logger="mychatserver.backbone")
    a, b, b_room = a_heard_at_b(backbones, redis_server.url(), "one")
    direct = redis.Redis(port=redis_server.port)
    live = a.node_id.decode()
    now = time.time()
    forged = [  # (fields, reason)
        ({"n": live, "s": 10 ** 12, "c": 1, "t": now, "f": f"40001: {ESCAPES}\n"}, "control"),
        ({"n": live, "s": 10 ** 12, "c": 1, "t": now, "f": "40001: forged\n"}, "sequence"),
        ({"n": live, "s": 10 ** 12, "c": 0, "t": now}, "sequence"),
        ({"n": live, "s": 2, "c": 1, "t": now, "f": "40001: " + "z" * 2000 + "\n"}, "size"),
        ({"n": "not a node", "s": 2, "c": 1, "t": now, "f": "40001: x\n"}, "node_id"),
        ({"x": "y"}, "fields"),
        ({"n": live, "s": 2, "c": 1, "t": now, "f": "no port\n"}, "frame"),
        ({"n": live, "s": 10 ** 12 + 1, "c": 1, "t": now, "f": "40001: again\n"}, "sequence"),
    ]
    ids = [direct.xadd("chat:room", entry) for entry, _ in forged]
    a.publish(40001, ["two"])
    wait_until(lambda: b_room.count == 2, timeout=5, message="a's next message at b")
    a.publish(40001, ["three"])
    wait_until(lambda: b_room.count == 3, timeout=5)
    assert bytes(b_room.frames) == frames(40001, ["one", "two", "three"])
    assert b"\x1b" not in b_room.frames and b_room.reasons == []
    assert stat(b, "rejected_total") == {"fields": 1, "node_id": 1, "size": 1, "frame": 1,
                                         "control": 1, "sequence": 3}
    assert (stat(b, "gaps_total"), stat(b, "duplicates_total")) == (0, 0)
    # a reads the stream too: what claims to be its own is skipped, once well-formed
    assert stat(a, "rejected_total") == {"fields": 1, "node_id": 1, "size": 1, "frame": 1,
                                         "control": 1, "sequence": 0}
    for (_, reason), entry_id in zip(forged, ids):
        if reason != "sequence" or entry_id == ids[1]:  # the first of each kind names its entry
            assert f"Backbone: rejected entry {entry_id.decode()} from node " in caplog.text
    assert caplog.text.count("Backbone: rejected entry ") == 6 + 5  # once per kind: at b, and at a
    assert "from node b'not a node'" in caplog.text  # forged bytes shown escaped, never raw
    assert "\x1b" not in caplog.text


def test_a_forgery_that_passes_every_check_still_cannot_stop_the_real_traffic(redis_server, backbones,
                                                                               caplog):
    """Well-formed forgeries under a's id: its next number (before a's own
    entry with that number), then a jump within the bound. b's clients are
    told once (the jump is a gap), and every real message of a is still
    delivered: the real entry with the forged number as a conflict, the
    entries the jump skipped as late ones."""
    caplog.set_level(logging.INFO, logger="mychatserver.backbone")
    a, b, b_room = a_heard_at_b(backbones, redis_server.url(), "m1")
    wait_until(lambda: stat(a, "outbox_bytes") == 0)
    direct = redis.Redis(port=redis_server.port)
    live = a.node_id.decode()
    direct.xadd("chat:room", {"n": live, "s": 2, "c": 1, "t": time.time(), "f": "40001: forged 2\n"})
    wait_until(lambda: b_room.count == 2)
    a.publish(40001, ["m2"])                              # the real number 2: a conflict, delivered
    wait_until(lambda: b_room.count == 3, message="the real entry 2 delivered")
    direct.xadd("chat:room", {"n": live, "s": 500, "c": 1, "t": time.time(), "f": "40001: forged 500\n"})
    wait_until(lambda: b_room.reasons == ["backbone_gap"], message="the jump told as a gap")
    for text in ("m3", "m4"):                             # real numbers 3 and 4: late, delivered
        a.publish(40001, [text])
    wait_until(lambda: b_room.count == 6, message=lambda: f"6 at b (have {b_room.count})")
    assert bytes(b_room.frames) == frames(40001, ["m1", "forged 2", "m2", "forged 500", "m3", "m4"])
    assert b_room.reasons == ["backbone_gap"] and stat(b, "gaps_total") == 1
    assert "has the number of an earlier one with other contents: one of them is forged" in caplog.text
    assert "came after the node's numbers had jumped past it: the jump was forged" in caplog.text
    assert stat(b, "duplicates_total") == 0


def test_real_nodes_a_forged_escape_and_sequence_reach_no_client(redis_server):
    """The issue's attack on real nodes: XADD chat:room * n <node 1's id> s
    10^12 with escape bytes. Node 2's client receives no ESC byte and node
    1's next message within 5 s; node 2 logs the rejected entry."""
    nodes = start_nodes(redis_server.url(), 2, args=["--quiet"])
    peers = []
    try:
        for node, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
            wait_until(lambda: node.count(f"hearing node {other.node_id}"), timeout=10)
        peers = [Peer(nodes[0].address), Peer(nodes[1].address)]
        wait_until(lambda: all(node.count("New connection") for node in nodes))
        direct = redis.Redis(port=redis_server.port)
        entry_id = direct.xadd("chat:room", {"n": nodes[0].node_id, "s": 10 ** 12, "c": 1, "t": time.time(),
                                             "f": f"{peers[0].port}: {ESCAPES}\n"}).decode()
        started = time.monotonic()
        peers[0].send("after the forgery\n")
        peers[1].expect(f"{peers[0].port}: after the forgery\n", timeout=5)
        assert time.monotonic() - started < 5
        wait_until(lambda: nodes[1].count(f"Backbone: rejected entry {entry_id} from node {nodes[0].node_id}"))
        peers[0].send("and again\n")
        peers[1].expect(f"{peers[0].port}: and again\n", timeout=5)  # nothing else, no ESC, no close
        assert all(node.count("backbone_gap") == 0 for node in nodes)
    finally:
        for peer in peers:
            peer.close()
        for node in nodes:
            node.stop()


def test_a_publish_of_many_messages_makes_entries_within_the_limits(redis_server, backbones):
    a, _ = backbones(redis_server.url())
    b, b_room = backbones(redis_server.url())
    connected(a, b)
    tiny = [f"{i}" for i in range(600)]           # one read of short lines: more than 256 messages
    big = ["w" * 1016 for _ in range(40)]          # 40 full frames: more than 16 KiB
    a.publish(65535, tiny)
    a.publish(65535, big)
    wait_until(lambda: b_room.count == 640, message=lambda: f"640 at b (have {b_room.count})")
    assert bytes(b_room.frames) == frames(65535, tiny + big)
    data = [f for _, f in redis.Redis(port=redis_server.port).xrange("chat:room") if b"f" in f]
    assert max(int(f[b"c"]) for f in data) <= ENTRY_MAX_MESSAGES
    assert max(len(f[b"f"]) for f in data) <= ENTRY_MAX_BYTES
    assert sum(stat(b, "rejected_total").values()) == 0


def test_the_stream_full_of_the_largest_entries_stays_within_its_stated_memory(redis_server):
    """DEFAULT_MAXLEN entries of ENTRY_MAX_BYTES (the most a node puts in
    one) and twice as many written: Redis's own MEMORY USAGE of the stream
    stays under STREAM_MEMORY_BOUND (256 MiB)."""
    direct = redis.Redis(port=redis_server.port)
    frame = b"65535: " + b"m" * 1016 + b"\n"
    entry = {"n": "0123456789abcdef", "s": 2 ** 53, "c": ENTRY_MAX_BYTES // len(frame),
             "t": repr(time.time()), "f": frame * (ENTRY_MAX_BYTES // len(frame))}
    assert len(entry["f"]) == ENTRY_MAX_BYTES
    pipe = direct.pipeline(transaction=False)
    for i in range(2 * backbone_module.DEFAULT_MAXLEN):
        pipe.xadd("chat:room", entry, maxlen=backbone_module.DEFAULT_MAXLEN, approximate=True)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    used = direct.memory_usage("chat:room", samples=0)
    length = direct.xlen("chat:room")
    print(f"stream: {length} entries of {ENTRY_MAX_BYTES} bytes of frames, "
          f"{used / 2 ** 20:.1f} MiB (bound {STREAM_MEMORY_BOUND / 2 ** 20:.0f} MiB)")
    assert backbone_module.DEFAULT_MAXLEN <= length <= backbone_module.DEFAULT_MAXLEN + 100
    assert used <= STREAM_MEMORY_BOUND
