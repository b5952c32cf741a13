"""Loud reconnects and a close told in words (issue #20, items 5 and 6).

Real redis-server (AOF), real nodes and the real mychatclient. A node whose
connections died while it was not looking (its reader busy, or the whole
process SIGSTOPped across a Redis restart) used to be reconnected by
redis-py's pool without a word: now every loss and recovery is a log line
and a count. And a client closed for a backbone gap first reads why; the
client shows that line before its own 'Disconnected from server'."""

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from a2.mychatserver import CLOSE_NOTICES
from cluster.backbone import start_backbone
from cluster.local import Node, RedisServer
from conftest import CLIENT_SCRIPT, ROOT, Peer, wait_until
from test_cluster_backbone import StandIn, connected, frames, stat

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def redis_server():
    with RedisServer(appendonly=True) as server:
        yield server


def test_redis_py_reconnecting_by_itself_is_a_loss_and_a_recovery(redis_server, caplog):
    """b's reader is busy (held in relay_remote) while Redis is SIGKILLed
    and restarted on its AOF: its connection dies unseen, and redis-py's
    pool replaces it under the next XREAD. That is logged and counted, and
    the stream is checked again before b reads on: nothing lost, nothing twice."""
    caplog.set_level(logging.INFO, logger="mychatserver.backbone")
    a_room, b_room = StandIn(), StandIn()
    a = start_backbone(a_room, redis_server.url())
    b = start_backbone(b_room, redis_server.url())
    try:
        connected(a, b)
        b_room.hold.clear()
        a.publish(40001, ["m0"])
        wait_until(b_room.held.is_set)
        redis_server.kill(signal.SIGKILL)
        redis_server.start()
        wait_until(lambda: stat(a, "reconnects_total") == 1 and stat(a, "connected"), timeout=10)
        b_room.hold.set()
        wait_until(lambda: "the reader's connection was dropped and redis-py reconnected by itself"
                   in caplog.text, message="b's silent reconnect seen")
        connected(b)
        a.publish(40001, ["m1"])
        wait_until(lambda: b_room.count == 2)
        assert bytes(b_room.frames) == frames(40001, ["m0", "m1"])
        assert b_room.reasons == [] and stat(b, "duplicates_total") == 0 and stat(b, "gaps_total") == 0
        losses, reconnects = stat(b, "losses_total"), stat(b, "reconnects_total")
        assert losses == reconnects >= 1
        # every loss and every recovery is one line (a's and b's, in one log)
        assert caplog.text.count("Backbone: lost Redis") == losses + stat(a, "losses_total")
        assert caplog.text.count("Backbone: reconnected to Redis") == reconnects + stat(a, "reconnects_total")
    finally:
        b_room.hold.set()
        a.stop()
        b.stop()


def metrics(node):
    line = next(line for line in node.lines if line.startswith("Metrics on "))
    with urllib.request.urlopen(line.split()[-1], timeout=5) as response:
        text = response.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("chat_backbone_") and " " in line}


def test_a_node_paused_across_a_redis_restart_says_so_and_counts_it(redis_server):
    paused = Node(redis_server.url(), args=["--quiet", "--metrics-port", "0"])
    witness = Node(redis_server.url(), args=["--quiet"])
    peers = []
    try:
        wait_until(lambda: paused.count(f"hearing node {witness.node_id}")
                   and witness.count(f"hearing node {paused.node_id}"), timeout=10)
        os.kill(paused.proc.pid, signal.SIGSTOP)
        try:
            redis_server.kill(signal.SIGKILL)
            redis_server.start()
            wait_until(lambda: witness.count("Backbone: reconnected to Redis") == 1, timeout=10)
        finally:
            os.kill(paused.proc.pid, signal.SIGCONT)
        wait_until(lambda: paused.count("Backbone: reconnected to Redis") >= 1, timeout=10,
                   message="the paused node's recovery logged")
        lost, back = paused.count("Backbone: lost Redis"), paused.count("Backbone: reconnected to Redis")
        values = wait_until(lambda: (lambda m: m if m["chat_backbone_connected"] == 1.0 else None)(
            metrics(paused)), timeout=10)
        assert lost == back >= 1
        assert values["chat_backbone_losses_total"] == lost
        assert values["chat_backbone_reconnects_total"] == back
        peers = [Peer(paused.address), Peer(witness.address)]
        wait_until(lambda: paused.count("New connection") and witness.count("New connection"))
        peers[0].send("still here\n")
        peers[1].expect(f"{peers[0].port}: still here\n", timeout=10)
        peers[1].send("so am I\n")
        peers[0].expect(f"{peers[1].port}: so am I\n", timeout=10)
    finally:
        for peer in peers:
            peer.close()
        paused.stop()
        witness.stop()


def test_mychatclient_shows_why_before_disconnected(redis_server):
    """A real node, the real client (piped, as a script would run it), and a
    peer whose entries skip a number: the client prints the message before
    the gap, the server's one-line reason, then 'Disconnected from server'."""
    node = Node(redis_server.url(), args=["--quiet"])
    client = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), "--port", str(node.address[1])],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: node.count("New connection"), timeout=10)
        wait_until(lambda: node.count("Backbone: connected to Redis"), timeout=10)
        direct = redis.Redis(port=redis_server.port)
        for seq, text in ((1, "one"), (3, "three")):
            direct.xadd("chat:room", {"n": "0123456789abcdef", "s": seq, "c": 1, "t": time.time(),
                                      "f": f"40009: {text}\n"})
        client.wait(15)  # stdin stays open: it ends by itself once the server closed it
        out, err = client.communicate()
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        node.stop()
    assert client.returncode == 0, err
    assert out.splitlines() == ["Connected to chat server. Type 'exit' to leave.", "40009: one",
                                CLOSE_NOTICES["backbone_gap"].rstrip("\n"), "Disconnected from server"], (
        out, err, node.lines)
    assert node.count("closed (backbone_gap)") == 1
