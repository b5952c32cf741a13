"""Shared test helpers: a real server on a free loopback port, raw TCP peers,
and waiting on conditions with deadlines (never sleeping to synchronise)."""

import contextlib
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from a2.mychatserver import ChatServer, apply_process_settings
from relayproc import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "a2" / "mychatserver.py"
CLIENT_SCRIPT = ROOT / "a2" / "mychatclient.py"
LOOPBACK = "127.0.0.1"


def wait_until(predicate, timeout=5.0, message="condition", interval=0.002):
    """Poll `predicate` until it is true; fail the test after `timeout` seconds.
    `message` says what was awaited: a string, or a function that says it at
    the time of failure. `interval` only spaces the polls (a costly predicate,
    such as a browser read, takes a longer one)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # a poll interval, not a synchronisation point


def reset_on_close(sock):
    """Make sock.close() send an RST instead of a FIN: a client that vanishes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset(sock):
    """Close with an RST instead of a FIN."""
    reset_on_close(sock)
    sock.close()


def hang_up(sock):
    """Close with a FIN, first waking any thread blocked in accept(), recv()
    or send() on the socket (close() alone would not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected, or the peer is gone already
    sock.close()


@contextlib.contextmanager
def running_server(**kwargs):
    """A real ChatServer on 127.0.0.1:<free port>, serving from a thread,
    with the process settings the program runs with."""
    apply_process_settings()
    kwargs.setdefault("quiet", True)
    server = ChatServer(LOOPBACK, 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="test-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)
        assert not thread.is_alive(), "server accept loop did not stop"


@pytest.fixture
def server():
    with running_server() as server:
        yield server


class Peer:
    """A raw TCP chat client, the way classmates write them: it sends bytes as
    given and reads whatever arrives. Reads have deadlines, so no test hangs."""

    def __init__(self, address, timeout=5.0, source=None):
        """`source`: the address to connect from, e.g. 127.0.0.2 (another host)."""
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=None if source is None else (source, 0))
        self.port = self.sock.getsockname()[1]  # the port the server prefixes us with
        self.received = bytearray()  # grows in place: a 5 MB read stays linear

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def read_until(self, predicate, timeout=5.0):
        """Read until predicate(all bytes received so far) is true; return them."""
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"peer {self.port} timed out; received {self.received[-300:]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"peer {self.port}: connection closed; received {self.received[-300:]!r}")
            self.received += chunk
        return bytes(self.received)

    def expect(self, data, timeout=5.0):
        """Wait until exactly `data` has arrived (and nothing else)."""
        if isinstance(data, str):
            data = data.encode()
        self.read_until(lambda got: len(got) >= len(data), timeout)
        assert self.received == data
        self.received = bytearray()

    def expect_closed(self, timeout=5.0):
        """Wait for the server to close this connection; return what came before."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                raise AssertionError(f"peer {self.port}: server did not close the connection")
            if not chunk:
                got, self.received = bytes(self.received), bytearray()
                return got
            self.received += chunk

    def leave(self, timeout=5.0):
        """Send `exit`, wait for the server to close us, close; return what
        arrived before the close."""
        self.send("exit")
        got = self.expect_closed(timeout)
        self.close()
        return got

    def assert_silent(self, settle_with=None):
        """Assert nothing has arrived. `settle_with` is a (peer, sender, marker)
        triple: `sender` sends `marker` after the events under test, so once
        the marker has reached `peer` through the server, the server has
        processed everything before it."""
        if settle_with is not None:
            peer, sender, marker = settle_with
            sender.send(marker)
            peer.read_until(lambda got: marker.encode() in got)
        self.sock.setblocking(False)
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            chunk = None
        finally:
            self.sock.setblocking(True)
        assert chunk is None, f"peer {self.port} unexpectedly received {chunk!r}"

    def close(self):
        self.sock.close()


@pytest.fixture
def peers(server):
    """peers(n) -> n connected raw peers, all registered with the server."""
    made = []

    def connect(n=1, address=None):
        before = server.client_count
        new = [Peer(address or server.address) for _ in range(n)]
        made.extend(new)
        wait_until(lambda: server.client_count >= before + n, message=f"{n} clients registered")
        return new

    yield connect
    for peer in made:
        peer.close()


class ServerProcess(RelayProcess):
    """`python a2/mychatserver.py` as a real process on a free port
    (relayproc.RelayProcess: its stdout and stderr are read line by line as
    they arrive, `lines` and `errors`), with waits that fail the test."""

    def __init__(self, *args, python_args=(), env=None, preexec_fn=None):
        super().__init__([sys.executable, *python_args, str(SERVER_SCRIPT), "--port", "0", *args],
                         env=env, preexec_fn=preexec_fn)

    def wait_for_line(self, text, timeout=5.0):
        return wait_until(lambda: text in self.lines, timeout, message=f"server line {text!r}")

    def wait_for_count(self, text, n, timeout=5.0):
        """Wait until at least `n` stdout lines contain `text`."""
        return wait_until(lambda: self.count(text) >= n, timeout,
                          message=lambda: f"{n} server lines with {text!r} (have {self.count(text)})")

    def wait_for_error(self, text, timeout=5.0):
        return wait_until(lambda: any(text in line for line in list(self.errors)), timeout,
                          message=f"server stderr line containing {text!r}")

    def stop(self, sig=None, timeout=5.0):
        """Send `sig` (default SIGINT) and wait: not exiting within `timeout`
        fails the test. Return (exit status, stdout lines, stderr text)."""
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGINT)
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        return self.proc.returncode, self.lines, "".join(line + "\n" for line in self.errors)


@pytest.fixture
def server_process():
    """server_process(*args, python_args=(), env=None, preexec_fn=None) ->
    ServerProcess; every one started is killed at teardown if still running."""
    started = []

    def start(*args, **kwargs):
        proc = ServerProcess(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def terminal_clients():
    """terminal_clients(address, **options) -> a TerminalClient (client_drivers.py);
    each is killed at the end of the test if still running."""
    from client_drivers import TerminalClient  # here: client_drivers imports conftest
    yield from _started(TerminalClient)


@pytest.fixture
def piped_clients():
    """piped_clients(address) -> a PipedClient (client_drivers.py);
    each is killed at the end of the test if still running."""
    from client_drivers import PipedClient  # here: client_drivers imports conftest
    yield from _started(PipedClient)


def _started(client_class):
    made = []

    def start(address, *args, **options):
        client = client_class(address, *args, **options)
        made.append(client)
        return client

    yield start
    for client in made:
        client.kill()
