"""One bad client costs only itself; departed clients leave nothing behind;
non-readers and churners together cost the room little (issue 15: their
attack runs as this file, `python test_isolation.py HOST PORT SECONDS`, in a
process of its own)."""

import os
import random
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, Peer, reset, reset_on_close, wait_until
from relayproc import process_usage


# The server runs as its own process here: a reader sharing the server's GIL
# is slower than the relay can flood it, which would measure the test itself.

@pytest.mark.timeout(60)
def test_client_that_never_reads_cannot_stall_a_5mb_flood(server_process):
    server = server_process("--quiet", "--max-rate", "0")  # the flood at full speed
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(server.address)  # and never reads
    flooder, reader = Peer(server.address), Peer(server.address)
    wait_until(lambda: sum("New connection" in line for line in server.lines) == 3)

    line = "f" * 990
    count = 5 * 1024 * 1024 // (len(line) + 1)
    expected = (f"{flooder.port}: {line}\n" * count).encode()
    sender = threading.Thread(target=flooder.send, args=((line + "\n").encode() * count,))
    sender.start()
    received = reader.read_until(lambda got: len(got) >= len(expected), timeout=30)
    sender.join(10)
    assert received == expected
    server.wait_for_line(f"Connection from ('127.0.0.1', {stuck.getsockname()[1]}) closed (slow_consumer)")
    # Nobody else was touched, and the room still works promptly.
    reader.send("still fine\n")
    flooder.expect(f"{reader.port}: still fine\n")
    for peer in (stuck, flooder, reader):
        peer.close()
    assert server.stop()[0] == 0


def test_other_clients_keep_chatting_while_one_is_stuck(server_process):
    server = server_process("--quiet", "--outbound-budget", "32768", "--max-rate", "0")  # a sends 600 at once
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(server.address)
    a, b = Peer(server.address), Peer(server.address)
    wait_until(lambda: sum("New connection" in line for line in server.lines) == 3)
    # Messages one at a time, each waited for: the stuck client's socket and
    # then its 32 KiB budget fill up while b sees every message at once.
    for i in range(600):
        a.send(f"{i:03d} " + "x" * 500 + "\n")
        b.expect(f"{a.port}: {i:03d} {'x' * 500}\n")
    server.wait_for_line(f"Connection from ('127.0.0.1', {stuck.getsockname()[1]}) closed (slow_consumer)")
    for peer in (stuck, a, b):
        peer.close()
    assert server.stop()[0] == 0


def threads_and_fds(pid):
    """The server process's own thread and open-descriptor counts."""
    return process_usage(pid)[:2]


@pytest.mark.timeout(60)
def test_threads_and_descriptors_return_to_baseline_after_200_clients(server_process):
    server = server_process("--quiet")
    pid = server.proc.pid
    baseline = threads_and_fds(pid)
    steady = Peer(server.address)
    for round_ in range(4):
        batch = [Peer(server.address) for _ in range(50)]
        for i, peer in enumerate(batch):
            peer.send(f"r{round_} p{i}\n")
        total = sum(len(f"{p.port}: r{round_} p{i}\n") for i, p in enumerate(batch))
        # Some peers may send before the others are registered, so steady is
        # the one reader sure to be there for every message.
        steady.read_until(lambda got: len(got) >= total)
        steady.received = bytearray()
        for i, peer in enumerate(batch):
            if i % 3 == 0:
                peer.send("exit")
                peer.expect_closed()  # what it was sent meanwhile is discarded
            elif i % 3 == 1:  # reset instead of a clean close
                reset_on_close(peer.sock)
            peer.close()
    wait_until(lambda: threads_and_fds(pid)[0] == baseline[0] + 1, timeout=10,
               message="only the steady client's reader left")
    steady.close()
    wait_until(lambda: threads_and_fds(pid) == baseline, timeout=10,
               message=f"threads/fds back to {baseline}, now {threads_and_fds(pid)}")
    status, lines, err = server.stop()
    assert status == 0
    departures = [line for line in lines if " closed (" in line]
    assert len(departures) == 201
    assert sum(line.endswith("closed (exit)") for line in departures) == 4 * 17  # i % 3 == 0


# --- non-readers and churners together: the flow-control stall (issue 15) -------------

class SteadyRoom:
    """Chatters on one selector thread: `senders` of them each send a 200-byte
    message at `rate` per second, every one of them reads, and every delivery
    is checked (sender, sequence) and timed."""

    def __init__(self, address, clients=60, senders=6, rate=25.0):
        self.peers = [Peer(address) for _ in range(clients)]
        self.senders = self.peers[:senders]
        self.rate = rate
        self.latencies = []
        self.received = {peer.port: {s.port: [] for s in self.senders if s is not peer}
                         for peer in self.peers}
        self.sent = {s.port: 0 for s in self.senders}

    def run(self, seconds):
        """Chat for `seconds`, then wait (bounded) for the last deliveries."""
        selector = selectors.DefaultSelector()
        partial = {}
        for peer in self.peers:
            peer.sock.setblocking(False)
            selector.register(peer.sock, selectors.EVENT_READ, peer)
            partial[peer.port] = b""
        start = time.monotonic()
        interval = 1.0 / self.rate
        next_send = {s.port: start + i * interval / len(self.senders) for i, s in enumerate(self.senders)}
        deadline = start + seconds + 15
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now < start + seconds:
                for sender in self.senders:
                    if now >= next_send[sender.port]:
                        seq = self.sent[sender.port]
                        text = f"{seq} {time.monotonic():.6f} ".ljust(200, "m")
                        sender.sock.setblocking(True)
                        sender.sock.sendall(text.encode() + b"\n")
                        sender.sock.setblocking(False)
                        self.sent[sender.port] += 1
                        next_send[sender.port] += interval
            for key, _ in selector.select(0.002):
                peer = key.data
                try:
                    chunk = peer.sock.recv(65536)
                except BlockingIOError:
                    continue
                arrived = time.monotonic()
                data = partial[peer.port] + chunk
                *lines, partial[peer.port] = data.split(b"\n")
                for line in lines:
                    port, _, text = line.decode(errors="replace").partition(": ")
                    if not port.isdigit() or int(port) not in self.sent:
                        continue  # an attacker's message: not what is measured
                    seq, stamp, _ = text.split(" ", 2)
                    self.received[peer.port][int(port)].append(int(seq))
                    self.latencies.append(arrived - float(stamp))
            if now >= start + seconds and self.complete():
                break
        selector.close()
        for peer in self.peers:
            peer.sock.setblocking(True)

    def complete(self):
        return all(len(seqs) == self.sent[port]
                   for got in self.received.values() for port, seqs in got.items())

    def check_nothing_lost(self):
        for receiver, got in self.received.items():
            for port, seqs in got.items():
                assert seqs == list(range(self.sent[port])), (receiver, port, len(seqs), self.sent[port])

    def p99(self):
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99)]

    def close(self):
        for peer in self.peers:
            peer.close()


def _churn(address, stop, rng):
    """Connect, send a line, then exit / reset / garbage / escape junk, close;
    every 10 ms, until `stop`."""
    endings = [b"exit", None, bytes(rng.randrange(256) for _ in range(300)),
               b"\x1b[2J\x1b]0;pwned\x07\x1b[31m" * 20]
    while not stop.wait(0.01):
        try:
            sock = socket.create_connection(address, timeout=2)
            sock.sendall(b"churn\n")
            ending = rng.choice(endings)
            if ending is None:
                reset(sock)
                continue
            sock.sendall(ending)
            sock.close()
        except OSError:
            pass


def attack(host, port, seconds):
    """The attackers, in their own process (so they do not take the measuring
    process's GIL): 10 clients with a 2 KiB receive buffer that never read,
    and 3 churn loops. Prints "ready" once the non-readers are connected."""
    address = (host, int(port))
    non_readers = []
    for _ in range(10):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(address)
        non_readers.append(sock)
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    stop = threading.Event()
    churners = [threading.Thread(target=_churn, args=(address, stop, random.Random(i)))
                for i in range(3)]
    for churner in churners:
        churner.start()
    stop.wait(float(seconds))
    stop.set()
    for churner in churners:
        churner.join()
    for sock in non_readers:
        sock.close()


@pytest.mark.timeout(120)
def test_non_readers_and_churners_together_do_not_stall_the_room(server_process):
    """Issue 15's mix: the steady chatters' p99 under attack stays within a
    small factor of the same room's without it, measured in this run."""
    server = server_process("--quiet")
    pid = server.proc.pid
    baseline = process_usage(pid)[:2]

    quiet = SteadyRoom(server.address)
    server.wait_for_count("New connection", 60)
    quiet.run(2.0)
    quiet.check_nothing_lost()
    quiet.close()
    wait_until(lambda: process_usage(pid)[:2] == baseline, timeout=10, message="quiet room gone")

    attackers = subprocess.Popen([sys.executable, __file__, *map(str, server.address), "6"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert attackers.stdout.readline() == "ready\n"
        attacked = SteadyRoom(server.address)
        server.wait_for_count("New connection", 60 + 10 + 60)
        attackers.stdin.write("go\n")
        attackers.stdin.flush()
        attacked.run(6.0)
        assert attackers.wait(20) == 0
    finally:
        if attackers.poll() is None:
            attackers.kill()
            attackers.wait()
    attacked.check_nothing_lost()
    assert attacked.p99() <= 5 * quiet.p99() + 0.05, (
        f"steady chatters' p99 {attacked.p99() * 1000:.1f} ms under attack, "
        f"{quiet.p99() * 1000:.1f} ms without")
    attacked.close()
    wait_until(lambda: process_usage(pid)[:2] == baseline, timeout=15,
               message=lambda: f"threads/fds back to {baseline}, now {process_usage(pid)[:2]}")
    status, _, err = server.stop()
    assert status == 0 and "Traceback" not in err, err


if __name__ == "__main__":
    attack(*sys.argv[1:])
