#!/usr/bin/env python3
"""mychatserver.py - a multi-client TCP chat relay (CS158A, assignment 2).

Run:  python mychatserver.py [--host 127.0.0.1] [--port 12345]   (--help for all options)

What it does
    Clients connect over TCP. Whatever one client sends is relayed to every
    *other* connected client as f"{port}: {message}\\n", where port is the
    sender's remote port. A client that sends "exit" is removed from the list
    and its connection is closed. Nothing else is ever sent: no welcome, no
    join/leave notices, no echo.

How it is built (the "hub" shape of gorilla/websocket's chat example)
    * ChatServer owns the registry of connected clients and the accept loop.
    * Each ClientConnection has exactly two threads: a reader, the only thread
      that calls recv() on its socket, and a writer, which sends for it only
      when its socket is full.
    * Relaying a message formats it once and appends it, once, to the room's
      pending relays; that never blocks. One reader at a time is the
      flusher: it gives every client its share of everything pending in
      non-blocking send() calls of at most 1024 bytes of whole frames (so a
      busy room costs one send per 1024 bytes, not one thread wake-up per
      message). A client whose socket is full gets its own writer thread to
      wait for it; one that stops reading fills only its own queue and is
      disconnected once the queue exceeds its byte budget (IRC's "SendQ
      exceeded"), so one stuck client can never stall the room.
    * MessageFramer turns the bytes a client sends into messages. It does no
      I/O at all (like h11), so its rules are unit-tested without sockets.

Framing rules (why: ../README.md and a2/README.md; measured peer behaviour)
    * A newline (\\n or \\r\\n) ends a message; two lines in one read are two
      messages, each relayed with its own prefix.
    * Classmates' clients send raw text with no newline: until a client has
      sent its first newline, whatever it sent in one burst is one message.
    * Text is decoded as UTF-8 incrementally; invalid bytes become U+FFFD;
      terminal control characters and escape sequences are removed; empty
      messages are dropped; each relayed frame fits in one 1024-byte send.
    * "exit" (any case, surrounding whitespace ignored) on a line of its own
      removes the client.

Only the Python standard library is used. The optional --metrics-port flag is
the one door to the project's metrics/ package (which needs prometheus-client);
without it nothing else is imported.
"""

import argparse
import bisect
import codecs
import collections
import errno
import itertools
import logging
import operator
import queue
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("mychatserver")

# STUB (metrics branch, until "Relay core v2" lands on main): the contract's VERSION.
VERSION = "2.0.0"

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

# Per-client outbound budget: bytes queued for a client but not yet accepted
# by its socket. 256 KiB is ~8,000 typical relays, many seconds of a busy
# room; a client further behind than that has stopped reading ("SendQ").
DEFAULT_OUTBOUND_BUDGET = 256 * 1024

# Flow control. More than budget/4 bytes of relays waiting for the flusher,
# or queued for one client, is "backlogged". Relays waiting for the flusher,
# or a client whose socket still accepts data, mean only that a thread is
# short of CPU time (a flooding sender's reader can outrun the flusher or a
# writer under the GIL): the sender then pauses (flushing itself if no one
# else is), up to FLOW_CONTROL_WAIT, which slows the flood to what the room
# can take. A client whose socket is full is not reading: nobody waits for it.
HIGH_WATER_FRACTION = 4
FLOW_CONTROL_WAIT = 1.0    # seconds; a safety bound, draining takes milliseconds
FLOW_CONTROL_POLL = 0.005  # seconds between checks that the client still reads

# The kernel's own send buffer per client is capped too (Linux would grow it
# to 4 MiB), so that a stuck client is noticed after budget + this, not after
# megabytes, and 10,000 clients cannot pin gigabytes of kernel memory.
SOCKET_SEND_BUFFER = 64 * 1024

DEFAULT_MAX_CLIENTS = 10_000  # one process with two small threads per client
LISTEN_BACKLOG = 1024         # connection bursts of thousands (load tests)
ACCEPT_BACKOFF = 0.1          # seconds to pause accepting when out of descriptors
SHUTDOWN_GRACE = 1.5          # seconds to wait for client threads on shutdown
SHUTDOWN_SWITCH_INTERVAL = 0.0001  # seconds; GIL switch interval while closing clients
THREAD_STACK_SIZE = 256 * 1024  # our threads recurse little; thousands must fit

# Relay latency histogram (seconds): the time from a read's arrival to its
# frames being queued for every recipient. Relaying is micro- to milliseconds.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Why a connection ended; the metrics' `reason` label takes exactly these.
DISCONNECT_REASONS = ("exit", "closed", "error", "slow_consumer", "rejected", "shutdown",
                      "backbone_gap")  # STUB (metrics branch): the contract's new reason

# Escape sequences (CSI, OSC, DCS/SOS/PM/APC strings, two-character escapes)
# and then every remaining C0/C1 control except TAB: what is left cannot move
# the cursor, clear, retitle or beep another user's terminal.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"          # CSI: ESC [ params intermediates final
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: ESC ] text, ended by BEL or ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"     # DCS, SOS, PM, APC strings, ended by ST
    r"|\x1b.?",                           # any other escape
    re.DOTALL,
)
_CONTROL_CHARACTER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


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
    def has_pending(self):
        """True when unterminated text is waiting for a newline or a burst end."""
        return bool(self._pending)

    @property
    def wants_burst_end(self):
        """True when end_of_burst() would complete something: a raw-text
        client's unterminated text, or a bare "exit" from a line client."""
        if self.line_mode:
            return len(self._pending) < 16 and self._is_exit_line(self._pending)
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
            messages += self._flush()
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
        return self._flush()

    def _flush(self):
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


def _ready_now(sock, writable=False):
    """True if the socket has input (or EOF) waiting, or with writable=True
    room to send, without blocking."""
    if hasattr(select, "poll"):  # poll() has no FD_SETSIZE limit (10k clients)
        poller = select.poll()
        poller.register(sock, select.POLLOUT if writable else select.POLLIN)
        return bool(poller.poll(0))
    ready = select.select([], [sock], [], 0)[1] if writable else select.select([sock], [], [], 0)[0]
    return bool(ready)


# What deliver() did with a client's share of a round of relays.
QUEUED, BACKLOGGED, OVER_BUDGET, CLOSED = range(4)

# Who sends a client's frames right now (ClientConnection._state), read and
# changed only under the client's lock: exactly one thread owns the socket's
# send side while the state is FLUSHING or WRITER, so sends never interleave.
IDLE = "idle"          # nothing queued for this client
FLUSHING = "flushing"  # the server's flusher is sending to it, non-blocking
WRITER = "writer"      # its socket was full: its own writer thread sends (blocking)


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


class ClientConnection:
    """One connected client: its socket, bounded outbound queue, and two threads.

    The reader thread is the only one that calls recv() on the socket. Sending
    is done by one thread at a time, the one that owns the send side (see
    IDLE/FLUSHING/WRITER): normally the server's flusher, which sends every
    client its share of the relays back to back without blocking (deliver());
    when this client's socket is full, its own writer thread takes over and
    blocks in send() for it alone. Other threads touch a client only through
    deliver() and close(), which never block on the network.
    """

    def __init__(self, server, sock, address):
        self.server = server
        self.sock = sock
        self.address = address
        self.port = address[1]
        self.prefix = f"{self.port}: "
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        # Our sends already carry up to 1024 bytes of whole frames; Nagle's algorithm
        # would only hold small relays back for the peer's delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._budget = server.outbound_budget
        self._high_water = server.outbound_budget // HIGH_WATER_FRACTION
        self._drained = threading.Event()  # a hint for flow control, see wait_while_backlogged
        self._drained.set()
        # Frames accepted for this client but not yet sent: whole frames (after
        # a partial send, the rest of one first). Guarded by _lock, like
        # _queued_bytes, _state and close_reason.
        self._outbox = collections.deque()
        self._state = IDLE
        self._wakeup = queue.SimpleQueue()  # to the writer: "the socket is yours" / None = stop
        self.registered = False  # relayed to (ChatServer._clients); set by the server
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self.close_reason = None
        # Counters, each written by one thread at a time (so no increment is lost):
        # received_bytes, messages_received and the latency ones by the reader,
        # deliveries by the reader relaying, sent_bytes by the send side's
        # owner. The server folds them into its totals when the connection ends.
        self.messages_received = 0
        self.received_bytes = 0
        self.deliveries = 0  # messages from this client queued for recipients
        self.sent_bytes = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._reader = threading.Thread(target=self._read_loop, name=f"reader-{self.port}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"writer-{self.port}", daemon=True)

    @property
    def queued_bytes(self):
        return self._queued_bytes

    def start(self):
        self._writer.start()
        self._reader.start()

    def join(self, timeout):
        self._reader.join(timeout)

    def is_alive(self):
        return self._reader.is_alive()

    def deliver(self, data):
        """Run by the server's flusher (one thread at a time): send `data`, this
        client's share of a round of relays, without blocking. If the socket
        is full, or the writer thread already owns it, queue the rest for the
        writer. Returns QUEUED, BACKLOGGED (queued, and over the high-water
        mark), CLOSED (the client is leaving; nothing queued) or OVER_BUDGET
        (nothing queued; the caller drops the client as a slow consumer)."""
        size = len(data)
        with self._lock:
            if self.close_reason is not None:
                return CLOSED
            queued = self._queued_bytes + size
            if queued > self._budget:
                return OVER_BUDGET
            self._queued_bytes = queued
            self._outbox.append(data)
            flushing = self._state is IDLE  # else the writer owns the socket: queue behind it
            if flushing:
                self._state = FLUSHING
        if flushing:
            self._send_queued(socket.MSG_DONTWAIT)
        if self._queued_bytes >= self._high_water:
            self._drained.clear()
            return BACKLOGGED
        return QUEUED

    def _send_queued(self, flags):
        """Send until the queue is empty (state -> IDLE), the client closes, or,
        with MSG_DONTWAIT, the socket is full (state -> WRITER: the writer
        thread continues with blocking sends). Only the send side's owner
        calls this, so sends to one socket never interleave; no lock is held
        across a send()."""
        while True:
            with self._lock:
                if not self._outbox or self.close_reason is not None:
                    self._state = IDLE
                    return
                data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
                self._outbox.clear()
            try:
                sent = send_frames(self.sock, data, flags)
            except OSError as exc:
                with self._lock:
                    self._state = IDLE
                if self.close_reason is None:
                    log.warning("Connection from %s failed while sending: %s", self.address, exc.strerror or exc)
                    self.close("error")
                return
            with self._lock:
                self._queued_bytes -= sent
                drained = self._queued_bytes < self._high_water
                if sent < len(data):  # the socket is full: the writer takes over
                    self._outbox.appendleft(data[sent:])
                    self._state = WRITER
            self.sent_bytes += sent
            if drained and not self._drained.is_set():
                self._drained.set()
            if sent < len(data):
                self._wakeup.put(True)
                return

    def wait_while_backlogged(self):
        """Flow control, run by a sender's reader thread after relaying: while
        this client is backlogged but still reading, pause the sender (bounded).
        Never waits for a client whose socket is full: it is not reading."""
        deadline = time.monotonic() + FLOW_CONTROL_WAIT
        while self._queued_bytes >= self._high_water and self.close_reason is None:
            try:
                if time.monotonic() >= deadline or not _ready_now(self.sock, writable=True):
                    return
            except (OSError, ValueError):  # closed meanwhile
                return
            self._drained.wait(FLOW_CONTROL_POLL)

    def close(self, reason):
        """Start closing (idempotent; any thread). shutdown() wakes both this
        client's threads: a blocked recv() returns b"", a blocked send raises."""
        with self._lock:
            if self.close_reason is not None:
                return
            self.close_reason = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected
        self._wakeup.put(None)
        self._drained.set()  # release any sender waiting on this client

    def _read_loop(self):
        framer = MessageFramer()
        reason = "closed"
        server = self.server
        try:
            while True:
                data = self.sock.recv(BUFSIZE)
                if self.close_reason is not None:
                    # We closed it (slow consumer, shutdown, send error). Stop
                    # reading: closing with input unread resets a client that
                    # is still sending, rather than leave it blocked in send().
                    break
                arrived = time.perf_counter()
                self.received_bytes += len(data)
                messages = framer.feed(data)
                if data and framer.wants_burst_end and not _ready_now(self.sock):
                    messages += framer.end_of_burst()
                if messages:
                    server.relay(self, messages)
                    self._observe(len(messages), time.perf_counter() - arrived)
                    server.flush(self)
                    server.wait_while_backlogged()
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
            server._unregister(self)
            self.close(reason)
            self._writer.join()
            # A flusher may be in its last non-blocking send to this socket (it
            # sees close_reason before the next one): let it finish, so that the
            # descriptor is not closed, and perhaps reused, under it.
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while self._state is FLUSHING and time.monotonic() < deadline:
                time.sleep(0.001)
            self.sock.close()
            server._finished(self)

    def _observe(self, count, seconds):
        self.messages_received += count
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.latency_sum += seconds * count

    def _write_loop(self):
        """Idle until a flusher finds this client's socket full; then send with
        blocking calls (this thread alone waits for this client) until the
        queue is empty, and hand the client back to the flushers."""
        while self._wakeup.get() is not None:
            self._send_queued(0)


class ChatServer:
    """The relay: listens, keeps the registry of clients, fans messages out.

    Binds in the constructor (so `address` is known at once, even for port 0).
    serve_forever() runs the accept loop; shutdown() may be called from any
    thread or after serve_forever() was interrupted, and ends everything.
    stats() returns exact counters for the metrics endpoint and the tests.
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, *, max_clients=DEFAULT_MAX_CLIENTS,
                 outbound_budget=DEFAULT_OUTBOUND_BUDGET, quiet=False):
        self.max_clients = max_clients
        self.outbound_budget = outbound_budget
        self.quiet = quiet
        self._listener = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        self.address = self._listener.getsockname()[:2]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._serve = True  # a plain flag: stop_serving() may run in a signal handler
        self._lock = threading.Lock()  # guards the registry and the totals below
        # Relay targets. Replaced (never mutated) under the lock, so relay()
        # iterates a consistent snapshot without holding any lock.
        self._clients = ()
        self._connections = set()  # every connection whose threads still run
        # Relays not yet sent (see relay() and flush()): the frames, their
        # sender, the clients registered then. Guarded by _pending_lock.
        self._pending_lock = threading.Lock()
        self._pending = []
        self._pending_origins = []
        self._pending_rooms = []
        self._pending_bytes = 0
        self._high_water = outbound_budget // HIGH_WATER_FRACTION
        self._flushing = threading.Lock()  # held by the one thread flushing (see flush())
        self._backlogged = ()  # clients over the high-water mark after the last round
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()  # no accept loop is running yet
        self._connections_total = 0
        self._totals = collections.Counter()  # departed connections' counters, see _add_counters
        self._disconnects = dict.fromkeys(DISCONNECT_REASONS, 0)

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
                selector.register(self._wake_reader, selectors.EVENT_READ)
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
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the pending client stays in the
                    # backlog; pause so we do not spin, then try again.
                    log.warning("Cannot accept a connection: %s; pausing %.1fs",
                                exc.strerror, ACCEPT_BACKOFF)
                    self._stopping.wait(ACCEPT_BACKOFF)
                    return
                continue  # e.g. ECONNABORTED: that client already gave up
            self._connections_total += 1
            self._admit(sock, address)

    def _admit(self, sock, address):
        if len(self._clients) >= self.max_clients:
            log.info("New connection from %s", address)
            self._reject(sock, address, f"Server full ({self.max_clients} clients). Try again later.\n")
            return
        connection = ClientConnection(self, sock, address)
        with self._lock:
            self._clients += (connection,)
            self._connections.add(connection)
            connection.registered = True
        # Logged once it is in the room: every message relayed after this
        # line reaches it (an operator, or a test, may act on the line).
        log.info("New connection from %s", address)
        try:
            connection.start()
        except RuntimeError as exc:  # "can't start new thread"
            log.warning("Cannot serve %s: %s", address, exc)
            connection.close("rejected")
            self._unregister(connection)
            sock.close()
            self._finished(connection)

    def _reject(self, sock, address, notice):
        log.warning("Refusing %s: %s", address, notice.strip())
        try:
            sock.settimeout(1.0)
            sock.sendall(notice.encode())
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        with self._lock:
            self._disconnects["rejected"] += 1

    # --- relaying ------------------------------------------------------------

    def relay(self, origin, messages):
        """Queue `messages` from `origin` for every other client. Never blocks and
        costs the same for 2 clients or 10,000: the frames are formatted once
        into one blob, appended once to the room's pending list together with
        the clients it is for, and sent by the flusher (see flush())."""
        if not self.quiet:  # logged first, so the transcript is in relay order
            for message in messages:
                log.info("%s%s", origin.prefix, message)
        blob = b"".join([frame(origin.port, message) for message in messages])
        with self._pending_lock:
            room = self._clients  # the recipients: clients registered now
            self._pending.append(blob)
            self._pending_origins.append(origin)
            self._pending_rooms.append(room)
            self._pending_bytes += len(blob)
        origin.deliveries += (len(room) - origin.registered) * len(messages)

    def flush(self, caller=None):
        """Send what relay() queued; run by reader threads after relaying.

        One thread at a time is the flusher. It takes everything pending (a
        "round": all the relays since the last round) and gives each client
        its share, the round's frames minus its own messages, joined into one
        buffer and sent as back-to-back sends of up to 1024 bytes, never
        blocking (a client whose socket is full is handed to its own writer
        thread). Every other reader just appends and goes back to recv().

        Why this shape (measured in loadtest/BENCHMARK.md): under the GIL, the
        costs that grow with load were the per-recipient steps, a queue put
        and a writer thread's wake-up and send for every relay. Here the work
        per recipient is per round, not per relay: the busier the room, the
        more relays a round carries and the fuller each 1024-byte send.

        The flusher works one round at a time; after each it goes back to its
        own client if that client has input waiting (it flushes again after
        relaying it). Work appended while the flusher lock was held is never
        stranded: the holder re-checks after releasing it."""
        while self._pending and not self._stopping.is_set():
            if not self._flushing.acquire(blocking=False):
                return  # the current flusher will send ours too
            try:
                self._flush_round()
            finally:
                self._flushing.release()
            if self._pending and caller is not None and _ready_now(caller.sock):
                return

    def _flush_round(self):
        with self._pending_lock:
            blobs, origins, rooms = self._pending, self._pending_origins, self._pending_rooms
            self._pending, self._pending_origins, self._pending_rooms = [], [], []
            self._pending_bytes = 0
        slow = []
        backlogged = []
        start = 0
        while start < len(blobs):
            # A run of relays made to the same registry snapshot (it changes only
            # when someone joins or leaves): a newcomer gets only later messages.
            room = rooms[start]
            end = start + 1
            while end < len(rooms) and rooms[end] is room:
                end += 1
            run, senders = blobs[start:end], origins[start:end]
            everything = b"".join(run)
            for client in room:
                if self._stopping.is_set():
                    return  # shutting down: the frames go nowhere, and the GIL to shutdown()
                if client in senders:  # never echo: leave out its own messages
                    data = b"".join(itertools.compress(run, map(operator.is_not, senders,
                                                                itertools.repeat(client))))
                    if not data:
                        continue
                else:
                    data = everything
                status = client.deliver(data)
                if status == BACKLOGGED:
                    backlogged.append(client)
                elif status == OVER_BUDGET:
                    slow.append(client)
            start = end
        self._backlogged = tuple(backlogged)
        for client in slow:
            log.warning("Dropping %s: more than %d bytes waiting to be sent (slow consumer)",
                        client.address, self.outbound_budget)
            self._unregister(client)
            client.close("slow_consumer")

    def wait_while_backlogged(self):
        """Flow control, run by a sender's reader thread after relaying. The room
        is backlogged when relays wait to be flushed beyond the high-water mark
        (a flooding sender's reader outran the flusher under the GIL): the
        sender then flushes itself (or waits for the flusher), bounded. And
        while a client is backlogged but its socket still accepts data, its
        writer thread is just short of CPU time: the sender pauses for it
        (ClientConnection.wait_while_backlogged) - but never for a client
        whose socket is full: it is not reading."""
        if self._pending_bytes >= self._high_water:
            deadline = time.monotonic() + FLOW_CONTROL_WAIT
            while (self._pending_bytes >= self._high_water and time.monotonic() < deadline
                   and not self._stopping.is_set()):
                self.flush()
                if self._pending_bytes >= self._high_water:
                    time.sleep(FLOW_CONTROL_POLL)
        for client in self._backlogged:
            client.wait_while_backlogged()

    # --- registry --------------------------------------------------------------

    def _unregister(self, connection):
        """Stop relaying to `connection` (idempotent)."""
        with self._lock:
            if connection in self._clients:
                self._clients = tuple(c for c in self._clients if c is not connection)
            connection.registered = False

    def _finished(self, connection):
        """Called once a connection's threads are done: fold its counters in."""
        with self._lock:
            # Logged under the lock: shutdown() either sees this connection
            # (and waits for this thread) or finds the line already written,
            # so "Server stopped" is always the last line.
            if connection.close_reason != "shutdown":
                log.info("Connection from %s closed (%s)", connection.address, connection.close_reason)
            self._connections.discard(connection)
            self._add_counters(self._totals, connection)
            self._disconnects[connection.close_reason] += 1

    @staticmethod
    def _add_counters(counter, connection):
        counter["messages_received"] += connection.messages_received
        counter["messages_relayed"] += connection.deliveries
        counter["received_bytes"] += connection.received_bytes
        counter["sent_bytes"] += connection.sent_bytes
        for bucket, count in enumerate(connection.latency_counts):
            counter["latency", bucket] += count
        counter["latency_sum"] += connection.latency_sum

    @property
    def client_count(self):
        return len(self._clients)

    def stats(self):
        """A snapshot of every counter, exact: live connections plus departed ones."""
        with self._lock:
            counters = collections.Counter(self._totals)
            backlog = 0
            largest = 0
            for connection in self._connections:
                self._add_counters(counters, connection)
                queued = connection.queued_bytes
                backlog += queued
                largest = max(largest, queued)
            return {
                "connections_total": self._connections_total,
                "clients": len(self._clients),
                "max_clients": self.max_clients,
                "messages_received_total": counters["messages_received"],
                "messages_relayed_total": counters["messages_relayed"],
                "received_bytes_total": counters["received_bytes"],
                "sent_bytes_total": counters["sent_bytes"],
                "disconnects_total": dict(self._disconnects),
                "outbound_backlog_bytes": backlog,
                "relay_latency_buckets": LATENCY_BUCKETS,
                "relay_latency_counts": [counters["latency", bucket]  # per bucket, last is +Inf
                                         for bucket in range(len(LATENCY_BUCKETS) + 1)],
                "relay_latency_sum": float(counters["latency_sum"]),
                # STUB (metrics branch, until "Relay core v2" lands): the
                # contract's new keys; zeros except the largest backlog.
                "version": VERSION,
                "max_client_backlog_bytes": largest,
                "accept_errors_total": dict.fromkeys(("emfile", "enfile", "enobufs", "enomem", "other"), 0),
                "flow_control_pauses_total": 0,
                "flow_control_pause_seconds_total": 0.0,
                "log_lines_dropped_total": 0,
                "backbone": None,
            }

    # --- stopping --------------------------------------------------------------

    def stop_serving(self):
        """Make serve_forever() return soon. Takes no lock, so it is safe to
        call from a signal handler that interrupted serve_forever() itself."""
        self._serve = False
        try:
            self._wake_writer.send(b"x")  # wakes selector.select() at once
        except OSError:
            pass  # already woken (buffer full) or closed

    def shutdown(self):
        """Stop accepting, close every client, wait for their threads (bounded)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.stop_serving()
        self._stopped.wait(SHUTDOWN_GRACE)
        with self._lock:
            connections = list(self._connections)
        if connections:
            log.info("Shutting down: closing %d connection(s)", len(connections))
        # Each close() releases the GIL (shutdown() is a system call), and a
        # reader still busy with a flood takes it back at once: this thread
        # would wait out the whole 5 ms switch interval per client (1.6 s for
        # 325 clients, measured). A short interval while closing lets it
        # through in ~0.1 ms each; restored right after.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SHUTDOWN_SWITCH_INTERVAL)
        try:
            for connection in connections:
                connection.close("shutdown")
        finally:
            sys.setswitchinterval(switch_interval)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for connection in connections:
            connection.join(max(0.0, deadline - time.monotonic()))
        left = sum(1 for c in connections if c.is_alive())
        if left:
            log.warning("%d connection(s) did not finish in %.1fs", left, SHUTDOWN_GRACE)
        self._listener.close()
        self._wake_reader.close()
        self._wake_writer.close()


# --- command line ------------------------------------------------------------------

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Multi-client TCP chat relay: relays each message to every other "
                    "client as 'PORT: message'. A client leaves by sending 'exit'.")
    parser.add_argument("--version", action="version", version=f"mychatserver {VERSION}")  # STUB
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
                        help="disconnect a client that has more than BYTES waiting to be sent "
                             "to it, i.e. has stopped reading (default: %(default)s)")
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics "
                             "(needs prometheus-client; default: off)")
    parser.add_argument("--metrics-host", default=DEFAULT_HOST, metavar="HOST",
                        help="address for the metrics endpoint (default: %(default)s)")
    return parser.parse_args(argv)


def configure_logging():
    """Program output (the assignment's lines) on stdout, problems on stderr,
    both as bare messages so the transcript matches the assignment exactly."""
    formatter = logging.Formatter("%(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(formatter)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter)
    err.setLevel(logging.WARNING)
    log.handlers[:] = [out, err]
    log.setLevel(logging.INFO)
    log.propagate = False


def _start_metrics(server, host, port):
    """Import the project's metrics/ package only when asked to (a2/ stays stdlib-only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from metrics.exporter import start_metrics_server
    except ImportError as exc:
        print(f"--metrics-port needs prometheus-client and the project's metrics/ package "
              f"({exc}): pip install -r requirements.txt", file=sys.stderr)
        return None
    try:
        exporter = start_metrics_server(server, port=port, host=host)
    except OSError as exc:
        print(f"Cannot serve metrics on {host}:{port}: {_describe(exc)}", file=sys.stderr)
        return None
    log.info("Metrics on http://%s:%d/metrics", host, exporter.port)
    return exporter


def _describe(exc):
    """An OSError as the short text a user expects, e.g. "Address already in use"
    (create_server appends "(while attempting to bind on address ...)")."""
    return (exc.strerror or str(exc)).split(" (while attempting")[0]


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    threading.stack_size(THREAD_STACK_SIZE)
    try:
        server = ChatServer(args.host, args.port, max_clients=args.max_clients,
                            outbound_budget=args.outbound_budget, quiet=args.quiet)
    except OSError as exc:
        print(f"Cannot listen on {args.host}:{args.port}: {_describe(exc)}", file=sys.stderr)
        return 1
    exporter = None
    if args.metrics_port is not None:
        exporter = _start_metrics(server, args.metrics_host, args.metrics_port)
        if exporter is None:
            server.shutdown()
            return 1
    # Ctrl-C and SIGTERM ask the accept loop to return, rather than raising
    # KeyboardInterrupt at whatever line it happens to be running. Installed
    # explicitly: a shell starts background jobs with SIGINT ignored.
    def stop(signum, frame):
        server.stop_serving()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("Server listening on %s:%d", *server.address)
    server.serve_forever()
    server.shutdown()
    if exporter is not None:
        exporter.stop()
    log.info("Server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
