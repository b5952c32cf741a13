#!/usr/bin/env python3
"""mychatserver.py - a multi-client TCP chat relay (CS158A, assignment 2).

Run:  python mychatserver.py [--host 127.0.0.1] [--port 12345]   (--help for all options)

What it does
    Clients connect over TCP. Whatever one client sends is relayed to every
    *other* connected client as f"{port}: {message}\\n", where port is the
    sender's remote port. A client that sends "exit" is removed from the list
    and its connection is closed. Nothing else is ever sent: no welcome, no
    join/leave notices, no echo.

Who owns what (the hub shape of gorilla/websocket's chat example)
    Each client has one reader thread while it is connected, the only caller
    of recv() on its socket; it turns bytes into messages (MessageFramer) and
    hands them to the Sender, and when the client leaves it may serve the
    next newcomer (Readers). The Sender is one thread that owns every
    client's outgoing bytes, every send() and every close(), so no two
    threads ever touch a socket's send side; it also owns the registry of
    clients, who join and leave it through its queue. ChatServer's accept
    loop admits clients, and counts them for its limits under one lock.

Reading order: framing (bytes in, messages out) -> a client's reader -> the
Sender -> the accept loop -> main. The last section, "running
thousands of threads under one GIL", holds the reader pool, the log writer
and the process settings: how the relay runs, not what it does.

Framing rules (why: ../README.md and a2/README.md; measured peer behaviour)
    * A newline (\\n or \\r\\n) ends a message; two lines in one read are two
      messages, each relayed with its own prefix.
    * Classmates' clients send raw text with no newline: until a client has
      sent its first newline, whatever it sent in one burst is one message.
    * Text is decoded as UTF-8 incrementally; invalid bytes become U+FFFD;
      terminal control characters, escape sequences, Unicode line separators
      and bidi controls are removed; empty messages are dropped; each relayed
      frame fits in one 1024-byte send.
    * "exit" (any case, surrounding whitespace ignored) on a line of its own
      removes the client; so does an unfinished line that is just "exit" when
      the client pauses (nothing more to read), the way clients send it.

Only the Python standard library is used. --metrics-port imports the
project's metrics/ package and --backbone its cluster/ package, only when given.
"""

# Ctrl-C or SIGTERM during the imports below is only noted (main() acts on
# it), so no KeyboardInterrupt traceback can escape. _signal is already loaded.
if __name__ == "__main__":
    import _signal

    _stop_signals = []  # signals received before main() installed its handler
    _signal.signal(_signal.SIGINT, lambda signum, frame: _stop_signals.append(signum))
    _signal.signal(_signal.SIGTERM, lambda signum, frame: _stop_signals.append(signum))


import _thread
import argparse
import bisect
import codecs
import collections
import errno
import ipaddress
import itertools
import logging
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

VERSION = "2.0.0"

log = logging.getLogger("mychatserver")

# --- Limits. Each one says why it has its value and what it relates to. ---

# The assignment fixes recv and send sizes: every recv(1024), every send <= 1024.
BUFSIZE = 1024

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing outside this machine can connect
DEFAULT_PORT = 12345        # the assignment's example port

# Longest prefix is "65535: " and every frame ends in "\n", so a message must
# fit in 1024 - 7 - 1 bytes for its whole frame to go out in one send().
MAX_PAYLOAD_BYTES = BUFSIZE - len("65535: ") - len("\n")

# A longer line is relayed as consecutive pieces of this many characters (then
# each piece is cut again at MAX_PAYLOAD_BYTES if its UTF-8 form is longer).
# It also bounds the unterminated text held per client. Below
# MAX_PAYLOAD_BYTES so that an ASCII piece is one frame, not one and a scrap.
MAX_MESSAGE_CHARS = 1000

# An unfinished line longer than this cannot be "exit" with its surrounding
# whitespace and controls, so it is not worth sanitising to find out.
EXIT_CANDIDATE_CHARS = 16

# Per-client outbound budget: bytes its socket refused that wait in the
# Sender for it. A client further behind than that has stopped reading
# (IRC's "SendQ exceeded") and is dropped as a slow consumer.
DEFAULT_OUTBOUND_BUDGET = 256 * 1024

# The kernel's own send buffer per client is capped too (Linux would grow it
# to 4 MiB), so that a stuck client is noticed after budget + this, not after
# megabytes, and 10,000 clients cannot pin gigabytes of kernel memory.
SOCKET_SEND_BUFFER = 64 * 1024

# Back-pressure: relays waiting for the Sender thread (one per read, so at
# most a few KiB each). A reader whose relay finds this many already waiting
# pauses until the Sender takes them (it takes all at once), at most
# FLOW_CONTROL_WAIT; then it queues
# anyway. The Sender never blocks on a socket, so the wait is bounded by its
# CPU time alone, whatever any client does. Tuned in bench/BENCHMARK.md.
SENDER_QUEUE_LIMIT = 64
FLOW_CONTROL_WAIT = 0.5  # seconds; a safety bound, a round takes milliseconds

# A round that starts from idle first waits this long per client in the room,
# at most COALESCE_MAX, and then takes the whole queue. Messages come in
# bursts (several clients answer the same line; a load driver's tick), and the
# rest of a burst reaches the queue only as each reader gets the GIL in turn:
# without the wait the first message of a burst gets a round of its own, one
# send() to every client, and the rest another. A round costs a few
# microseconds per client, so the wait is about one round's cost: it buys
# most in a large room, and adds to latency at most COALESCE_MAX. A busy
# Sender never waits: its next round takes what queued during this one.
COALESCE_PER_CLIENT = 0.00001  # seconds
COALESCE_MAX = 0.005

# A round of more than one send per client (a burst) sends for at most
# ROUND_TIME; the clients it has not reached by then get it through their
# outboxes (no send now), as the slow ones do, and the Sender's next loop
# serves writable outboxes for at most as long, round-robin. So a burst into
# thousands of empty socket buffers (a flood into a room of 2,000 that never
# read: 400,000 sends of 1 KiB) cannot hold back a newer message for the
# clients early in the room, who have caught up. A round of one send per
# client is never cut: in a room of 10,000 it takes longer than ROUND_TIME,
# and a send put off costs more than a send made (bench/BENCHMARK.md).
ROUND_TIME = 0.02  # seconds

# A slow client's outbox holds references to rounds' payloads (shared by
# every client they wait for); when it drains, they are joined up to this many
# bytes, so that the sends carry 1024 bytes each, not one round each.
OUTBOX_SEND_JOIN = 64 * 1024

# Departed clients' sockets the Sender closes per round (see _close_some).
CLOSES_PER_ROUND = 64

DEFAULT_MAX_CLIENTS = 10_000  # one process, one small thread per client

# --- Strangers: no host, client or attack may take the whole server. Anchors,
# by their own defaults: ergo (16 connections per IP, localhost exempt;
# "fakelag": burst 5, then 2 lines/s, delayed, never dropped), InspIRCd
# (localmax 3; 1 line/s past 20), UnrealIRCd (maxperip 3, connect-flood 3:60),
# Redis 7 (maxmemory-clients: one budget for all clients' buffers).

# Connections one host (an IPv4 address, an IPv6 /64) may hold: ergo's 16, so
# that a classroom behind one NAT fits; 0 = no limit.
DEFAULT_MAX_PER_HOST = 16
# New connections per second per host once its burst (the per-host limit: a
# host may open all its connections at once) is spent; 0 = no limit. Far
# looser than UnrealIRCd's 3 per minute: chat clients reconnect after a drop.
DEFAULT_MAX_CONNECT_RATE = 2.0
# Hosts with no per-host limits: this machine, so that Locust and the
# benchmark keep working. IPv4-mapped IPv6 addresses count as IPv4.
DEFAULT_EXEMPT_HOSTS = "127.0.0.0/8,::1"
IPV6_HOST_PREFIX = 64  # one IPv6 customer gets a /64: that is one host

# Flood control: a client sending more than this many messages per second,
# after a burst, is not read until its budget allows; TCP back-pressure then
# slows it down. Nothing it sent is dropped. 50/s and a burst of 100 are far
# above a human typing or pasting a screenful, and a default Locust user
# (1 message/s); 0 = off.
DEFAULT_MAX_RATE = 50.0
DEFAULT_MAX_BURST = 100
THROTTLE_CHECK = 0.1  # seconds: a throttled reader looks this often whether it was closed

# One budget for the bytes waiting in all clients' outboxes together. Past
# it, the slow consumers with the largest outboxes are dropped first, down to
# MEMORY_LOW_WATER of it: one sort frees room for several rounds, and each
# batch of dropped readers waking at once stays small (a herd costs the room).
# 256 MiB: a thousand clients at their full outbound budget.
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
MEMORY_LOW_WATER = 0.97

REFUSAL_REASONS = ("full", "per_host", "connect_rate")
LISTEN_BACKLOG = 1024         # connection bursts of thousands (load tests)
ACCEPT_BACKOFF = 0.1          # seconds to pause accepting when out of descriptors
SHUTDOWN_GRACE = 1.5          # seconds to wait for clients' readers on shutdown

# Relay latency histogram (seconds): the time from a read's arrival to its
# frames having been sent, or queued, to every recipient by the Sender.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Why a connection ended; the metrics' `reason` label takes exactly these.
DISCONNECT_REASONS = ("exit", "closed", "error", "slow_consumer", "memory_budget", "rejected",
                      "shutdown", "backbone_gap")

# The one line a client closed for these reasons receives first, so that it
# is told why (like the "Server full" notice); other closes stay silent.
CLOSE_NOTICES = {"backbone_gap": "Server: messages from the other servers were lost (backbone gap); "
                                 "reconnect to rejoin the room.\n"}

# accept() failures, by errno; the metrics' `reason` label takes exactly these.
ACCEPT_ERRORS = {errno.EMFILE: "emfile", errno.ENFILE: "enfile",
                 errno.ENOBUFS: "enobufs", errno.ENOMEM: "enomem"}
ACCEPT_ERROR_REASONS = (*ACCEPT_ERRORS.values(), "other")

# --- Framing and rate limiting: pure, no I/O ----------------------------------------------

# Escape sequences (CSI, OSC, DCS/SOS/PM/APC strings, two-character escapes)
# and then every remaining C0/C1 control except TAB, the Unicode line and
# paragraph separators U+2028/U+2029 (a receiver that splits lines
# Unicode-aware would show a forged line) and the bidi controls U+061C,
# U+200E/F, U+202A-E, U+2066-9 (they reorder what others see). What is left
# cannot move the cursor, clear, retitle or beep another user's terminal.
# ZWJ (U+200D) stays: emoji sequences need it.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"          # CSI: ESC [ params intermediates final
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: ESC ] text, ended by BEL or ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"     # DCS, SOS, PM, APC strings, ended by ST
    r"|\x1b.?",                           # any other escape
    re.DOTALL,
)
_CONTROL_CHARACTER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f"
                                "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def sanitize(text):
    """Remove terminal escape sequences and control characters (TAB stays)."""
    if text.isprintable():  # the common case: nothing to remove
        return text
    return _CONTROL_CHARACTER.sub("", _ESCAPE_SEQUENCE.sub("", text))


def _is_exit(text):
    """`exit` in any letter case, surrounding whitespace and controls ignored."""
    return sanitize(text).strip().lower() == "exit"


def split_utf8(text, limit=MAX_PAYLOAD_BYTES):
    """Cut text into pieces of at most `limit` UTF-8 bytes, between characters."""
    data = text.encode()
    pieces = []
    while len(data) > limit:
        cut = limit
        while data[cut] & 0xC0 == 0x80:  # never cut inside a character
            cut -= 1
        pieces.append(data[:cut].decode())
        data = data[cut:]
    pieces.append(data.decode())
    return pieces


def frame(port, message):
    """The bytes relayed for one message: the assignment's f"{port}: {message}"
    plus a newline, the one ending every classmate's client displays right."""
    return f"{port}: {message}\n".encode()


class MessageFramer:
    """Turns one client's byte stream into chat messages, without doing I/O.

    Feed it what recv() returned; it returns the complete messages, each
    sanitised, non-empty and short enough that its frame fits in one send.
    The caller tells it when a burst of input has ended (nothing more readable
    right now) with end_of_burst(): before a client has sent any newline it is
    a raw-text client, and its burst is a message. b"" means the peer closed.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text after the last newline
        self.line_mode = False  # becomes True at the client's first newline
        # Pieces of the current line were already relayed (it is longer than
        # MAX_MESSAGE_CHARS): what is left of it is text, never an `exit`.
        self._line_cut = False
        self.exit_requested = False
        self.closed = False

    @property
    def wants_burst_end(self):
        """True when end_of_burst() would complete something: a raw-text
        client's unterminated text, or a bare "exit" from a line client."""
        if self.line_mode:
            return (len(self._pending) < EXIT_CANDIDATE_CHARS
                    and self._is_exit_line(self._pending))
        return bool(self._pending)

    def feed(self, data):
        """Take bytes received from the client; return the finished messages."""
        if self.exit_requested or self.closed:
            return []
        if data:
            text = self._pending + self._decoder.decode(data)
        else:
            self.closed = True
            text = self._pending + self._decoder.decode(b"", final=True)
        lines = text.split("\n")
        self._pending = lines.pop()
        messages = []
        if lines:
            self.line_mode = True
            for line in lines:
                self._take_line(line, messages)
                self._line_cut = False  # the next line starts afresh
                if self.exit_requested:
                    self._pending = ""
                    return messages
        # Hold at most MAX_MESSAGE_CHARS of unterminated text. Pieces are cut at
        # the same offsets a whole line would be, so how TCP split the stream
        # never changes which messages come out.
        while len(self._pending) >= MAX_MESSAGE_CHARS:
            self._take_piece(self._pending[:MAX_MESSAGE_CHARS], messages)
            self._pending = self._pending[MAX_MESSAGE_CHARS:]
            self._line_cut = True
        if self.closed:
            messages += self._take_rest()
        return messages

    def end_of_burst(self):
        """Nothing more is readable now: a raw-text client's burst is a message.
        A client that has sent newlines keeps its unfinished line until the
        rest arrives, unless that line is a bare "exit": most classmates'
        servers take "exit" without a newline, so clients send it that way."""
        if self.exit_requested:
            return []
        if self.line_mode:
            if self._is_exit_line(self._pending):
                self._pending = ""
                self.exit_requested = True
            return []
        return self._take_rest()

    def _take_rest(self):
        messages = []
        tail, self._pending = self._pending, ""
        self._take_line(tail, messages)
        self._line_cut = False
        return messages

    def _take_line(self, line, messages):
        """One complete line: `exit`, or text cut into pieces."""
        if self._is_exit_line(line):
            self.exit_requested = True
            return
        for start in range(0, len(line), MAX_MESSAGE_CHARS):
            self._take_piece(line[start:start + MAX_MESSAGE_CHARS], messages)

    def _is_exit_line(self, line):
        """`exit` on a line of its own; never the tail of a line cut in pieces
        (a whole line that long is not `exit` either, wherever reads fell)."""
        return not self._line_cut and len(line) < MAX_MESSAGE_CHARS and _is_exit(line)

    @staticmethod
    def _take_piece(piece, messages):
        text = sanitize(piece)
        if text.strip():
            messages.extend(split_utf8(text))


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up (the classic rate
    limiter), without I/O: the caller passes the time (time.monotonic())."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, wanted, now):
        """Take up to `wanted` whole tokens; returns how many were taken."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        taken = min(wanted, int(self.tokens))
        self.tokens -= taken
        return taken

    def wait(self):
        """Seconds from the last take() until the next whole token."""
        return max(0.0, 1.0 - self.tokens) / self.rate

    def is_full(self, now):
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def send_frames(sock, data, flags=0):
    """Send `data` (whole frames, each <= 1024 bytes, or a frame's tail first) as
    sends of at most 1024 bytes, each cut after a newline so that it carries
    whole frames. Returns the bytes sent; with flags=MSG_DONTWAIT it stops
    early, returning fewer, when the socket is full."""
    view = memoryview(data)
    pos, size = 0, len(data)
    try:
        while pos < size:
            end = pos + BUFSIZE
            if end < size:  # cut after the last newline that fits
                end = data.rfind(b"\n", pos, end) + 1 or end
            pos += sock.send(view[pos:end], flags)
    except BlockingIOError:
        pass
    return pos


def cut_frames(data):
    """`data` (whole frames) as the pieces send_frames() sends when every
    send() takes all it is given: at most 1024 bytes each, cut after a newline."""
    if len(data) <= BUFSIZE:
        return [data]
    pieces = []
    pos, size = 0, len(data)
    while pos < size:
        end = pos + BUFSIZE
        if end < size:
            end = data.rfind(b"\n", pos, end) + 1 or end
        pieces.append(data[pos:end])
        pos = end
    return pieces


# --- A client's reader: the only caller of recv() on its socket ----------------------------

def _input_waiting(sock):
    """True if the socket has input (or EOF) to read right now."""
    poller = select.poll()  # poll(), not select(): no FD_SETSIZE limit at 10k clients
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


READER_COUNTERS = ("messages_received", "received_bytes", "throttle_pauses", "throttled_seconds")


class ClientConnection:
    """One connected client: its socket and its reader thread.

    The reader thread is the only caller of recv() and writes the reader's
    counters below. Everything about sending (`outbox`, `close_reason`, the
    socket's send side and its close) belongs to the Sender thread.
    """

    def __init__(self, server, sock, address, host_key=None):
        self.server = server
        self.sock = sock
        self.address = address[:2]  # (host, port), for IPv6 too
        self.host_key = host_key    # its host's per-host count (None: exempt)
        self.port = address[1]
        self.prefix = f"{self.port}: "
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        # Our sends already carry up to 1024 bytes of whole frames; Nagle's
        # algorithm would only hold small relays back for the peer's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The reader's counters (READER_COUNTERS), moved into the server's
        # totals when its socket is closed.
        self.messages_received = 0
        self.received_bytes = 0
        self.throttle_pauses = 0
        self.throttled_seconds = 0.0
        self.throttled = False  # paused by flood control right now (read by stats())
        # The Sender's: bytes this client's socket refused, waiting to be sent
        # (never more than the outbound budget), and why the Sender closed it.
        self.outbox = collections.deque()  # payloads, oldest first (bytes, memoryview)
        self.outbox_size = 0
        self.close_reason = None

    def start(self):
        """Give this client a reader thread (RuntimeError: none can be started)."""
        self.server._readers.serve(self)

    def read_until_gone(self):
        """The reader's work for this client: read, frame, relay; depart."""
        framer = MessageFramer()
        max_rate = self.server.max_rate
        bucket = TokenBucket(max_rate, self.server.max_burst, time.monotonic()) if max_rate else None
        reason = "closed"
        try:
            while True:
                data = self.sock.recv(BUFSIZE)
                if self.close_reason is not None:
                    # The Sender closed it (slow consumer, shutdown, send error).
                    # Stop reading: closing with input unread resets a client
                    # that is still sending, rather than leave it blocked in send().
                    break
                if len(data) == BUFSIZE:
                    # More is probably waiting (a flood, a paste): step off the
                    # GIL long enough that a thread waiting for it gets it,
                    # instead of taking it straight back (see HOT_READER_PAUSE).
                    time.sleep(HOT_READER_PAUSE)
                arrived = time.perf_counter()
                self.received_bytes += len(data)
                messages = framer.feed(data)
                if data and framer.wants_burst_end and not _input_waiting(self.sock):
                    messages += framer.end_of_burst()
                if messages:
                    self.messages_received += len(messages)
                    if bucket is None:
                        self.server.relay(self, messages, arrived)
                    else:
                        self._relay_paced(messages, arrived, bucket)
                if framer.exit_requested:
                    reason = "exit"
                    break
                if not data:
                    break
        except OSError as exc:
            if self.close_reason is None:
                reason = "error"
                log.warning("Connection from %s failed: %s", self.address, exc.strerror or exc)
        finally:
            self.server.depart(self, reason)

    def _relay_paced(self, messages, arrived, bucket):
        """Flood control: relay `messages` in order, no faster than the
        client's budget allows. While it waits, nothing is read from this
        client, so TCP slows the client down; nothing is dropped, unless the
        Sender closes the client meanwhile (then there is nobody to tell)."""
        while True:
            allowed = bucket.take(len(messages), time.monotonic())
            if allowed:
                self.server.relay(self, messages[:allowed], arrived)
                messages = messages[allowed:]
                if not messages:
                    return
            self.throttle_pauses += 1
            self.throttled = True
            started = time.monotonic()
            ready = started + bucket.wait()
            while self.close_reason is None:
                left = ready - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(THROTTLE_CHECK, left))
            self.throttled = False
            self.throttled_seconds += time.monotonic() - started
            if self.close_reason is not None:
                return
            arrived = time.perf_counter()  # the relay's latency starts when it may go


# --- The Sender: the only caller of send() and close() --------------------------------------

class Sender:
    """The one thread that sends: it owns every client's outbox, every send()
    and every close(), and the registry: every client whose socket is open
    (the hub of gorilla/websocket's chat, which owns its clients map).

    Producers (readers, the accept loop, the backbone) only append to its
    queue: joins, relays, departures, in the order they happened, so a newcomer
    gets exactly the messages queued after it joined and a socket is closed
    only after everything queued before its departure. Per round the Sender
    takes the whole queue, gives each client its share (the relays minus its
    own messages) and sends it in non-blocking sends of whole frames; bytes a
    socket refuses wait in that client's outbox, and only such sockets are
    watched for writability. A round that has sent for ROUND_TIME gives the
    rest of the room its share through their outboxes too. A client whose
    socket refused data and whose outbox is past the budget has stopped
    reading: it is dropped.
    """

    def __init__(self, outbound_budget, on_closed, memory_budget=DEFAULT_MEMORY_BUDGET):
        self.outbound_budget = outbound_budget  # per client
        self.memory_budget = memory_budget      # all clients' outboxes together
        self._on_closed = on_closed  # on_closed(client): called once a socket is closed
        # The queue from producers. Appending to a deque and popping from it
        # are atomic under the GIL, so producers take no lock on the common
        # path: a lock shared by thousands of readers is a convoy under the
        # GIL (see BENCHMARK.md, "Mass departure").
        # _idle: the Sender is (about to be) waiting in select(); a producer
        # that sees it set wakes it through the socketpair. Two writers, on
        # purpose: the Sender sets it, the first producer to see it clears it
        # so that the others do not write a wake-up byte too. Each store is
        # atomic under the GIL; a lost race costs one spare wake-up byte,
        # which the Sender drains. The Condition is only for readers paused
        # by back-pressure (_paused of them).
        self._queue = collections.deque()
        self._idle = False
        self._stopped = False
        self._pause_lock = threading.Lock()
        self._room_for_more = threading.Condition(self._pause_lock)
        self._paused = 0  # written under _pause_lock
        self.flow_control_pauses = 0       # these two written under _pause_lock
        self.flow_control_pause_seconds = 0.0
        self._wake_receiver, self._wake_sender = socket.socketpair()
        self._wake_receiver.setblocking(False)
        self._wake_sender.setblocking(False)
        # Owned by the Sender thread alone (no lock). The registry: every
        # client whose socket is open, in the order they joined, mapped to
        # its socket's send() while it is in the room (relayed to), to None
        # once it is leaving (dropped, or departed and its close not made
        # yet); a client leaves the registry when its departure's close is
        # made. Once the Sender has stopped, the registry keeps whoever was in
        # it, so that stats() still counts what they sent.
        # Others read it only as tuple(clients) (atomic under the GIL).
        self.clients = {}
        self.room_size = 0  # clients mapped to a send(): those relayed to
        self._to_close = collections.deque()  # ("depart", client, reason) not closed yet
        self._exiting = False  # finish(): the process's exit closes the sockets
        self.backlogged = set()  # clients with bytes in their outbox (registered in the selector)
        self.outbox_bytes = 0  # len(outbox) summed over every client (read by stats())
        self._freed_bytes = 0  # outbox bytes freed since memory was last given back
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_receiver, selectors.EVENT_READ)
        self.deliveries = 0
        self.sent_bytes = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self):
        self._thread.start()

    # --- producers (any thread) ----------------------------------------------------

    def join(self, client):
        self._put(("join", client))

    def relay(self, frames, origin, count, arrived):
        """Queue `frames` (bytes of `count` whole frames) for everyone in the
        room but `origin` (None: for everyone). Back-pressure: waits while
        SENDER_QUEUE_LIMIT relays are queued, at most FLOW_CONTROL_WAIT."""
        if len(self._queue) >= SENDER_QUEUE_LIMIT and not self._stopped:
            self._pause()
        self._put(("relay", frames, origin, count, arrived))

    def _pause(self):
        with self._pause_lock:
            started = time.monotonic()
            deadline = started + FLOW_CONTROL_WAIT
            self._paused += 1
            # The Sender empties the queue, then notifies if _paused: a reader
            # counted before that is notified; one counted after sees it empty.
            while len(self._queue) >= SENDER_QUEUE_LIMIT and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._room_for_more.wait(left)
            self._paused -= 1
            self.flow_control_pauses += 1
            self.flow_control_pause_seconds += time.monotonic() - started

    def depart(self, client, reason):
        """`client`'s reader has ended: close its socket once what was queued
        before is done."""
        self._put(("depart", client, reason))

    def close_all(self, reason):
        """Close every client in the room with `reason` (they then depart)."""
        self._put(("close_all", reason))

    def stop(self, timeout):
        """Close every socket still open and end the thread (bounded)."""
        self._put(("stop",))
        self._thread.join(timeout)

    def finish(self, timeout):
        """For a process about to exit: send every client its FIN, end the
        thread (bounded), leave the descriptors to the exit."""
        self._put(("finish",))
        self._thread.join(timeout)

    def _put(self, item):
        if self._stopped:
            return
        self._queue.append(item)
        # After the append: a Sender that set _idle before it looked at the
        # queue either sees the item or is woken here.
        if self._idle:
            self._idle = False
            try:
                self._wake_sender.send(b"x")
            except OSError:
                pass  # a wake-up byte is already waiting, or the Sender stopped

    # --- the Sender thread -------------------------------------------------------------

    def _run(self):
        try:
            while True:
                self._idle = True  # before looking at the queue: see _put()
                batch = self._take_queue()
                busy = bool(batch or self._to_close)
                if busy:
                    self._idle = False
                if batch and self._paused:
                    with self._pause_lock:
                        self._room_for_more.notify_all()
                # Sockets that refused data and now accept it; when there is no
                # work, wait here for either.
                woken = False
                deadline = None  # for serving outboxes: ROUND_TIME from the first one
                for key, _ in self._selector.select(0 if busy else None):
                    if key.data is None:
                        self._drain_wake_ups()
                        woken = True
                        continue
                    now = time.perf_counter()
                    if deadline is None:
                        deadline = now + ROUND_TIME
                    elif now > deadline:
                        continue  # still writable: the next select() reports it again
                    reason = self._send_outbox(key.data)
                    if reason is not None:
                        self._drop(key.data, reason)
                if woken and not busy:
                    # Woken from idle: let the rest of the burst queue first.
                    time.sleep(min(COALESCE_MAX, COALESCE_PER_CLIENT * self.room_size))
                if batch and not self._handle(batch):
                    return
                self._close_some()
                if self._freed_bytes >= MEMORY_RETURN_BYTES:
                    self._freed_bytes = 0
                    release_memory()
        finally:
            self._stop_everything()

    def _take_queue(self):
        batch = []
        queue_ = self._queue
        try:
            while True:
                batch.append(queue_.popleft())
        except IndexError:
            return batch

    def _drain_wake_ups(self):
        try:
            while self._wake_receiver.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _handle(self, batch):
        """Apply one round of queued items, in order. False: stop.

        A departed client leaves the room at once, but its socket is closed
        (and it leaves the registry) later, at most CLOSES_PER_ROUND a round:
        what was queued after its departure (a newcomer's first message, say)
        does not wait behind close() calls, and the descriptor cannot be
        reused while this round still runs."""
        run = []  # consecutive relays, fanned out together
        departed = self._to_close
        go_on = True
        for item in batch:
            kind = item[0]
            if kind == "relay":
                run.append(item)
                continue
            if run:
                self._fan_out(run)
                run = []
            if kind == "join":
                self.clients[item[1]] = item[1].sock.send  # what _fan_out() calls
                self.room_size += 1
            elif kind == "depart":
                self._leave_room(item[1])
                self._forget_outbox(item[1])
                departed.append(item)  # closed by _close_some(), in order
            elif kind == "close_all":
                notice = CLOSE_NOTICES.get(item[1], "").encode()
                for client in [c for c, send in self.clients.items() if send is not None]:
                    if notice and not client.outbox:  # a backlogged client's bytes are dropped with it
                        self._send(client, notice)  # after what was queued before; then the close
                    self._drop(client, item[1])
            elif kind == "finish":
                # The process is exiting: every client gets its FIN now
                # (SHUT_WR wakes no reader, so no herd of thousands competes
                # for the GIL meanwhile); exit closes the descriptors.
                for client in self.clients:
                    try:
                        client.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # already disconnected
                self._exiting = True
                go_on = False
                break
            elif kind == "stop":
                go_on = False
                break
        if run:
            self._fan_out(run)
        return go_on

    def _close_some(self):
        """Close at most CLOSES_PER_ROUND departed clients' sockets: each
        close() waits for the GIL again, and when thousands leave at once the
        relays queued meanwhile must not wait for all of them."""
        for _ in range(min(CLOSES_PER_ROUND, len(self._to_close))):
            _, client, reason = self._to_close.popleft()
            self._close(client, reason)

    def _fan_out(self, run):
        """Give every client in the room its share of a run of relays."""
        for _, _, origin, count, _ in run:  # counted before any is dropped below
            self.deliveries += (self.room_size - (self.clients.get(origin) is not None)) * count
        senders = {item[2] for item in run}
        everything = b"".join([item[1] for item in run])
        size = len(everything)
        pieces = cut_frames(everything)  # once per round, not once per client
        dontwait = socket.MSG_DONTWAIT
        whole = 0  # clients that took all of `everything` at once
        failed = []  # (client, reason): dropped after the loop, which walks the room
        deadline = time.perf_counter() + ROUND_TIME if len(pieces) > 1 else float("inf")
        countdown = 32  # clients until the next look at the clock
        late = False  # past ROUND_TIME: the rest of the room gets it through outboxes
        for client, send in self.clients.items():
            if send is None:  # leaving: dropped, or departed and not closed yet
                continue
            countdown -= 1
            if not countdown:
                countdown = 32
                late = late or time.perf_counter() > deadline
            if client in senders:  # never echo: leave out its own messages
                data = b"".join([item[1] for item in run if item[2] is not client])
                if not data:
                    continue
                reason = self._enqueue(client, data) if late else self._send(client, data)
            elif client.outbox or late:  # bytes wait for it already: these go behind them
                reason = self._enqueue(client, everything)
            else:
                # The common case, kept to the send() calls themselves: a room of
                # thousands runs this loop per round.
                sent = 0
                try:
                    for piece in pieces:
                        done = send(piece, dontwait)
                        sent += done
                        if done < len(piece):
                            break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    failed.append((client, self._send_failed(client, exc)))
                    continue
                if sent == size:
                    whole += 1
                    continue
                self.sent_bytes += sent  # its socket is full: the rest waits in its outbox
                reason = self._send(client, everything[sent:])
            if reason is not None:
                failed.append((client, reason))
        self.sent_bytes += whole * size
        now = time.perf_counter()
        for _, _, origin, count, arrived in run:
            if origin is not None:  # a local read: its relay latency
                seconds = now - arrived
                self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
                self.latency_sum += seconds * count
        for client, reason in failed:
            self._drop(client, reason)

    def _send(self, client, data):
        """Send `data` to `client` now, without blocking; what its socket
        refuses waits in its outbox. Returns None, or why to drop the client."""
        if not client.outbox:
            try:
                if len(data) <= BUFSIZE:  # one send() carries it all: the common case
                    sent = client.sock.send(data, socket.MSG_DONTWAIT)
                else:
                    sent = send_frames(client.sock, data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return self._send_failed(client, exc)
            self.sent_bytes += sent
            if sent == len(data):
                return None
            data = memoryview(data)[sent:]
        return self._enqueue(client, data)

    def _enqueue(self, client, data):
        """`data` waits in `client`'s outbox, after what waits there already,
        until its socket takes it. Returns None, or why to drop the client."""
        if client.close_reason is not None:
            return None  # being closed (evicted earlier in this fan-out)
        if not client.outbox:
            self.backlogged.add(client)
            self._selector.register(client.sock, selectors.EVENT_WRITE, client)
        # A reference, not a copy: a round's payload waits once in memory,
        # however many slow clients it waits for.
        client.outbox.append(data)
        client.outbox_size += len(data)
        self.outbox_bytes += len(data)
        reason = None
        if client.outbox_size > self.outbound_budget:
            reason = self._send_outbox(client)  # it may have read meanwhile
            if reason is None and client.outbox_size > self.outbound_budget:
                log.warning("Dropping %s: more than %d bytes waiting to be sent (slow consumer)",
                            client.address, self.outbound_budget)
                reason = "slow_consumer"
        if self.outbox_bytes > self.memory_budget:
            self._evict_largest()
        return reason

    def _evict_largest(self):
        """All outboxes together are past the memory budget: drop the slow
        consumers with the largest outboxes first, until they are under
        MEMORY_LOW_WATER of it."""
        target = self.memory_budget * MEMORY_LOW_WATER
        for client in sorted(self.backlogged, key=lambda c: c.outbox_size, reverse=True):
            if self.outbox_bytes <= target:
                break
            log.warning("Dropping %s: %d bytes waiting to be sent, the most of any client, "
                        "and all clients' together past the memory budget (%d bytes)",
                        client.address, client.outbox_size, self.memory_budget)
            self._drop(client, "memory_budget")

    def _send_outbox(self, client):
        """Send what waits for `client`, oldest first, without blocking.
        Returns None, or why to drop the client."""
        outbox = client.outbox
        while outbox:
            # Rounds' payloads joined up to OUTBOX_SEND_JOIN bytes, so that
            # many small rounds still leave in full 1024-byte sends.
            parts = [outbox.popleft()]
            size = len(parts[0])
            while outbox and size + len(outbox[0]) <= OUTBOX_SEND_JOIN:
                size += len(outbox[0])
                parts.append(outbox.popleft())
            data = b"".join(parts)
            try:
                sent = send_frames(client.sock, data, socket.MSG_DONTWAIT)
            except OSError as exc:
                return self._send_failed(client, exc)
            self.sent_bytes += sent
            client.outbox_size -= sent
            self.outbox_bytes -= sent
            if sent < size:  # the socket is full: the rest waits
                outbox.appendleft(memoryview(data)[sent:])
                return None
        self._forget_outbox(client)
        return None

    def _forget_outbox(self, client):
        if client in self.backlogged:
            self.backlogged.discard(client)
            self._selector.unregister(client.sock)
            self.outbox_bytes -= client.outbox_size
            self._freed_bytes += client.outbox_size
            client.outbox.clear()
            client.outbox_size = 0

    @staticmethod
    def _send_failed(client, exc):
        if client.close_reason is not None:
            return None  # closing it already: its socket is shut down
        log.warning("Connection from %s failed while sending: %s", client.address, exc.strerror or exc)
        return "error"

    def _leave_room(self, client):
        """Relay nothing more to `client` (it stays in the registry until its
        socket is closed). A fan-out may be walking the registry: this only
        changes a value, never its size."""
        if self.clients.get(client) is not None:
            self.clients[client] = None
            self.room_size -= 1

    def _drop(self, client, reason):
        """Stop relaying to `client` and wake its reader, which then departs."""
        self._leave_room(client)
        self._forget_outbox(client)
        if client.close_reason is None:
            client.close_reason = reason
            try:
                client.sock.shutdown(socket.SHUT_RDWR)  # recv() returns b"" at once
            except OSError:
                pass  # already disconnected

    def _close(self, client, reason):
        """The client's reader has ended: close its socket, once."""
        if client.close_reason is None:
            client.close_reason = reason
        client.sock.close()
        self.clients.pop(client, None)
        self._on_closed(client)

    def _stop_everything(self):
        """The Sender stops: nothing more is sent; close what is still open
        (unless the process is exiting). The registry stays as it is: its
        clients' reader counters still count in stats()."""
        self._stopped = True
        self._queue.clear()
        with self._pause_lock:
            self._room_for_more.notify_all()
        if not self._exiting:
            for client in self.clients:
                client.close_reason = client.close_reason or "shutdown"
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                client.sock.close()
        self.room_size = 0
        self._selector.close()
        self._wake_receiver.close()
        self._wake_sender.close()


# --- The accept loop and its counts ---------------------------------------------------------

def _listen(host, port):
    """A listening socket on host:port, IPv4 or IPv6 as the host is; "::"
    (every IPv6 address) also accepts IPv4 clients where the system can."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    dual_stack = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG,
                                dualstack_ipv6=dual_stack)


def parse_networks(text):
    """"127.0.0.0/8,::1" -> the networks, for --exempt-hosts ("" -> none)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


class ChatServer:
    """The relay: listens, admits clients (counting them for the limits),
    runs the Sender, which keeps the registry of clients.

    Binds in the constructor (so `address` is known at once, even for port 0).
    serve_forever() runs the accept loop; shutdown() may be called from any
    thread or after serve_forever() was interrupted, and ends everything.
    stats() returns exact counters for the metrics endpoint and the tests.
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, *, max_clients=DEFAULT_MAX_CLIENTS,
                 outbound_budget=DEFAULT_OUTBOUND_BUDGET, quiet=False,
                 max_per_host=DEFAULT_MAX_PER_HOST, max_connect_rate=DEFAULT_MAX_CONNECT_RATE,
                 exempt_hosts=DEFAULT_EXEMPT_HOSTS, max_rate=DEFAULT_MAX_RATE,
                 max_burst=DEFAULT_MAX_BURST, memory_budget=DEFAULT_MEMORY_BUDGET):
        self.max_clients = max_clients
        self.outbound_budget = outbound_budget
        self.quiet = quiet
        self.max_per_host = max_per_host          # 0: no limit
        self.max_connect_rate = max_connect_rate  # 0: no limit
        self.exempt_hosts = parse_networks(exempt_hosts)
        self.max_rate = max_rate                  # 0: no flood control
        self.max_burst = max_burst
        self._listener = _listen(host, port)
        self.address = self._listener.getsockname()[:2]
        # The accept loop's wake-up: stop_serving() writes, select() returns.
        self._accept_wake_receiver, self._accept_wake_sender = socket.socketpair()
        self._accept_wake_sender.setblocking(False)
        self._serve = True  # a plain flag: stop_serving() may run in a signal handler
        # The registry of clients is the Sender's (Sender.clients): a client
        # joins it through the Sender's queue, so the accept loop counts the
        # connections it admitted and the Sender has not closed yet, in all
        # and per host, for --max-clients, --max-per-host and shutdown; with
        # the departed clients' totals. One lock, held for O(1) work, except
        # by stats().
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)
        self._open = 0  # admitted connections whose sockets are not closed yet
        self._connections_total = 0
        self._totals = collections.Counter()  # departed clients' reader counters
        self._disconnects = dict.fromkeys(DISCONNECT_REASONS, 0)
        self._accept_errors = dict.fromkeys(ACCEPT_ERROR_REASONS, 0)  # written by the accept loop
        self._refusals = dict.fromkeys(REFUSAL_REASONS, 0)  # written by the accept loop
        self._per_host = collections.Counter()  # host key -> open connections (under _lock)
        self._connect_buckets = {}  # host key -> TokenBucket (the accept loop's alone)
        self._backbone = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()  # no accept loop is running yet
        self._readers = Readers()
        self._sender = Sender(outbound_budget, self._closed, memory_budget)
        self._sender.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown()

    # --- accepting -----------------------------------------------------------

    def serve_forever(self):
        """Accept clients until shutdown() is called."""
        self._stopped.clear()
        self._listener.setblocking(False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._accept_wake_receiver, selectors.EVENT_READ)
                while self._serve:
                    for key, _ in selector.select():
                        if key.fileobj is self._listener and self._serve:
                            self._accept_pending()
        finally:
            self._stopped.set()

    def _accept_pending(self):
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                reason = ACCEPT_ERRORS.get(exc.errno, "other")
                self._accept_errors[reason] += 1
                if reason != "other":
                    # Out of descriptors or memory: the pending client stays in
                    # the backlog; pause so we do not spin, then try again.
                    log.warning("Cannot accept a connection: %s; pausing %.1fs",
                                exc.strerror, ACCEPT_BACKOFF)
                    self._stopping.wait(ACCEPT_BACKOFF)
                    return
                continue  # e.g. ECONNABORTED: that client already gave up
            self._connections_total += 1
            self._admit(sock, address)

    def _admit(self, sock, address):
        address = address[:2]
        if self._open >= self.max_clients:
            log.info("New connection from %s", address)
            self._reject(sock, address, "full", f"Server full ({self.max_clients} clients). Try again later.\n")
            return
        host = self._host_key(address[0])
        if host is not None:
            if self.max_per_host and self._per_host[host] >= self.max_per_host:
                self._reject(sock, address, "per_host", "Too many connections from your address "
                             f"({self.max_per_host}). Try again later.\n")
                return
            if self.max_connect_rate and not self._may_connect(host):
                self._reject(sock, address, "connect_rate", "Connecting too often "
                             f"(more than {self.max_connect_rate:g} a second). Try again later.\n")
                return
        client = ClientConnection(self, sock, address, host)
        with self._lock:
            self._open += 1
            if host is not None:
                self._per_host[host] += 1
        self._sender.join(client)
        # Logged once it is in the room: every message relayed after this
        # line reaches it (an operator, or a test, may act on the line).
        log.info("New connection from %s", address)
        try:
            client.start()
        except RuntimeError as exc:  # "can't start new thread"
            log.warning("Cannot serve %s: %s", address, exc)
            self._sender.depart(client, "rejected")

    def _host_key(self, ip):
        """The host an address counts against: the IPv4 address, or the IPv6
        /64 (an IPv4-mapped IPv6 address is IPv4); None for an exempt host."""
        address = ipaddress.ip_address(ip.split("%")[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.exempt_hosts):
            return None
        if address.version == 4:
            return address
        return ipaddress.IPv6Network((address, IPV6_HOST_PREFIX), strict=False)

    def _may_connect(self, host):
        """Take a token from the host's connection bucket (its burst is the
        per-host limit: a host may open all its connections at once)."""
        now = time.monotonic()
        bucket = self._connect_buckets.get(host)
        if bucket is None:
            if len(self._connect_buckets) >= self.max_clients:
                # Forget the hosts whose buckets are full again: they would
                # start afresh anyway. Bounds the table whatever the storm.
                self._connect_buckets = {key: b for key, b in self._connect_buckets.items()
                                         if not b.is_full(now)}
            burst = max(self.max_per_host, self.max_connect_rate, 1)
            bucket = self._connect_buckets[host] = TokenBucket(self.max_connect_rate, burst, now)
        return bucket.take(1, now) == 1

    def _reject(self, sock, address, reason, notice):
        """Refuse a newcomer with a one-line notice. Its socket never joins the
        Sender: the accept loop owns it, and its empty send buffer takes the
        notice without waiting."""
        self._refusals[reason] += 1
        log.warning("Refusing %s: %s", address, notice.strip())
        try:
            sock.send(notice.encode(), socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        with self._lock:
            self._disconnects["rejected"] += 1

    # --- relaying ------------------------------------------------------------

    def relay(self, origin, messages, arrived):
        """Run by `origin`'s reader: log, then hand the frames to the Sender
        (which may pause this reader: back-pressure), then to the backbone."""
        if not self.quiet:  # logged first, so the transcript is in relay order
            for message in messages:
                log.info("%s%s", origin.prefix, message)
        frames = b"".join([frame(origin.port, message) for message in messages])
        self._sender.relay(frames, origin, len(messages), arrived)
        if self._backbone is not None:
            self._backbone.publish(origin.port, messages)

    def relay_remote(self, frames, message_count):
        """Frames from another node (the backbone's reader): for every local client."""
        self._sender.relay(frames, None, message_count, time.perf_counter())

    def depart(self, client, reason):
        """Run by a client's reader as it ends."""
        self._sender.depart(client, reason)

    def disconnect_all(self, reason):
        """Close every local client with `reason` (e.g. backbone_gap)."""
        log.warning("Closing all %d client(s): %s", self._open, reason)
        self._sender.close_all(reason)

    def attach_backbone(self, backbone):
        """Share the room with other nodes (see cluster/): before serve_forever()."""
        self._backbone = backbone

    # --- counts --------------------------------------------------------------

    def _closed(self, client):
        """Run by the Sender once it closed a client's socket: move its
        reader's counters into the totals. Its reader has ended (its
        departure was queued before the close), so nothing else writes them."""
        with self._lock:
            # Logged under the lock, so "Server stopped" is always the last line.
            if client.close_reason != "shutdown":
                log.info("Connection from %s closed (%s)", client.address, client.close_reason)
            self._open -= 1
            if client.host_key is not None:
                self._per_host[client.host_key] -= 1
                if not self._per_host[client.host_key]:
                    del self._per_host[client.host_key]
            for counter in READER_COUNTERS:
                self._totals[counter] += getattr(client, counter)
                setattr(client, counter, 0)  # counted once: stats() may still see it
            self._disconnects[client.close_reason] += 1
            if not self._open:
                self._all_closed.notify_all()

    @property
    def client_count(self):
        return self._open

    def stats(self):
        """A snapshot of every counter, exact once the room is quiet."""
        sender = self._sender
        backlogs = [client.outbox_size for client in tuple(sender.backlogged)]
        registry = tuple(sender.clients)
        with self._lock:
            totals = collections.Counter(self._totals)
            throttled = 0
            for client in registry:
                for counter in READER_COUNTERS:
                    totals[counter] += getattr(client, counter)
                throttled += client.throttled
            clients = self._open
            disconnects = dict(self._disconnects)
        return {
            "version": VERSION,
            "connections_total": self._connections_total,
            "clients": clients,
            "max_clients": self.max_clients,
            "messages_received_total": totals["messages_received"],
            "messages_relayed_total": sender.deliveries,
            "received_bytes_total": totals["received_bytes"],
            "sent_bytes_total": sender.sent_bytes,
            "disconnects_total": disconnects,
            "outbound_backlog_bytes": sender.outbox_bytes,
            "max_client_backlog_bytes": max(backlogs, default=0),
            "memory_budget_bytes": sender.memory_budget,
            "accept_errors_total": dict(self._accept_errors),
            "refused_connections_total": dict(self._refusals),
            "throttled_clients": throttled,
            "throttle_pauses_total": totals["throttle_pauses"],
            "throttled_seconds_total": totals["throttled_seconds"],
            "flow_control_pauses_total": sender.flow_control_pauses,
            "flow_control_pause_seconds_total": sender.flow_control_pause_seconds,
            "log_lines_dropped_total": log_lines_dropped(),
            "log_lines_summarised_total": log_lines_summarised(),
            "relay_latency_buckets": LATENCY_BUCKETS,
            "relay_latency_counts": list(sender.latency_counts),  # per bucket, last is +Inf
            "relay_latency_sum": sender.latency_sum,
            "backbone": None if self._backbone is None else self._backbone.stats(),
        }

    # --- stopping --------------------------------------------------------------

    def stop_serving(self):
        """Make serve_forever() return soon. Takes no lock, so it is safe to
        call from a signal handler that interrupted serve_forever() itself."""
        self._serve = False
        try:
            self._accept_wake_sender.send(b"x")  # wakes selector.select() at once
        except OSError:
            pass  # already woken (buffer full) or closed

    def shutdown(self, wait=True):
        """Stop accepting, close every client and wait for their readers
        (bounded). wait=False, for a process about to exit: send every client
        its FIN and return, leaving readers and descriptors to the exit."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.stop_serving()
        self._stopped.wait(SHUTDOWN_GRACE)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        if self._backbone is not None:
            self._backbone.stop()
        if wait:
            # Waiting readers end now. Not for a process about to exit: waking
            # thousands of them would only compete with the exit for the GIL.
            self._readers.close()
        with self._lock:
            count = self._open
        if count:
            log.info("Shutting down: closing %d connection(s)", count)
        if wait:
            self._sender.close_all("shutdown")
            with self._lock:
                self._all_closed.wait_for(lambda: not self._open,
                                          max(0.0, deadline - time.monotonic()))
                left = self._open
            if left:
                log.warning("%d connection(s) did not finish in %.1fs", left, SHUTDOWN_GRACE)
            self._sender.stop(SHUTDOWN_GRACE)
        else:
            self._sender.finish(SHUTDOWN_GRACE)
        self._listener.close()
        self._accept_wake_receiver.close()
        self._accept_wake_sender.close()


# --- Command line and main -------------------------------------------------------------------

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _networks(text):
    try:
        parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Multi-client TCP chat relay: relays each message to every other "
                    "client as 'PORT: message'. A client leaves by sending 'exit'.")
    parser.add_argument("--version", action="version", version=f"mychatserver {VERSION}")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help="TCP port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not print each relayed message (for load tests)")
    parser.add_argument("--max-clients", type=_positive_int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="refuse connections beyond N clients with a one-line notice "
                             "(default: %(default)s)")
    parser.add_argument("--outbound-budget", type=_positive_int, default=DEFAULT_OUTBOUND_BUDGET,
                        metavar="BYTES",
                        help="disconnect a client whose socket refused data and that has more "
                             "than BYTES waiting to be sent to it, i.e. has stopped reading "
                             "(default: %(default)s)")
    limits = parser.add_argument_group(
        "limits for strangers", "Per-host limits do not apply to --exempt-hosts; 0 turns a limit off.")
    limits.add_argument("--max-per-host", type=_non_negative_int, default=DEFAULT_MAX_PER_HOST,
                        metavar="N", help="connections one host (IPv4 address, IPv6 /64) may hold "
                                          "(default: %(default)s)")
    limits.add_argument("--max-connect-rate", type=_rate, default=DEFAULT_MAX_CONNECT_RATE,
                        metavar="R", help="new connections per second per host, after a burst of "
                                          "--max-per-host (default: %(default)s)")
    limits.add_argument("--exempt-hosts", type=_networks, default=DEFAULT_EXEMPT_HOSTS,
                        metavar="CIDR,...", help="addresses with no per-host limits; '' exempts "
                                                 "none (default: %(default)s)")
    limits.add_argument("--max-rate", type=_rate, default=DEFAULT_MAX_RATE, metavar="R",
                        help="messages per second per client; a faster client is read no faster, "
                             "nothing is dropped (default: %(default)s)")
    limits.add_argument("--max-burst", type=_positive_int, default=DEFAULT_MAX_BURST, metavar="B",
                        help="messages a client may send at once before --max-rate applies "
                             "(default: %(default)s)")
    limits.add_argument("--memory-budget", type=_positive_int, default=DEFAULT_MEMORY_BUDGET,
                        metavar="BYTES", help="bytes waiting for all clients together; past it the "
                                              "slow consumers with the most waiting are dropped "
                                              "(default: %(default)s, 256 MiB)")
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics "
                             "(needs prometheus-client; default: off)")
    parser.add_argument("--metrics-host", default=DEFAULT_HOST, metavar="HOST",
                        help="address for the metrics endpoint (default: %(default)s)")
    parser.add_argument("--backbone", default=None, metavar="URL",
                        help="share the room with other nodes over Redis Streams: "
                             "redis://HOST:PORT/DB, rediss://... (TLS) or, with Redis Sentinel, "
                             "redis+sentinel://HOST:PORT,HOST:PORT,.../MASTER[/DB]. Default: "
                             "$CHAT_BACKBONE, else off. Keep passwords out of the URL: "
                             "REDIS_PASSWORD and REDIS_USERNAME are used when it has none, "
                             "REDIS_SENTINEL_PASSWORD for the sentinels (needs the redis package; "
                             "cluster/README.md)")
    return parser.parse_args(argv)


def _project_root_on_path():
    """The optional packages (metrics/, cluster/) sit beside a2/."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def _start_metrics(server, host, port):
    """Import the project's metrics/ package only when asked to (a2/ stays stdlib-only)."""
    _project_root_on_path()
    try:
        from metrics.exporter import start_metrics_server
    except ImportError as exc:
        print(f"--metrics-port needs prometheus-client and the project's metrics/ package "
              f"({exc}): use the project's .venv (./run-tests creates it; . .venv/bin/activate)",
              file=sys.stderr)
        return None
    try:
        exporter = start_metrics_server(server, port=port, host=host)
    except OSError as exc:
        print(f"Cannot serve metrics on {host}:{port}: {_describe(exc)}", file=sys.stderr)
        return None
    _warn_if_exposed(host, "the metrics are")
    log.info("Metrics on http://%s/metrics", host_port(host, exporter.port))
    return exporter


def _backbone_url(flag):
    """(URL, where it came from): --backbone, else $CHAT_BACKBONE; (None, None)."""
    if flag is not None:
        return flag, "--backbone"
    if os.environ.get("CHAT_BACKBONE"):
        return os.environ["CHAT_BACKBONE"], "CHAT_BACKBONE"
    if os.environ.get("REDIS_URL"):
        log.warning("REDIS_URL is set but not used: this server runs alone "
                    "(--backbone URL or CHAT_BACKBONE shares its room with other nodes)")
    return None, None


def _start_backbone(server, url, source):
    """Import the project's cluster/ package only when asked to. Returns the
    exit status if it cannot start: 2 for what waiting cannot fix (a bad URL,
    credentials, a certificate), 1 without the redis package; else None."""
    _project_root_on_path()
    try:
        from cluster.backbone import start_backbone
        backbone = start_backbone(server, url, node_port=server.address[1], source=source)
    except ImportError as exc:
        print(f"--backbone needs the redis package and the project's cluster/ package "
              f"({exc}): use the project's .venv (./run-tests creates it; . .venv/bin/activate)",
              file=sys.stderr)
        return 1
    except ValueError as exc:  # cluster's BackboneConfigError: its message holds no secret
        print(f"Cannot use the backbone: {exc}", file=sys.stderr)
        return 2
    server.attach_backbone(backbone)
    return None


def _is_loopback(host):
    """True if every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _warn_if_exposed(host, what):
    """One line on stderr when `host` is not a loopback address."""
    if not _is_loopback(host):
        log.warning("Warning: listening on %s: %s reachable from other machines", host, what)


def host_port(host, port):
    """127.0.0.1:12345, or [::1]:12345 for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc):
    """An OSError as the short text a user expects, e.g. "Address already in use"
    (create_server appends "(while attempting to bind on address ...)")."""
    return (exc.strerror or str(exc)).split(" (while attempting")[0]


def main(argv=None):
    # Ctrl-C and SIGTERM ask the accept loop to return, rather than raising
    # KeyboardInterrupt at whatever line it happens to be running. Installed
    # first, and explicitly: a shell starts background jobs with SIGINT ignored.
    stop_requested = []
    server = None

    def stop(signum, frame):
        stop_requested.append(signum)
        if server is not None:
            server.stop_serving()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    stop_requested += globals().get("_stop_signals", ())  # any that came during the imports
    args = parse_args(argv)
    writer = configure_logging()
    apply_process_settings()
    try:
        server = ChatServer(args.host, args.port, max_clients=args.max_clients,
                            outbound_budget=args.outbound_budget, quiet=args.quiet,
                            max_per_host=args.max_per_host, max_connect_rate=args.max_connect_rate,
                            exempt_hosts=args.exempt_hosts, max_rate=args.max_rate,
                            max_burst=args.max_burst, memory_budget=args.memory_budget)
    except OSError as exc:
        print(f"Cannot listen on {host_port(args.host, args.port)}: {_describe(exc)}", file=sys.stderr)
        return 1
    if stop_requested:
        server.stop_serving()
    exporter = failed = None  # failed: the exit status of an optional part that cannot start
    backbone_url, source = _backbone_url(args.backbone)
    if args.metrics_port is not None:
        exporter = _start_metrics(server, args.metrics_host, args.metrics_port)
        failed = None if exporter is not None else 1
    if backbone_url is not None and failed is None:
        failed = _start_backbone(server, backbone_url, source)
    if failed is not None:
        server.shutdown()
        if exporter is not None:
            exporter.stop()
        writer.stop(LOG_DRAIN_WAIT)
        return failed
    _warn_if_exposed(server.address[0], "the chat is")
    log.info("Server listening on %s", host_port(*server.address))
    server.serve_forever()
    server.shutdown(wait=False)  # the exit closes what is left
    if exporter is not None:
        exporter.stop()
    log.info("Server stopped")
    if not writer.stop(LOG_DRAIN_WAIT):
        # The log output is stalled: exiting normally would wait for it (and
        # the interpreter cannot flush a stream a thread is blocked writing).
        os._exit(0)
    return 0


# --- Running thousands of threads under one GIL ------------------------------------------
#
# Everything above is the relay. What follows is what it takes to run it as one
# thread per client, thousands of them, in one CPython process: the pool of
# reader threads, the log writer (so that no relay waits on a terminal), and
# every process-wide setting, applied by apply_process_settings(), which main()
# and the tests' in-process servers both call. Each knob says what it pairs
# with and where it was measured (bench/BENCHMARK.md).

# A reader whose recv() came back full (1024 bytes: a flood or a paste, more
# already waiting) pauses this long before going on. Its next recv() would
# return at once and take the GIL straight back, before the Sender (woken
# when the GIL was released) could: one flooding client would then make the
# Sender wait a whole switch interval for every send. It caps one client's
# input near 10 MB/s; chat lines never fill a read. Pairs with SWITCH_INTERVAL:
# BENCHMARK.md, "One flooding client and the GIL".
HOT_READER_PAUSE = 0.0001

# The GIL's switch interval (Python's default: 5 ms). Every thread waiting for
# the GIL wakes once per interval to ask for it: when thousands of readers wake
# at once (a mass departure, shutdown) that herd starves the accept loop and
# the Sender (BENCHMARK.md, "Mass departure"). Alone it makes a busy reader
# hold the GIL longer, and a flood's latency worse: it pays only paired with
# HOT_READER_PAUSE, which hands the GIL on ("One flooding client and the GIL").
SWITCH_INTERVAL = 0.1

# A reader thread whose client has left waits this long, times 1 to 2 at
# random, for a newcomer to serve, then ends (see Readers): ending a thread
# costs far more than waking one (the kernel unmaps its stack), and when
# thousands end at once that cost falls on whoever arrives then.
READER_LINGER = 1.0

# Our threads recurse little; 10,000 of them must fit in the address space.
# Resident memory is the same either way (only touched pages count), but
# Linux's default 8 MiB stacks reserve 8 MiB per reader: under an address-space
# limit (ulimit -v, a container) far fewer clients can be served
# (BENCHMARK.md, "Thread stack size, on vs off").
THREAD_STACK_SIZE = 256 * 1024

# Log lines waiting for the log writer thread. When stdout or stderr stalls
# (Ctrl-S, a paused pager, a pipe nobody reads) further lines are dropped and
# counted, so relaying never waits on log output.
LOG_QUEUE_LINES = 10_000
LOG_DRAIN_WAIT = 1.0  # seconds to let queued lines out when stopping
LOG_BATCH_LINES = 1_000  # lines the log writer writes per flush, at most
# Log floods: of each kind of warning (refusals, resets, drops...), at most
# LOG_FLOOD_LINES lines per LOG_FLOOD_WINDOW seconds; the rest become one line
# "... and N more like it". The metrics still count every event.
LOG_FLOOD_LINES = 5
LOG_FLOOD_WINDOW = 10.0


# The C library keeps freed memory for reuse; once this much outbox memory
# has been freed (slow consumers dropped, an attack over), the Sender gives
# it back to the operating system (glibc's malloc_trim), so RSS falls back.
MEMORY_RETURN_BYTES = 16 * 1024 * 1024

_malloc_trim = None  # glibc's malloc_trim, found by apply_process_settings()


def apply_process_settings():
    """The process-wide settings the relay is measured with. Called by main()
    and by the tests' in-process servers, so both run the same relay."""
    global _malloc_trim
    threading.stack_size(THREAD_STACK_SIZE)
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        import ctypes
        _malloc_trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (ImportError, OSError, AttributeError):
        pass  # not glibc: freed memory is reused, not returned


def release_memory():
    """Give freed heap memory back to the operating system, where we can."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Readers:
    """The reader threads. One serves one client at a time, from its arrival
    to its departure; then it waits up to READER_LINGER (x 1-2) for the next
    newcomer and ends if none comes. So when thousands leave at once they do
    not also end thousands of threads at once (the newcomer who arrives then
    would wait for those exits: bench/BENCHMARK.md, "Mass departure"), and
    churn does not start a thread per connection. At rest: one thread per
    connected client.

    The accept loop hands clients out (serve); a waiting reader sits in
    `_waiting` until serve() takes it out or its wait runs out and it takes
    itself out. Single dict operations are atomic under the GIL, so whoever
    takes a reader out owns it: no lock for thousands of readers to queue on."""

    def __init__(self):
        self._waiting = {}  # _WaitingReader -> None, the newest last
        self._closed = False

    def serve(self, client):
        """Run `client`'s reads on the newest waiting reader, or on a new
        thread (RuntimeError: none can be started). _thread, not
        threading.Thread: Thread.start() waits until the new thread has run,
        which behind a herd of readers waiting for the GIL is a wait for the
        whole herd. Nothing joins a reader: the server waits for the Sender to
        close each client's socket."""
        try:
            reader = self._waiting.popitem()[0]
        except KeyError:
            _thread.start_new_thread(self._run, (client,))
            return
        reader.hand(client)

    def close(self):
        """End the waiting readers, and each busy one when its client leaves."""
        self._closed = True
        while True:
            try:
                reader = self._waiting.popitem()[0]
            except KeyError:
                return
            reader.hand(None)

    def _run(self, client):
        reader = _WaitingReader()
        while client is not None:
            client.read_until_gone()
            client = self._next_client(reader)

    def _next_client(self, reader):
        self._waiting[reader] = None
        if self._closed and self._waiting.pop(reader, False) is None:
            return None  # closed (before or while this one joined the wait)
        if reader.ready.acquire(timeout=READER_LINGER * (1 + random.random())):
            return reader.client
        if self._waiting.pop(reader, False) is None:
            return None  # nobody took it out: it ends
        reader.ready.acquire()  # serve() or close() took it out: a hand() is on its way
        return reader.client


class _WaitingReader:
    """A reader thread between clients: hand() gives it the next one (None: end)."""

    __slots__ = ("ready", "client")

    def __init__(self):
        self.ready = _thread.allocate_lock()
        self.ready.acquire()  # locked except while a client is being handed over
        self.client = None

    def hand(self, client):
        self.client = client
        self.ready.release()


# --- logging: one writer thread, never blocking the relay -----------------------------

class LogFloodGate:
    """Shows at most `lines` warnings of one kind (one format string) per
    `window` seconds from the first; counts the rest and, when the window
    ends, sums them up in one line. No I/O: the caller passes the time."""

    def __init__(self, lines=LOG_FLOOD_LINES, window=LOG_FLOOD_WINDOW):
        self.lines = lines
        self.window = window
        self.summarised = 0  # lines held back, in total
        self._kinds = {}  # kind -> [window start, lines shown, lines held back, first line]

    def admit(self, kind, text, now):
        """True: show this line. False: it is held back, for the summary."""
        state = self._kinds.get(kind)
        if state is None:
            self._kinds[kind] = [now, 1, 0, text]
            return True
        if state[1] < self.lines:
            state[1] += 1
            return True
        state[2] += 1
        self.summarised += 1
        return False

    def due(self, now):
        """The summaries of the windows that have ended (and forgets those)."""
        summaries = []
        for kind, (start, _, held, text) in list(self._kinds.items()):
            if now - start >= self.window:
                del self._kinds[kind]
                if held:
                    summaries.append(f"... and {held:,} more like \"{text}\" "
                                     f"in the last {self.window:g} s")
        return summaries

    def next_due(self, now):
        """Seconds until the next window ends (None: no window is open)."""
        if not self._kinds:
            return None
        return max(0.0, min(state[0] for state in self._kinds.values()) + self.window - now)


class LogWriter(logging.Handler):
    """The server's log handler and the one thread that writes its lines:
    program output (the assignment's lines) on stdout, problems on stderr,
    both as bare messages so the transcript matches the assignment exactly.

    emit() only queues a record, or drops and counts it when LOG_QUEUE_LINES
    wait (Handler.handle() holds the handler's lock around emit(), so the
    count is exact): a stalled terminal or pipe stalls this thread alone,
    never a relay. What is queued when the thread wakes goes out together,
    one write and one flush per stream (a thousand departures log a thousand
    lines, and each flush is a system call that hands the GIL on). Warnings
    pass its LogFloodGate, so no attack can fill a terminal or a disk."""

    def __init__(self, out, err):
        super().__init__()
        self.records = queue.Queue(LOG_QUEUE_LINES)
        self.gate = LogFloodGate()
        self.dropped = 0
        self._out, self._err = out, err
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record):
        try:
            self.records.put_nowait(record)  # as it is: formatted, and gated by record.msg, below
        except queue.Full:
            self.dropped += 1

    def _run(self):
        records, gate = self.records, self.gate
        running = True
        while running:
            batch = []
            try:
                batch.append(records.get(timeout=gate.next_due(time.monotonic())))
                while len(batch) < LOG_BATCH_LINES:
                    batch.append(records.get_nowait())
            except queue.Empty:
                pass
            if None in batch:  # stop(): nothing is queued after it
                del batch[batch.index(None):]
                running = False
            now = time.monotonic() if running else float("inf")  # stopping: every summary now
            lines = [(self._err, summary) for summary in gate.due(now)]
            for record in batch:
                if record.levelno < logging.WARNING:
                    lines.append((self._out, self.format(record)))
                elif gate.admit(record.msg, record.getMessage(), now):
                    lines.append((self._err, self.format(record)))
            # In the order logged, even where stdout and stderr are one file.
            for stream, group in itertools.groupby(lines, key=lambda line: line[0]):
                try:
                    stream.write("".join(text + "\n" for _, text in group))
                    stream.flush()
                except (OSError, ValueError):
                    pass  # the stream is closed (a pipe nobody reads any more)

    def stop(self, timeout):
        """Let queued lines out, at most `timeout` seconds. False: output is stalled."""
        try:
            self.records.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


_log_writer = None  # the installed LogWriter, see configure_logging()


def log_lines_dropped():
    return 0 if _log_writer is None else _log_writer.dropped


def log_lines_summarised():
    return 0 if _log_writer is None else _log_writer.gate.summarised


def configure_logging():
    """Send the server's log lines to a LogWriter on stdout and stderr; returns it."""
    global _log_writer
    # Our lines are bare messages: no LogRecord needs the thread's name (and
    # asking threading for it from a reader, a _thread thread, would invent
    # a dummy Thread object for it).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _log_writer = LogWriter(sys.stdout, sys.stderr)
    log.handlers[:] = [_log_writer]
    log.setLevel(logging.INFO)
    log.propagate = False
    return _log_writer


if __name__ == "__main__":
    sys.exit(main())
