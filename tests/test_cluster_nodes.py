"""End to end: real `a2/mychatserver.py --backbone redis://...` node processes,
a real redis-server (127.0.0.1, a free port), raw TCP clients on each node.

Every client sends numbered messages ("NAME SEQ"); every receiver parses
what arrives and the test checks, per receiver and per sender, the exact
list of numbers: complete (or a gap-free prefix where a close with
backbone_gap is allowed), in order, once, under the sender's own port,
never echoed. Redis and nodes are SIGKILLed, SIGSTOPped and restarted
mid-run. Each test is bounded (pytest-timeout, deadlines on every wait)."""

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from a2.mychatserver import CLOSE_NOTICES
from cluster.local import Node, RedisServer, free_port, start_nodes
from conftest import ROOT, SERVER_SCRIPT, wait_until

pytestmark = pytest.mark.timeout(40)

FRAME = re.compile(rb"(\d+): (\S+) (\d+)")
GAP_NOTICE = CLOSE_NOTICES["backbone_gap"].encode()  # what a client closed for a gap is told first


class Chatter:
    """A raw TCP chat client on one node. Sends "NAME SEQ" lines; a thread
    reads and parses every frame into got[sender name] = [seq, ...]."""

    def __init__(self, name, node):
        self.name = name
        self.node = node
        self.sock = socket.create_connection(node.address, timeout=10)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.got = collections.defaultdict(list)
        self.ports = collections.defaultdict(set)   # sender name -> prefixes seen
        self.bad = []                               # frames that do not parse
        self.notices = []                           # the server's notice lines (not chat frames)
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        buffer = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line + b"\n" == GAP_NOTICE:
                        self.notices.append(line + b"\n")
                        continue
                    match = FRAME.fullmatch(line)
                    if match is None:
                        self.bad.append(line)
                        continue
                    sender = match.group(2).decode()
                    self.ports[sender].add(int(match.group(1)))
                    self.got[sender].append(int(match.group(3)))
        except OSError:
            pass
        finally:
            self.closed.set()

    def send(self, count, burst=1, pause=0.0):
        """Send the next `count` numbered messages, `burst` lines per write,
        `pause` seconds between writes (pacing, not synchronisation). `sent`
        counts what was written; a connection the server closed ends it."""
        last = self.sent + count
        while self.sent < last:
            end = min(self.sent + burst, last)
            try:
                self.sock.sendall(b"".join(f"{self.name} {seq}\n".encode() for seq in range(self.sent, end)))
            except OSError:
                return  # closed by the server (e.g. backbone_gap): the test judges that
            self.sent = end
            if pause:
                time.sleep(pause)

    def has(self, other, count):
        return len(self.got[other.name]) >= count

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def check_exact(receiver, senders, allow_prefix=False):
    """receiver got each sender's numbers 0..sent-1, once, in order, under
    the sender's own port (or, with allow_prefix, or from a sender the
    server closed, a gap-free start of them: what the server read before
    it closed the sender)."""
    assert receiver.bad == []
    assert receiver.notices == ([GAP_NOTICE] if receiver.notices else []), "told at most once"
    assert not receiver.notices or receiver.closed.is_set(), "told, then closed"
    assert receiver.name not in receiver.got, "echoed to its sender"
    for sender in senders:
        got = receiver.got[sender.name]
        expected = list(range(sender.sent))
        if allow_prefix or sender.closed.is_set():
            assert got == expected[:len(got)], f"{receiver.name} from {sender.name}: gap or disorder"
        else:
            assert got == expected, (f"{receiver.name} from {sender.name}: {len(got)} of "
                                     f"{sender.sent}, first wrong at "
                                     f"{next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), None)}")
        if got:
            assert receiver.ports[sender.name] == {sender.port}, "wrong prefix"


@pytest.fixture
def cluster():
    """cluster(nodes=3, appendonly=True, clients_per_node=1, **url_query) ->
    (redis server, nodes, clients): everything stopped at teardown."""
    made = []

    def start(nodes=3, appendonly=True, clients_per_node=1, **query):
        redis_server = RedisServer(appendonly=appendonly).start()
        made.append(redis_server)
        # Flood control off: these clients send hundreds of messages at once.
        started = start_nodes(redis_server.url(**query), nodes, args=["--quiet", "--max-rate", "0"])
        made.extend(started)
        for node in started:  # every node reads the stream and hears the others
            wait_until(lambda: all(node.count(f"hearing node {other.node_id}")
                                   for other in started if other is not node),
                       timeout=10, message="nodes hear each other")
        clients = []
        for i, node in enumerate(started):
            for j in range(clients_per_node):
                client = Chatter(f"n{i}c{j}", node)
                made.append(client)
                clients.append(client)
            wait_until(lambda: node.count("New connection") >= clients_per_node,
                       message="clients registered")
        return redis_server, started, clients

    yield start
    for thing in reversed(made):
        (thing.close if isinstance(thing, Chatter) else thing.stop)()


def everyone_has_everything(clients):
    return all(receiver.has(sender, sender.sent)
               for receiver in clients for sender in clients if sender is not receiver)


def send_all(clients, count, **pacing):
    """Every client sends `count` messages at once, each from its own thread."""
    threads = [threading.Thread(target=client.send, args=(count,), kwargs=pacing) for client in clients]
    for thread in threads:
        thread.start()
    return threads


def test_cross_node_delivery_is_exact(cluster):
    _, nodes, clients = cluster(nodes=3, clients_per_node=2)
    for thread in send_all(clients, 200, burst=5):
        thread.join(20)
    wait_until(lambda: everyone_has_everything(clients), timeout=15, message="every delivery")
    # one more round trip through every node: nothing extra was still on its way
    clients[0].send(1)
    wait_until(lambda: everyone_has_everything(clients), timeout=15)
    for receiver in clients:
        check_exact(receiver, [c for c in clients if c is not receiver])
        assert not receiver.closed.is_set()
    assert all(node.count("backbone_gap") == 0 for node in nodes)


def test_redis_sigkilled_and_restarted_on_its_aof_loses_nothing(cluster):
    redis_server, nodes, clients = cluster(nodes=3, appendonly=True)
    threads = send_all(clients, 400, burst=4, pause=0.01)
    wait_until(lambda: all(len(r.got[s.name]) > 60 for r in clients for s in clients if s is not r),
               message="traffic flowing")
    redis_server.kill(signal.SIGKILL)
    wait_until(lambda: all(node.count("Backbone: lost Redis") for node in nodes), message="outage seen")
    redis_server.start()
    for thread in threads:
        thread.join(20)
    wait_until(lambda: everyone_has_everything(clients), timeout=15, message="every delivery")
    for receiver in clients:
        check_exact(receiver, [c for c in clients if c is not receiver])
        assert not receiver.closed.is_set(), "nobody disconnected"
    assert all(node.count("Backbone: reconnected to Redis") == 1 for node in nodes)
    assert all(node.count("backbone_gap") == 0 for node in nodes)


def test_redis_restarted_without_its_data_is_gap_free_or_closed(cluster):
    redis_server, nodes, clients = cluster(nodes=3, appendonly=False, clients_per_node=2)
    threads = send_all(clients, 300, burst=4, pause=0.01)
    wait_until(lambda: all(len(r.got[s.name]) > 40 for r in clients for s in clients if s is not r),
               message="traffic flowing")
    redis_server.kill(signal.SIGKILL)
    redis_server.start(wipe=True)
    for thread in threads:
        thread.join(20)
    wait_until(lambda: all(r.closed.is_set() or all(s.closed.is_set() or r.has(s, s.sent)
                                                    for s in clients if s is not r)
                           for r in clients), timeout=15, message="complete or closed")
    for receiver in clients:
        others = [c for c in clients if c is not receiver]
        if receiver.closed.is_set():  # told: its node saw a gap it could not repair
            wait_until(lambda: receiver.node.count("closed (backbone_gap)"),
                       message="the close logged as backbone_gap")
            assert receiver.notices == [GAP_NOTICE], "told in words before the close"
            check_exact(receiver, others, allow_prefix=True)
        else:
            check_exact(receiver, others)
    assert all(node.count("the stream went backwards") for node in nodes)
    print(f"{sum(r.closed.is_set() for r in clients)} of {len(clients)} receivers closed "
          f"with backbone_gap")  # -s shows which branch this run took


def test_a_node_sigkilled_costs_the_others_nothing(cluster):
    _, nodes, clients = cluster(nodes=3, clients_per_node=1)
    survivors = [c for c in clients if c.node is not nodes[2]]
    victim = clients[2]
    threads = send_all(survivors, 400, burst=4, pause=0.005)
    wait_until(lambda: all(len(r.got[s.name]) > 50 for r in survivors for s in survivors if s is not r),
               message="traffic flowing")
    nodes[2].proc.kill()
    assert victim.closed.wait(5), "its clients see their connection close"
    for thread in threads:
        thread.join(20)
    wait_until(lambda: everyone_has_everything(survivors), timeout=15, message="every delivery")
    for receiver in survivors:
        check_exact(receiver, [c for c in survivors if c is not receiver])
        assert not receiver.closed.is_set()
    wait_until(lambda: all(node.count(f"node {nodes[2].node_id} silent") for node in nodes[:2]),
               timeout=10, message="the dead node forgotten")


def test_a_stopped_node_catches_up_and_past_the_retention_closes_its_clients(cluster):
    _, nodes, clients = cluster(nodes=3, clients_per_node=1, maxlen=200)
    sender, stopped, witness = clients
    # briefly stopped, within the retention: it catches up, nobody closed
    os.kill(nodes[1].proc.pid, signal.SIGSTOP)
    try:
        sender.send(100, burst=10, pause=0.002)
        wait_until(lambda: witness.has(sender, 100))
    finally:
        os.kill(nodes[1].proc.pid, signal.SIGCONT)
    wait_until(lambda: stopped.has(sender, 100), message="the stopped node caught up")
    check_exact(stopped, [sender])
    assert not stopped.closed.is_set()
    # stopped while more than the retention (~200 entries) goes by: one entry
    # per message, each sent once the witness has the one before
    os.kill(nodes[1].proc.pid, signal.SIGSTOP)
    try:
        for _ in range(600):
            count = sender.sent + 1
            sender.send(1)
            wait_until(lambda: witness.has(sender, count))
    finally:
        os.kill(nodes[1].proc.pid, signal.SIGCONT)
    assert stopped.closed.wait(10), "closed, not silently missing messages"
    wait_until(lambda: nodes[1].count("closed (backbone_gap)") == 1, message="logged as backbone_gap")
    assert stopped.notices == [GAP_NOTICE]
    check_exact(stopped, [sender], allow_prefix=True)
    assert len(stopped.got[sender.name]) < 700
    check_exact(witness, [sender])
    assert not witness.closed.is_set() and not sender.closed.is_set()


def test_local_chat_survives_a_redis_outage(cluster):
    redis_server, nodes, _ = cluster(nodes=2, clients_per_node=0)
    redis_server.kill(signal.SIGKILL)
    wait_until(lambda: all(node.count("Backbone: lost Redis") for node in nodes), message="outage seen")
    a, b = Chatter("a", nodes[0]), Chatter("b", nodes[0])
    try:
        wait_until(lambda: nodes[0].count("New connection") == 2)
        a.send(50, burst=5)
        b.send(50, burst=5)
        wait_until(lambda: a.has(b, 50) and b.has(a, 50), message="local deliveries")
        check_exact(a, [b])
        check_exact(b, [a])
    finally:
        a.close()
        b.close()


def test_a_node_started_with_redis_down_serves_its_room_and_joins_later(tmp_path):
    redis_server = RedisServer(appendonly=False)
    node = Node(redis_server.url(), args=["--quiet"])
    a = b = None
    try:
        wait_until(lambda: node.count("Backbone: cannot reach Redis"), message="the warning")
        a, b = Chatter("a", node), Chatter("b", node)
        wait_until(lambda: node.count("New connection") == 2)
        a.send(10)
        wait_until(lambda: b.has(a, 10))
        check_exact(b, [a])
        redis_server.start()
        wait_until(lambda: node.count("Backbone: connected to Redis"), timeout=5)
        assert node.count("Backbone: cannot reach Redis") == 1
    finally:
        for client in (a, b):
            if client is not None:
                client.close()
        status = node.proc.poll()
        node.stop()
        redis_server.stop()
    assert status is None and node.proc.returncode == 0


def test_backbone_needs_the_redis_package_one_line_error(tmp_path):
    fake = tmp_path / "redis"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'redis'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--port", "0", "--backbone",
                           "redis://127.0.0.1:6379/0"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--backbone needs the redis package" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_bad_backbone_url_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--port", "0", "--backbone",
                           "http://127.0.0.1:6379/0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 2  # waiting cannot fix it
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "redis://" in done.stderr


def test_the_demo_starts_redis_and_nodes_and_stops_them_all_on_ctrl_c():
    for _ in range(3):  # the demo needs N consecutive free ports: retry on a taken one
        base = free_port(2)
        demo = subprocess.Popen([sys.executable, str(ROOT / "cluster" / "demo.py"), "--nodes", "2",
                                 "--base-port", str(base)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in demo.stdout),
                                  daemon=True)
        reader.start()
        try:
            wait_until(lambda: any("Ctrl-C stops them all" in l for l in lines) or demo.poll() is not None,
                       timeout=20, message="the demo ready")
            if demo.poll() is not None:
                continue
            pids = [int(m.group(1)) for m in map(re.compile(r"pid (\d+)").search, lines) if m]

            class Fake:  # Chatter needs only .address
                def __init__(self, port):
                    self.address = ("127.0.0.1", port)
            a, b = Chatter("a", Fake(base)), Chatter("b", Fake(base + 1))
            wait_until(lambda: sum("New connection" in l for l in lines) == 2)
            wait_until(lambda: sum("hearing node" in l for l in lines) >= 2)
            a.send(5)
            wait_until(lambda: b.has(a, 5))
            check_exact(b, [a])
            demo.send_signal(signal.SIGINT)
            assert demo.wait(10) == 0
            reader.join(5)
            assert a.closed.wait(5) and b.closed.wait(5)
            assert lines[-1] == "Stopped" and sum("Server stopped" in l for l in lines) == 2
            assert pids and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
            return
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    pytest.fail("the demo did not start in 3 tries: " + " | ".join(lines[-5:]))


def test_a_gap_is_counted_in_the_servers_stats_as_backbone_gap():
    """In-process: a real ChatServer with a real backbone; a peer's entries
    skip a number; the local clients are closed and the server counts them
    under disconnects_total["backbone_gap"]; stats()["backbone"] is the
    backbone's own snapshot."""
    import redis
    from cluster.backbone import start_backbone
    from conftest import Peer, running_server
    with RedisServer(appendonly=False) as redis_server, running_server() as server:
        backbone = start_backbone(server, redis_server.url(), node_port=server.address[1])
        server.attach_backbone(backbone)
        peers = []
        try:
            wait_until(lambda: server.stats()["backbone"]["connected"])
            peers += [Peer(server.address) for _ in range(3)]
            wait_until(lambda: server.client_count == 3)
            direct = redis.Redis(port=redis_server.port)
            for seq, text in ((1, "one"), (3, "three")):
                direct.xadd("chat:room", {"n": "0123456789abcdef", "s": seq, "c": 1, "t": time.time(),
                                          "f": f"40009: {text}\n"})
            for peer in peers:  # what came before the gap, then why, then the close
                assert peer.expect_closed() == b"40009: one\n" + GAP_NOTICE
            wait_until(lambda: server.stats()["disconnects_total"]["backbone_gap"] == 3)
            stats = server.stats()["backbone"]
            assert stats["gaps_total"] == 1 and stats["messages_in_total"] == 2 and stats["peers"] == 1
        finally:
            for peer in peers:
                peer.close()
