"""Helpers shared by the reliability tests (fuzz, soak, limits, shutdown,
client resilience): loopback TCP queues from /proc (a process's own CPU,
threads and memory: relayproc.py), a socket drained by a thread, and a
scripted hostile server for the client."""

import os
import re
import resource
import socket
import threading

import pytest

from conftest import LOOPBACK, hang_up, wait_until

# What must never be relayed or shown: C0 controls except TAB (and LF, which
# only ends a frame), DEL, and the C1 controls U+0080-U+009F.
FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
FRAME = re.compile(rb"(\d+): ([^\n]*)\n")


def soak_seconds(default=6.0):
    """How long the churn soak runs: CHAT_SOAK_SECONDS (quick runs use e.g. 5)."""
    return float(os.environ.get("CHAT_SOAK_SECONDS", default))


# --- loopback TCP in /proc ------------------------------------------------------------------

def tcp_queues(local_port, remote_port):
    """(send queue, receive queue) in bytes of the loopback TCP socket
    127.0.0.1:local_port -> 127.0.0.1:remote_port, from /proc/net/tcp;
    None if there is no such socket."""
    local = f"0100007F:{local_port:04X}"
    remote = f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def tcp_sockets(pid):
    """(local port, TCP state) of every TCP socket process `pid` holds, from
    /proc/PID/fd and /proc/PID/net/tcp{,6}; state "0A" is LISTEN."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
        if match:
            inodes.add(match.group(1))
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] in inodes:
                    found.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3]))
    return found


def listening_ports(pid):
    """TCP ports process `pid` is listening on, sorted."""
    return sorted(port for port, state in tcp_sockets(pid) if state == "0A")


# --- idle clients ------------------------------------------------------------------

def connect_idle(address, count):
    """`count` clients that connect and never send nor read, each with a 4 KiB
    receive buffer (thousands of them stay cheap for this process)."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address)
        socks.append(sock)
    return socks


def raise_fd_limit(needed):
    """Raise this process's descriptor limit to `needed` (skip the test if the
    hard limit is lower): thousands of clients, one descriptor each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- reading a socket from a thread ------------------------------------------------

class Drain:
    """A connected socket whose incoming bytes a thread collects (or discards),
    so that the server never sees this client as a slow consumer."""

    def __init__(self, sock, keep=True):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.keep = keep
        self.total = 0
        self._data = bytearray()
        self._lock = threading.Lock()
        self.closed = threading.Event()  # EOF or reset seen
        self._thread = threading.Thread(target=self._run, name=f"drain-{self.port}", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, address, keep=True):
        return cls(socket.create_connection(address, timeout=10), keep)

    def _run(self):
        self.sock.settimeout(None)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    self.total += len(chunk)
                    if self.keep:
                        self._data += chunk
        except OSError:
            pass
        self.closed.set()

    def data(self):
        with self._lock:
            return bytes(self._data)

    def wait(self, predicate, timeout=10.0, message="data"):
        """Wait until predicate(bytes so far) holds."""
        return wait_until(lambda: predicate(self.data()), timeout, message=f"{self.port}: {message}")

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()


def parse_frames(data, receiver_port=None):
    """Split relayed bytes into (port, text) frames, checking every frame on the
    way: "PORT: text\\n", valid UTF-8, at most one 1024-byte send, no control
    character, never the receiver's own message."""
    frames = []
    position = 0
    for match in FRAME.finditer(data):
        assert match.start() == position, f"unframed bytes {data[position:match.start()][:80]!r}"
        position = match.end()
        assert len(match.group(0)) <= 1024, f"frame of {len(match.group(0))} bytes"
        port, text = int(match.group(1)), match.group(2).decode()  # strict: must be UTF-8
        assert not FORBIDDEN.search(text), f"control character relayed: {text[:80]!r}"
        assert text.strip(), "blank message relayed"
        assert port != receiver_port, "a message was echoed to its sender"
        frames.append((port, text))
    assert position == len(data), f"trailing partial frame {data[position:][:80]!r}"
    return frames


# --- a scripted server, for the client ---------------------------------------------

class ScriptedServer:
    """A listening socket on loopback whose every accepted connection is handed
    to `script(conn)` in a thread: the hostile or broken server a client meets.
    With hold=True a script starts only once release() is called (say, once
    the client has shown that it is connected). A connection the script
    leaves open stays open until close(). A context manager."""

    def __init__(self, script, backlog=16, hold=False):
        self.script = script
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self.listener = socket.create_server((LOOPBACK, 0), backlog=backlog)
        self.address = self.listener.getsockname()
        self.connections = []
        self._threads = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn):
        self._released.wait(10)
        try:
            self.script(conn)
        except OSError:
            pass

    def release(self):
        self._released.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._released.set()  # a held script runs now, and meets closed sockets
        hang_up(self.listener)
        self._accepting.join(5)
        with self._lock:
            connections = list(self.connections)
        for conn in connections:
            hang_up(conn)
        for thread in self._threads:
            thread.join(5)
