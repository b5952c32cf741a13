"""Churn soak: for CHAT_SOAK_SECONDS (default 6; quick runs use e.g. 5)
hundreds of clients connect, chat, leave with `exit`, close, or reset, while a
population of about 60 is connected. Afterwards the server process is back to
its starting threads and descriptors, its memory is near where it started,
and every well-behaved client received every message sent while it was
connected: in order, exactly once, attributed to its sender.

"While it was connected" is made exact by causality, all on one clock (this
process's): a client R is certainly registered once the server has logged
`New connection from` R (it logs that once R is in the room), or once some
other client has received a message from R; a message sent after the earlier
of those moments, and before R decides to leave, must reach R. When R decides
to leave it keeps reading until it has every such message (or the test
fails), then leaves. So clients that never send are checked like the others.
Every moment is stamped when this process sees the event (a send returned, a
recv returned, a log line read, a decision made), never with a time taken
earlier in the loop: a stamp earlier than its event would make R owe a
message sent before R was registered.

All clients live in one selector loop in this process; the server is its own
process, measured through /proc/<pid>/.
"""

import bisect
import collections
import os
import random
import re
import selectors
import socket
import time

import pytest

from conftest import reset_on_close
from reliability_helpers import FORBIDDEN, soak_seconds, wait_until
from relayproc import process_usage

POPULATION = 60
# Kinds of client, with their share of arrivals. "line" and "raw" leave with
# exit, "closer" with a plain close (FIN), "resetter" with an RST at a random
# moment (maybe mid-line), "silent" never sends and closes.
KINDS = {"line": 0.45, "raw": 0.15, "closer": 0.12, "resetter": 0.15, "silent": 0.13}
GUARANTEED_SENDERS = {"line", "raw", "closer", "observer"}  # whose every message must arrive
WELL_BEHAVED = {"line", "raw", "closer", "silent", "observer"}  # who must receive everything
HALF_LINE = "half a line, then gone"
DELIVERY_DEADLINE = 15.0  # seconds a leaving client waits for what it is owed
# Memory: the server's RSS once everyone left may exceed its start by at most
# this (interpreter caches, arenas kept by the allocator); a leak of even one
# 256 KiB thread stack or a few KiB per connection would exceed it over
# hundreds of connections.
RSS_SLACK_KIB = 8 * 1024
NEW_CONNECTION = re.compile(r"New connection from \('127\.0\.0\.1', (\d+)\)")


class Client:
    def __init__(self, soak, cid, kind, now):
        self.soak = soak
        self.id = cid
        self.kind = kind
        self.rng = random.Random(soak.seed * 100_003 + cid)
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(soak.address)
        except BlockingIOError:
            pass
        self.sock = sock
        self.port = sock.getsockname()[1]  # bound by connect(), before the handshake ends
        self.connected = False
        self.state = "open"  # open -> leaving (draining what it is owed) -> closing -> done
        self.lifetime_end = now + (soak.duration * 2 if kind == "observer" else self.rng.uniform(0.3, 5.0))
        self.next_send = now + self.rng.uniform(0.0, 0.3)
        self.seq = 0
        self.send_times = []  # send_times[seq]: when its last byte reached the kernel
        self.out = bytearray()
        self.out_marks = collections.deque()  # (byte offset at which a message ends, seq)
        self.out_sent = 0
        self.out_queued = 0
        self.held = None  # second half of a line split across two writes
        self.tail = b""  # what we sent after our last newline
        self.max_seen = -1  # highest seq of ours another client has received
        self.inbuf = bytearray()
        self.received = {}  # sender id -> [first seq, last seq]
        self.first_seen = None  # when another client first received from us
        self.logged_in = None  # when we read the server's "New connection" line for us
        self.decided = None  # when we decided to leave
        self.owed = None  # sender id -> highest seq we must still receive
        self.owed_lowest = {}  # sender id -> lowest seq we must have received
        self.left_with = None
        self.said_goodbye = None
        self.mask = selectors.EVENT_READ | selectors.EVENT_WRITE  # wait for connect

    # --- sending -----------------------------------------------------------------

    def queue(self, data, marks=()):
        """Send `data`; `marks` are (offset in data where a message ends, seq)."""
        base = self.out_queued
        self.out += data
        self.out_queued += len(data)
        for end, seq in marks:
            self.out_marks.append((base + end, seq))
        self.flush()

    def flush(self):
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                raise AssertionError(f"client {self.id} ({self.kind}): send failed: {exc}")
            sent = bytes(self.out[:n])
            newline = sent.rfind(b"\n")
            self.tail = sent[newline + 1:] if newline >= 0 else self.tail + sent
            del self.out[:n]
            self.out_sent += n
            now = time.monotonic()
            while self.out_marks and self.out_marks[0][0] <= self.out_sent:
                self.send_times.append(now)
                self.out_marks.popleft()
        self.soak.set_mask(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))

    def maybe_send(self, now):
        if self.kind == "silent" or now < self.next_send or self.out:
            return
        if self.held is not None:
            data, marks = self.held
            self.held = None
            self.queue(data, marks)
        elif self.state != "open":
            return
        elif self.kind == "raw":
            if self.seq > 0 and self.max_seen < self.seq - 1:
                return  # a classmate's client: one burst per message, typed slowly
            data = self.text(self.seq).encode()
            self.queue(data, [(len(data), self.seq)])
            self.seq += 1
        else:
            count = 2 if self.seq > 0 and self.rng.random() < 0.15 else 1  # two in one write
            encoded = [(self.text(self.seq + i) + "\n").encode() for i in range(count)]
            marks, offset = [], 0
            for i, line in enumerate(encoded):
                offset += len(line)
                marks.append((offset, self.seq + i))
            data = b"".join(encoded)
            if self.seq > 0 and count == 1 and self.rng.random() < 0.2:
                cut = self.rng.randint(1, len(data) - 1)  # a line split across two writes
                self.queue(data[:cut])
                self.held = (data[cut:], [(len(data) - cut, self.seq)])
                self.seq += count
                self.next_send = now + 0.01
                return
            self.queue(data, marks)
            self.seq += count
        self.next_send = now + self.rng.uniform(0.1, 0.9)

    def text(self, seq):
        return f"m {self.id} {seq} " + "p" * self.rng.randint(0, 60)

    # --- receiving ---------------------------------------------------------------

    def on_readable(self):
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            chunk = b""
        received_at = time.monotonic()  # after the bytes arrived, before anything else is sent
        if not chunk:
            self.on_eof()
            return
        self.inbuf += chunk
        end = self.inbuf.rfind(b"\n") + 1
        if end:
            for line in bytes(self.inbuf[:end]).split(b"\n")[:-1]:
                self.soak.on_frame(self, line, received_at)
            del self.inbuf[:end]

    def on_eof(self):
        if self.state not in ("closing",):
            raise AssertionError(f"client {self.id} ({self.kind}, port {self.port}) was disconnected "
                                 f"by the server in state {self.state}")
        # Relays queued before we left may be cut short by the close: a
        # trailing partial frame is allowed only here.
        self.soak.finish(self)


class Soak:
    def __init__(self, address, duration, seed, server_lines):
        self.address = address
        self.server_lines = server_lines  # the server's stdout, growing as it runs
        self.lines_read = 0
        self.unlogged = collections.defaultdict(collections.deque)  # port -> clients not yet logged
        self.duration = duration
        self.seed = seed
        self.rng = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.clients = {}  # id -> Client, alive
        self.everyone = []  # every client ever, by id
        self.by_port = {}  # port -> the last client connected from it
        self.sent_expected = collections.Counter()
        self.left = collections.Counter()  # how clients left, by the server's reason
        self.checked_owed = 0
        self.silent_checked = 0  # clients that never sent, whose deliveries were checked
        self.frames = 0

    # --- loop ----------------------------------------------------------------------

    def spawn(self, kind, now):
        client = Client(self, len(self.everyone), kind, now)
        self.everyone.append(client)
        self.clients[client.id] = client
        self.unlogged[client.port].append(client)
        self.selector.register(client.sock, client.mask, client)
        return client

    def set_mask(self, client, mask):
        if client.mask != mask and client.state != "done":
            client.mask = mask
            self.selector.modify(client.sock, mask, client)

    def run(self):
        start = time.monotonic()
        self.stop_spawning = stop_spawning = start + self.duration
        self.observer = self.spawn("observer", start)
        kinds, weights = zip(*KINDS.items())
        last_step = start
        while True:
            now = time.monotonic()
            if now < stop_spawning:
                while len(self.clients) < POPULATION:
                    self.spawn(self.rng.choices(kinds, weights)[0], now)
            elif self.observer.state == "open" and len(self.clients) == 1:
                self.decide_to_leave(self.observer)
            elif not self.clients:
                return
            for key, events in self.selector.select(timeout=0.01):
                client = key.data
                if client.state == "done":
                    continue
                if not client.connected and events & selectors.EVENT_WRITE:
                    self.on_connected(client)
                if events & selectors.EVENT_READ and client.connected:
                    client.on_readable()
                if events & selectors.EVENT_WRITE and client.state != "done" and client.out:
                    client.flush()
            now = time.monotonic()
            if now - last_step >= 0.005:
                last_step = now
                self.read_server_log()
                for client in list(self.clients.values()):
                    self.step(client, now)

    def read_server_log(self):
        """Note when each client's "New connection" line is seen (a port's
        connections are logged in the order they were made)."""
        while self.lines_read < len(self.server_lines):
            match = NEW_CONNECTION.search(self.server_lines[self.lines_read])
            seen_at = time.monotonic()  # the line is in the list: the server logged it before now
            self.lines_read += 1
            if match:
                waiting = self.unlogged.get(int(match.group(1)))
                assert waiting, f"the server logged a connection nobody made: {match.group(0)}"
                waiting.popleft().logged_in = seen_at

    def on_connected(self, client):
        error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert error == 0, f"connect failed: {os.strerror(error)}"
        client.connected = True
        self.by_port[client.port] = client
        client.flush()

    def step(self, client, now):
        if not client.connected or client.state == "done":
            return
        if client.state == "open":
            if client.kind != "observer" and (now >= client.lifetime_end or now >= self.stop_spawning):
                if client.kind == "resetter":
                    if self.rng.random() < 0.5:
                        client.out += HALF_LINE.encode()  # never finished
                        client.flush()
                    self.reset(client)
                    return
                self.decide_to_leave(client)
            else:
                client.maybe_send(now)
        if client.state == "leaving":
            if client.held is not None or client.out:
                client.maybe_send(now)  # finish a split line first
                return
            if client.kind == "raw" and client.max_seen < client.seq - 1:
                pass  # its last burst not relayed yet: "exit" now could merge with it
            elif self.owed_satisfied(client):
                self.say_goodbye(client)
                return
            elif now - client.decided > DELIVERY_DEADLINE:
                missing = {s: (client.received.get(s), hi) for s, hi in client.owed.items()}
                raise AssertionError(f"client {client.id} ({client.kind}) never received messages "
                                     f"it was owed: sender -> (received range, owed up to) {missing}")
        if client.state == "closing" and now - client.said_goodbye > DELIVERY_DEADLINE:
            raise AssertionError(f"client {client.id} ({client.kind}) left with {client.left_with}; "
                                 f"the server never closed the connection")

    # --- bookkeeping of deliveries -----------------------------------------------------

    def on_frame(self, receiver, line, received_at):
        self.frames += 1
        port, sep, text = line.partition(b": ")
        assert sep and port.isdigit(), f"bad frame {line[:80]!r}"
        text = text.decode()  # strict: the server relays valid UTF-8 only
        assert not FORBIDDEN.search(text) and len(line) + 1 <= 1024
        origin = self.by_port[int(port)]
        if origin.kind == "resetter" and text.encode() == origin.tail:
            # A resetter's unfinished line. Relayed if it never sent a
            # newline (a raw-text client: the burst is a message), and also
            # when the kernel reported the reset to the server's writer
            # thread: its reader then sees a plain EOF, which completes the line.
            return
        fields = text.split(" ")
        assert fields[0] == "m", f"{receiver.id} got a message nobody sent: {text[:80]!r}"
        sender = self.everyone[int(fields[1])]
        seq = int(fields[2])
        assert text == f"m {sender.id} {seq} " + "p" * (len(text) - len(f"m {sender.id} {seq} ")), text
        assert int(port) == sender.port, f"message of client {sender.id} attributed to port {port}"
        assert sender is not receiver, "echoed to its sender"
        span = receiver.received.get(sender.id)
        if span is None:
            receiver.received[sender.id] = [seq, seq]
        else:
            assert seq == span[1] + 1, (f"client {receiver.id} got {sender.id}#{seq} after "
                                        f"#{span[1]}: lost, duplicated or reordered")
            span[1] = seq
        if sender.first_seen is None:
            sender.first_seen = received_at
        if seq > sender.max_seen:
            sender.max_seen = seq

    def decide_to_leave(self, client):
        """Stop sending; work out what the client is owed: from every sender
        whose messages are guaranteed, each one sent after we were surely
        registered and before now."""
        self.read_server_log()
        now = time.monotonic()
        client.state = "leaving"
        client.decided = now
        client.owed = {}
        known = [moment for moment in (client.first_seen, client.logged_in) if moment is not None]
        if client.kind not in WELL_BEHAVED or not known:
            return  # not logged yet, nor heard by anyone: we cannot know it was registered
        registered = min(known)
        self.silent_checked += client.kind == "silent"
        for sender in self.everyone:
            if sender is client or sender.kind not in GUARANTEED_SENDERS or not sender.send_times:
                continue
            lo = bisect.bisect_right(sender.send_times, registered)
            hi = bisect.bisect_left(sender.send_times, now) - 1
            if lo <= hi:
                client.owed[sender.id] = hi
                client.owed_lowest[sender.id] = lo
        self.checked_owed += sum(hi - client.owed_lowest[s] + 1 for s, hi in client.owed.items())

    def owed_satisfied(self, client):
        for sender_id in list(client.owed):
            span = client.received.get(sender_id)
            if span is not None and span[1] >= client.owed[sender_id]:
                assert span[0] <= client.owed_lowest[sender_id], (
                    f"client {client.id} missed {sender_id}#{client.owed_lowest[sender_id]}"
                    f"..#{span[0] - 1}, sent after it was registered")
                del client.owed[sender_id]
        return not client.owed

    def say_goodbye(self, client):
        client.state = "closing"
        client.said_goodbye = time.monotonic()
        if client.kind == "raw":
            client.queue(b"exit")
            client.left_with = "exit"
        elif client.kind in ("line", "observer"):
            client.queue(b"exit\n")
            client.left_with = "exit"
        else:  # closer, silent: a plain close, the server reads EOF
            client.sock.shutdown(socket.SHUT_WR)
            client.left_with = "closed"

    def reset(self, client):
        client.left_with = "reset"
        reset_on_close(client.sock)
        self.finish(client)

    def finish(self, client):
        self.left[client.left_with] += 1
        client.state = "done"
        self.selector.unregister(client.sock)
        client.sock.close()
        del self.clients[client.id]

    def close(self):
        for client in list(self.clients.values()):
            self.finish(client)
        self.selector.close()


@pytest.mark.timeout(soak_seconds() + 60)
def test_churn_soak_loses_nothing_and_leaks_nothing(server_process):
    duration = soak_seconds()
    seed = int(os.environ.get("CHAT_FUZZ_SEED", random.randrange(2**32)))
    print(f"soak {duration}s, seed {seed}")
    server = server_process("--quiet")
    pid = server.proc.pid
    threads0, fds0, rss0 = process_usage(pid)

    soak = Soak(server.address, duration, seed, server.lines)
    try:
        soak.run()
    finally:
        soak.close()
    clients = len(soak.everyone)
    print(f"{clients} clients, {soak.frames} frames checked, {soak.checked_owed} owed deliveries "
          f"proven ({soak.silent_checked} clients that never sent among them), left: {dict(soak.left)}")
    assert clients >= 100
    assert soak.checked_owed > 1000
    assert soak.silent_checked >= 5

    # Every connection was logged and ended for the reason its client chose.
    server.wait_for_count(" closed (", clients, timeout=15)
    closed = [line for line in server.lines if " closed (" in line]
    reasons = collections.Counter(line.rsplit("(", 1)[1].rstrip(")") for line in closed)
    assert server.count("New connection from") == clients
    assert reasons["exit"] == soak.left["exit"]
    assert reasons["closed"] + reasons["error"] == soak.left["closed"] + soak.left["reset"]
    assert reasons["slow_consumer"] == 0

    # Back to the starting threads and descriptors; memory near its start.
    wait_until(lambda: process_usage(pid)[:2] == (threads0, fds0), timeout=15,
               message=f"threads/fds back to {(threads0, fds0)}, now {process_usage(pid)[:2]}")
    rss = process_usage(pid)[2]
    print(f"RSS {rss0} KiB at start, {rss} KiB after {clients} clients")
    assert rss - rss0 < RSS_SLACK_KIB

    status, lines, err = server.stop()
    assert status == 0
    assert "Traceback" not in err
