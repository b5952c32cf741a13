"""The client against servers that die, lie, flood or say nothing: it never
hangs, never crashes with a traceback, and never passes a control sequence
from the server to the terminal. Driven through a pseudo-terminal (as a
person uses it) or with piped stdin (as a script does)."""

import contextlib
import os
import platform
import random
import re
import signal
import socket
import threading
import time

import pytest

from client_drivers import assert_exits, screen_lines
from conftest import LOOPBACK, Peer, reset, wait_until
from reliability_helpers import FORBIDDEN, ScriptedServer, tcp_queues
from test_properties import SPECIAL_TOKENS

CONNECTED = "Connected to chat server. Type 'exit' to leave."
DISCONNECTED = "Disconnected from server"
# What the client itself writes to a terminal: clear the line being typed
# before showing messages; readline's bracketed-paste mode switches.
CLIENT_OWN_SEQUENCES = re.compile(rb"\r\x1b\[K|\x1b\[\?2004[hl]")
C1_UTF8 = re.compile(rb"\xc2[\x80-\x9f]")


def hostile_stream(seed, size):
    """Escape sequences, controls, broken UTF-8 and noise, with markers of
    printable text between them that must survive. Returns the stream, the
    markers, and the (start, end) span of each marker line in the stream."""
    rng = random.Random(seed)
    parts, markers, marker_spans = [], [], []
    length = 0
    while length < size:
        roll = rng.random()
        if roll < 0.55:
            part = rng.choice(SPECIAL_TOKENS)
        elif roll < 0.9:
            part = rng.randbytes(rng.randint(1, 40))
        else:
            marker = f"MARKER-{len(markers)}"
            markers.append(marker)
            part = b"\n" + marker.encode() + b"\n"
            marker_spans.append((length, length + len(part)))
        parts.append(part)
        length += len(part)
    return b"".join(parts), markers, marker_spans


def write_cuts(seed, length, marker_spans):
    """Odd-sized writes (1 to 4096 bytes) that split escape sequences and
    characters but never end inside a marker line: the client shows an
    unfinished line once nothing more is waiting (that is how raw-relay
    servers end a message), so a write ending mid-marker would show it in two
    pieces, by design."""
    rng = random.Random(seed)
    cuts, position = [], 0
    while position < length:
        position = min(length, position + rng.choice([1, 3, 1023, 1024, 1025, 4096]))
        for start, end in marker_spans:
            if start < position < end:
                position = end
        cuts.append(position)
    return cuts


def assert_clean_screen(raw):
    """Nothing from the server that drives a terminal: after the client's own
    sequences, no ESC, BEL or other C0 control but CR/LF/TAB, no C1 control
    (raw or as UTF-8)."""
    rest = CLIENT_OWN_SEQUENCES.sub(b"", raw)
    assert b"\x1b" not in rest, rest[rest.index(b"\x1b") - 20:rest.index(b"\x1b") + 20]
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", rest)
    assert not C1_UTF8.search(rest)
    text = rest.decode()  # the client writes valid UTF-8 only
    assert not FORBIDDEN.search(text.replace("\r", ""))


# --- the server dies ---------------------------------------------------------------

def server_with_two_in_the_room(server_process, start_client):
    """A server process, a raw peer and a client (start_client(address)),
    both of them in its room."""
    server = server_process("--quiet")
    peer = Peer(server.address)
    client = start_client(server.address)
    client.wait_for(CONNECTED)
    server.wait_for_count("New connection", 2)
    return server, peer, client


def test_server_killed_mid_conversation_terminal(server_process, terminal_clients):
    server, other, client = server_with_two_in_the_room(server_process, terminal_clients)
    client.type("hello\r")
    assert other.read_until(lambda got: got.endswith(b"hello\n")).endswith(b": hello\n")
    other.send("hi back\n")
    client.wait_for(f"{other.port}: hi back")
    client.type("half-typed, no Enter")
    server.proc.kill()  # SIGKILL: no goodbye, the kernel closes its sockets
    assert_exits(client, within=2.0)
    assert screen_lines(client.output)[-2:] == [DISCONNECTED, ""]
    assert "Traceback" not in client.text()
    assert_clean_screen(client.output)
    other.close()


def test_server_killed_while_a_piped_client_is_sending(server_process, piped_clients):
    server, listener, client = server_with_two_in_the_room(server_process, piped_clients)
    stop = threading.Event()

    def keep_typing():
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                client.type(f"line {i}\n")
            except OSError:  # the client exited: its stdin is closed
                return
            stop.wait(0.01)

    typist = threading.Thread(target=keep_typing)
    typist.start()
    listener.read_until(lambda got: got.count(b"\n") >= 3)
    server.proc.kill()
    try:
        assert client.wait_exit(timeout=5) == 0
    finally:
        stop.set()
        typist.join(5)
    assert client.output().decode().endswith(f"\n{DISCONNECTED}\n")
    assert client.err == b""
    listener.close()


# --- the server lies -----------------------------------------------------------------

def is_in_order_subset(shown, sent, cut_short=False):
    """Every shown line was sent, once, in the order sent (some may be
    missing: an unterminated OSC/DCS/APC string hides text, as on a terminal).

    With `cut_short`, the stream may end anywhere (a reset discards what the
    kernel had not yet delivered), so the last line shown may be the start of
    a later line, printed as the unfinished line at disconnect."""
    position = 0
    for number, line in enumerate(shown, 1):
        if cut_short and number == len(shown) and line not in sent[position:]:
            return any(later.startswith(line) for later in sent[position:])
        position = sent.index(line, position) + 1  # ValueError: invented or reordered
    return True


def run_piped_against(script, piped_clients, timeout=5):
    """A piped client of a ScriptedServer whose `script` starts once the client
    shows it is connected; the client must exit 0 within `timeout` seconds."""
    with ScriptedServer(script, hold=True) as server:
        client = piped_clients(server.address)
        client.wait_for(CONNECTED)
        server.release()
        assert client.wait_exit(timeout=timeout) == 0
    return client


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_garbage_and_escape_sequences_never_reach_stdout(piped_clients, ending):
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    stream, markers, marker_spans = hostile_stream(seed, 100_000)

    def script(conn):
        position = 0
        for cut in write_cuts(seed, len(stream), marker_spans):
            conn.sendall(stream[position:cut])
            position = cut
        conn.sendall(b"\nLAST\n")
        if ending == "reset":
            reset(conn)
        else:
            conn.close()

    client = run_piped_against(script, piped_clients, timeout=10)
    out = client.output()
    assert client.err == b""
    assert_clean_screen(out)
    lines = out.decode().split("\n")
    assert lines[0] == CONNECTED and lines[-2:] == [DISCONNECTED, ""]
    shown = [line for line in lines if line.startswith("MARKER-") or line == "LAST"]
    if ending == "close":  # a FIN comes after every byte; a reset may cut them all
        assert shown
    assert is_in_order_subset(shown, markers + ["LAST"], cut_short=ending == "reset")


def test_escape_sequences_never_reach_the_terminal(terminal_clients):
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    stream, markers, _ = hostile_stream(seed, 50_000)

    def script(conn):  # the connection stays open until the server is closed
        conn.sendall(stream + b"\nLAST\n\x1b\\\nREALLY LAST\n")

    with ScriptedServer(script) as server:
        client = terminal_clients(server.address)
        client.wait_for("REALLY LAST", timeout=10)
        client.type("still typing\r")
        client.type("exit\r")
        assert client.wait_exit() == 0
        assert_clean_screen(client.output)
        assert "Traceback" not in client.text()
        shown = [line for line in screen_lines(client.output) if line.startswith("MARKER-")]
        assert shown and is_in_order_subset(shown, markers)
        assert screen_lines(client.output)[-2:] == [DISCONNECTED, ""]


def test_an_unterminated_escape_string_does_not_hide_the_next_lines(piped_clients):
    # What a classmate's server (raw relays, no sanitising) passes on from a
    # hostile client, followed in the same read by someone else's message.
    def script(conn):
        conn.sendall(b"51000: \x1b_hidden?\n51001: a real message\n")
        conn.close()

    client = run_piped_against(script, piped_clients)
    assert_clean_screen(client.output())
    assert "51001: a real message" in client.output().decode().split("\n")


def test_unicode_line_separators_cannot_forge_a_line(piped_clients):
    # A server (a classmate's, relaying raw) passes on U+2028 from a hostile
    # client, then text that looks like someone else's message, in one read.
    # Our output must not show it as a line of its own to a reader that
    # splits lines the Unicode way (str.splitlines()); nor may bidi controls
    # reorder what is shown. Emoji joined with ZWJ survive.
    emoji = "\U0001F469\u200D\U0001F4BB \U0001F468\u200D\U0001F469\u200D\U0001F467"
    stream = ("51000: hi\u2028" "12345: forged line\n"
              "51000: \u2029" "12345: forged too\n"
              "51001: \u202egnp.exe\u202c \u2066x\u2069\u200e\u200f\u061c\n"
              f"51002: {emoji}\n")

    def script(conn):
        conn.sendall(stream.encode())
        conn.close()

    client = run_piped_against(script, piped_clients)
    out = client.output()
    assert out == (f"{CONNECTED}\n"
                   "51000: hi12345: forged line\n"
                   "51000: 12345: forged too\n"
                   "51001: gnp.exe x\n"
                   f"51002: {emoji}\n"
                   f"{DISCONNECTED}\n").encode()
    assert out.decode().splitlines() == out.decode().split("\n")[:-1]
    assert client.err == b""


# --- the server floods -------------------------------------------------------------------

def test_a_flood_of_lines_is_shown_whole_and_the_client_exits(piped_clients):
    count = 20_000

    def script(conn):
        conn.sendall(b"".join(b"%d: line %d\n" % (40000 + i % 100, i) for i in range(count)))
        conn.close()

    with ScriptedServer(script) as server:
        client = piped_clients(server.address)
        assert client.wait_exit(timeout=10) == 0
        lines = client.output().decode().split("\n")
        assert lines[1:-2] == [f"{40000 + i % 100}: line {i}" for i in range(count)]
        assert lines[-2:] == [DISCONNECTED, ""]


def test_a_line_cut_by_tcp_is_shown_whole_once_the_server_has_sent_newlines(piped_clients):
    """The flood above once showed `40092: line 19` and `92`: a segment ended
    mid-line and nothing more was readable at that instant."""
    def script(conn):
        conn.sendall(b"40000: one\n40001: tw")
        time.sleep(0.05)  # the scenario: the rest of the line comes 50 ms later
        conn.sendall(b"o\n")
        conn.close()

    with ScriptedServer(script) as server:
        client = piped_clients(server.address)
        assert client.wait_exit(timeout=10) == 0
        lines = client.output().decode().split("\n")
        assert lines[1:] == ["40000: one", "40001: two", DISCONNECTED, ""]


def test_a_huge_line_without_newline_cannot_hang_the_client(piped_clients):
    size = 8_000_000

    def script(conn):
        conn.sendall(b"A" * size + b"\nend\n")
        conn.close()

    with ScriptedServer(script) as server:
        client = piped_clients(server.address)
        assert client.wait_exit(timeout=4) == 0
        lines = client.output().decode().split("\n")
        assert lines[-3:] == ["end", DISCONNECTED, ""]
        assert "".join(lines[1:-3]) == "A" * size  # shown in full, in as many lines as it likes


# --- the server says nothing -------------------------------------------------------------

def test_server_that_never_accepts_client_still_leaves_on_ctrl_d(terminal_clients):
    # The kernel completes the handshake from the listen backlog; nobody ever
    # accepts, reads or answers.
    listener = socket.create_server((LOOPBACK, 0), backlog=8)
    try:
        client = terminal_clients(listener.getsockname())
        client.wait_for(CONNECTED)
        client.type("anyone there?\r")
        client.type("\x04")
        assert_exits(client, within=2.0)
        assert screen_lines(client.output)[-2:] == [DISCONNECTED, ""]
        assert "Traceback" not in client.text()
    finally:
        listener.close()


@contextlib.contextmanager
def listener_that_never_answers():
    """A listening address whose handshakes never complete: backlog 0 and its
    queue filled, so the kernel drops further SYNs and connect() waits."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    with contextlib.ExitStack() as fillers:
        for _ in range(3):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            try:
                filler.connect(listener.getsockname())
            except BlockingIOError:
                pass
        with listener:
            yield listener.getsockname()


def syn_sent_to(port):
    """Sockets connecting to 127.0.0.1:port and still waiting for an answer."""
    with open("/proc/net/tcp") as table:
        next(table)
        return sum(1 for line in table
                   if line.split()[2] == f"0100007F:{port:04X}" and line.split()[3] == "02")


@pytest.mark.timeout(30)
def test_server_that_never_completes_the_handshake(piped_clients):
    with listener_that_never_answers() as address:
        started = time.monotonic()
        client = piped_clients(address, "--connect-timeout", "2")
        assert client.wait_exit(timeout=20) == 1
        elapsed = time.monotonic() - started
        assert 1.8 < elapsed < 5.0  # its connect timeout, not forever
        assert client.output() == b""
        assert client.err.decode() == f"Could not connect to {LOOPBACK}:{address[1]}: timed out\n"


def test_ctrl_c_while_connecting_ends_the_client_at_once(terminal_clients):
    with listener_that_never_answers() as address:
        before = syn_sent_to(address[1])
        client = terminal_clients(address)
        wait_until(lambda: syn_sent_to(address[1]) > before, message="the client's connect() waiting")
        os.write(client.master, b"\x03")  # not type(): nothing is reading the keyboard yet
        assert_exits(client, status=130)
        assert "Traceback" not in client.text()
        assert CONNECTED not in client.text()


# --- the server stops reading ---------------------------------------------------------

# System calls a thread waits in, as /proc/<pid>/task/<tid>/syscall shows them.
SENDTO, FUTEX = {"x86_64": (44, 202), "aarch64": (206, 98)}.get(platform.machine(), (None, None))
LONG_LINE = "x" * 1000  # one write of 1001 bytes: the client's pacing allows 20 a second
needs_sendto = pytest.mark.skipif(SENDTO is None, reason="sendto's number on this machine is not known")


@contextlib.contextmanager
def server_that_never_reads():
    """A server that accepts and never reads. Its receive buffer and segment
    size are small (set on the listener, inherited by what it accepts), so
    the kernel buffers between it and the client fill after some 20 KiB, not
    megabytes: a few seconds of the client's paced writes."""
    with ScriptedServer(lambda conn: None) as server:  # the connection stays open, unread
        server.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        server.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 256)
        yield server


def waiting_in(pid, tid):
    """The system call thread `tid` of process `pid` waits in, as
    [number, arguments...]; [] if it is running or has ended."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as state:
            call = state.read().split()
    except OSError:  # the thread has ended
        return []
    return [int(field, 0) for field in call[:7]] if call and call[0] != "running" else []


def blocked_in_send(pid):
    """Whether a thread of process `pid` waits in send(): its socket's
    buffer is full (a send that does not wait is never seen sleeping)."""
    return any(waiting_in(pid, tid)[:1] == [SENDTO] for tid in os.listdir(f"/proc/{pid}/task"))


def waiting_on_a_lock(pid, tid):
    """Whether the thread waits in futex() without a timeout: a lock or
    condition, not the GIL (whose waits are timed)."""
    call = waiting_in(pid, tid)
    return call[:1] == [FUTEX] and call[4] == 0


def bytes_sent(server):
    """What the client has put into the kernel: not yet acknowledged on its
    side plus received, unread, on the server's."""
    (conn,) = server.connections
    server_port, client_port = conn.getsockname()[1], conn.getpeername()[1]
    return tcp_queues(client_port, server_port)[0] + tcp_queues(server_port, client_port)[1]


def flood_until_blocked(client, server, type_line):
    """Type LONG_LINEs, at most three ahead of what the client has sent (a
    terminal's input queue holds 4 KiB: a client that stops reading the
    keyboard must not block the typist), until the client waits in send()."""
    wait_until(lambda: server.connections, message="the client to connect")
    pid, size = client.proc.pid, len(LONG_LINE) + 1
    for typed in range(500):
        if blocked_in_send(pid):
            print(f"blocked in send() after {typed} lines typed, {bytes_sent(server)} bytes sent")
            return
        type_line(LONG_LINE)
        wait_until(lambda: blocked_in_send(pid) or bytes_sent(server) >= (typed - 2) * size,
                   timeout=10, message="the client to send, or to wait in send()")
    raise AssertionError("the client never filled its socket")


@contextlib.contextmanager
def client_blocked_sending(start_client, newline):
    """A client (start_client(address)) of a server that never reads, typed
    LONG_LINEs ending in `newline` until it waits in send()."""
    with server_that_never_reads() as server:
        client = start_client(server.address)
        client.wait_for(CONNECTED)
        flood_until_blocked(client, server, lambda line: client.type(line + newline))
        yield client


@needs_sendto
@pytest.mark.parametrize("key", ["\x03", "\x04", "exit\r"], ids=["ctrl-c", "ctrl-d", "exit"])
def test_leaves_at_once_while_blocked_sending_terminal(terminal_clients, key):
    # A person pastes a lot; the server has stopped reading. Ctrl-C, Ctrl-D
    # and `exit` still end the client: Ctrl-C within a second, the others
    # once a write has waited STALL_LIMIT (0.5 s): what was not sent is dropped.
    with client_blocked_sending(terminal_clients, "\r") as client:
        if key == "\x03":
            os.write(client.master, b"\x03")  # pressed whatever the client is doing
        else:
            client.type(key)  # the client still reads the keyboard: the sender waits, not it
        assert_exits(client)
        assert screen_lines(client.output)[-2:] == [DISCONNECTED, ""]
        assert "Traceback" not in client.text()
        assert client.final_modes == client.initial_modes


@needs_sendto
@pytest.mark.parametrize("how", ["sigint", "end of input"])
def test_leaves_at_once_while_blocked_sending_piped(piped_clients, how):
    with client_blocked_sending(piped_clients, "\n") as client:
        if how == "sigint":
            client.proc.send_signal(signal.SIGINT)  # Ctrl-C, for a script: stdin stays open
        else:
            client.proc.stdin.close()
        assert_exits(client)
        assert client.output() == f"{CONNECTED}\n{DISCONNECTED}\n".encode()
        assert client.err == b""


@needs_sendto
def test_ctrl_c_while_input_waits_for_the_sender(piped_clients):
    # Piped input far ahead of a blocked sender: the queue is full (200
    # writes) and the main thread waits for room in it, not in a read.
    with client_blocked_sending(piped_clients, "\n") as client:
        client.type("z\n" * 300)
        wait_until(lambda: waiting_on_a_lock(client.proc.pid, client.proc.pid),
                   message="the client's main thread to wait for room in the queue")
        client.proc.send_signal(signal.SIGINT)
        assert_exits(client)
        assert client.output() == f"{CONNECTED}\n{DISCONNECTED}\n".encode()
        assert client.err == b""


def test_ctrl_c_while_leaving_ends_the_client_at_once(piped_clients):
    # Input ended with writes still queued: leaving sends them first, paced,
    # as long as the server reads. Ctrl-C then drops the rest: the write
    # under way finishes, a bare "exit" follows, and the client is gone
    # within a second.
    lines = [f"line {i} " + "y" * 900 for i in range(100)]  # 5 s of paced writes
    received = bytearray()
    closed = threading.Event()

    def read_everything(conn):
        while chunk := conn.recv(65536):
            received.extend(chunk)
        closed.set()

    with ScriptedServer(read_everything) as server:
        client = piped_clients(server.address)
        client.wait_for(CONNECTED)
        client.type("".join(line + "\n" for line in lines))
        client.proc.stdin.close()
        wait_until(lambda: received.count(b"\n") >= 5, message="five lines sent")
        client.proc.send_signal(signal.SIGINT)
        assert_exits(client)
        assert client.output() == f"{CONNECTED}\n{DISCONNECTED}\n".encode()
        assert client.err == b""
        wait_until(closed.is_set, message="the client's connection closed")
        sent = bytes(received).split(b"\n")
        assert sent[-1] == b"exit"  # alone, after whole lines
        assert 5 <= len(sent) - 1 < len(lines)
        assert [line.decode() for line in sent[:-1]] == lines[:len(sent) - 1]
