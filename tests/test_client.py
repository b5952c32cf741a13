"""`python a2/mychatclient.py`, driven through a pseudo-terminal as a person
uses it, or with piped stdin, against our server and a classmate-style one."""

import re
import subprocess
import sys
import time

import pytest

from classmate import ClassmateServer
from client_drivers import assert_exits, screen_lines
from conftest import CLIENT_SCRIPT, LOOPBACK, Peer, running_server, wait_until


def run_piped(address, stdin_text, timeout=10):
    return subprocess.run([sys.executable, str(CLIENT_SCRIPT), "--port", str(address[1])],
                          input=stdin_text, capture_output=True, text=True, timeout=timeout)


def test_terminal_session_send_receive_exit(server, peers, terminal_clients):
    (other,) = peers(1)
    client = terminal_clients(server.address)
    client.wait_for("Connected to chat server. Type 'exit' to leave.")
    wait_until(lambda: server.client_count == 2)
    client.type("Hello!\r")
    line = other.read_until(lambda got: got.endswith(b"\n")).decode()
    port = int(line.split(":")[0])
    assert line == f"{port}: Hello!\n"
    other.send("Hi there\n")
    client.wait_for(f"{other.port}: Hi there")
    client.type("exit\r")
    assert client.wait_exit() == 0
    lines = [line for line in screen_lines(client.output) if line]
    assert lines == ["Connected to chat server. Type 'exit' to leave.", "Hello!",
                     f"{other.port}: Hi there", "exit", "Disconnected from server"]
    wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 1)


def test_incoming_message_does_not_clobber_half_typed_line(server, peers, terminal_clients):
    (other,) = peers(1)
    client = terminal_clients(server.address)
    client.wait_for("Connected to chat server.")
    wait_until(lambda: server.client_count == 2)
    client.type("half-typ")
    client.wait_for("half-typ")
    other.send("interrupting\n")
    client.wait_for(f"{other.port}: interrupting")
    # The message line was written over a cleared line, then the typing redrawn.
    assert f"\r\x1b[K{other.port}: interrupting\r\nhalf-typ" in client.text()
    client.type("ed\r")
    assert other.read_until(lambda got: got.endswith(b"\n")).endswith(b": half-typed\n")
    client.type("exit\r")
    assert client.wait_exit() == 0


@pytest.mark.parametrize("key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_send_exit_and_leave(server, terminal_clients, key):
    client = terminal_clients(server.address)
    client.wait_for("Connected to chat server.")
    wait_until(lambda: server.client_count == 1)
    client.type(key)
    assert_exits(client)
    assert "Disconnected from server" in client.text()
    assert "Traceback" not in client.text()
    assert client.final_modes == client.initial_modes  # the terminal is left as found
    wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 1)


def test_ctrl_c_right_after_fast_typing_leaves_at_once(server, terminal_clients):
    # Ctrl-C right behind the keys: the terminal signals (and, by default,
    # discards the keys not yet read) while readline is still taking them.
    # Repeated, since that race is narrow.
    for attempt in range(20):
        client = terminal_clients(server.address)
        client.wait_for("Connected to chat server.")
        client.type("typed fast")
        client.type("\x03")
        started = time.monotonic()
        assert client.wait_exit() == 0, attempt
        assert time.monotonic() - started < 1.0, attempt
        assert screen_lines(client.output)[-2:] == ["Disconnected from server", ""]
        assert client.final_modes == client.initial_modes
    wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 20)


@pytest.mark.parametrize("key", ["\x03", "server closes"], ids=["ctrl-c", "server-closes"])
def test_started_with_sigint_ignored_it_still_leaves(server, terminal_clients, key):
    # A shell ignores SIGINT in jobs it starts in the background, and the
    # disposition is inherited: the client must still leave on Ctrl-C, and
    # its receiver must still wake the prompt when the server closes.
    client = terminal_clients(server.address, sigint_ignored=True)
    client.wait_for("Connected to chat server.")
    wait_until(lambda: server.client_count == 1)
    client.type("half-typed")
    if key == "server closes":
        server.shutdown()
    else:
        client.type(key)
    assert_exits(client)
    assert screen_lines(client.output)[-2:] == ["Disconnected from server", ""]
    assert "Traceback" not in client.text()
    assert client.final_modes == client.initial_modes
    if key != "server closes":
        wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 1)


def test_server_closing_ends_the_client_without_enter(terminal_clients):
    classmate = ClassmateServer()
    try:
        client = terminal_clients(classmate.address)
        client.wait_for("Connected to chat server.")
        classmate.wait_for_clients(1)
        client.type("typing but no Enter")
        classmate.disconnect_everyone()
        assert client.wait_exit() == 0
        assert screen_lines(client.output)[-2:] == ["Disconnected from server", ""]
        assert "Traceback" not in client.text()
    finally:
        classmate.close()


def test_piped_input_on_our_server(server, peers):
    (other,) = peers(1)
    result = run_piped(server.address, "hi\nexit\n")
    assert result.returncode == 0
    assert result.stdout == "Connected to chat server. Type 'exit' to leave.\nDisconnected from server\n"
    assert result.stderr == ""
    assert other.read_until(lambda got: got.endswith(b"\n")).endswith(b": hi\n")
    wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 1)
    assert server.stats()["messages_received_total"] == 1


def test_piped_input_on_a_classmate_style_server():
    classmate = ClassmateServer()
    try:
        listener = Peer(classmate.address)
        classmate.wait_for_clients(1)
        result = run_piped(classmate.address, "hi\nexit\n")
        assert result.returncode == 0
        assert result.stdout.splitlines()[-1] == "Disconnected from server"
        port, chunk = classmate.chunks[0]
        assert [c for _, c in classmate.chunks] == [b"hi\n", b"exit"]  # exit read on its own
        assert classmate.exited == [port]
        assert listener.read_until(lambda got: got.endswith(b"\n")) == f"{port}: hi\n".encode()
        listener.close()
    finally:
        classmate.close()


def test_leaves_within_a_second_when_server_never_closes():
    classmate = ClassmateServer(close_on_exit=False)
    try:
        started = time.monotonic()
        result = run_piped(classmate.address, "exit\n")
        assert time.monotonic() - started < 1.0 + 0.5  # + interpreter start-up
        assert result.returncode == 0
        assert result.stdout.splitlines()[-1] == "Disconnected from server"
        assert len(classmate.exited) == 1
    finally:
        classmate.close()


def test_raw_relays_without_newline_print_on_their_own_lines(terminal_clients):
    classmate = ClassmateServer()
    try:
        client = terminal_clients(classmate.address)
        client.wait_for("Connected to chat server.")
        talker = Peer(classmate.address)
        classmate.wait_for_clients(2)
        talker.send("first")
        client.wait_for(f"{talker.port}: first")
        talker.send("second")
        client.wait_for(f"{talker.port}: second")
        lines = [line for line in screen_lines(client.output) if line]
        assert lines[-2:] == [f"{talker.port}: first", f"{talker.port}: second"]
        client.type("exit\r")
        assert client.wait_exit() == 0
        talker.close()
    finally:
        classmate.close()


def test_hostile_escape_sequences_never_reach_the_terminal(terminal_clients):
    hostile = b"\x1b[2J\x1b[H\x1b]0;pwned\x07\x1b[31mred\x1b[0m\x07 \x9b2J text\n"
    classmate = ClassmateServer(greeting=hostile + b"x" * 5000 + b"\n")
    try:
        client = terminal_clients(classmate.address)
        client.wait_for("red")
        client.wait_for("x" * 1000)
        raw = client.output
        for sequence in (b"\x1b[2J", b"\x1b[H", b"\x1b]0;", b"\x07", b"\x1b[31m", b"\x9b"):
            assert sequence not in raw
        client.type("exit\r")
        assert client.wait_exit() == 0
    finally:
        classmate.close()


def test_cannot_connect_is_one_line_and_status_1():
    with running_server() as server:
        address = server.address
    result = run_piped(address, "")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Could not connect to {LOOPBACK}:{address[1]}: Connection refused\n"


def test_help():
    result = subprocess.run([sys.executable, str(CLIENT_SCRIPT), "--help"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert "--host" in result.stdout and "--port" in result.stdout


def test_three_clients_reproduce_the_assignment_example(server_process, terminal_clients):
    server = server_process()
    clients = []
    for n in range(1, 4):
        client = terminal_clients(server.address)
        client.wait_for("Connected to chat server. Type 'exit' to leave.")
        wait_until(lambda: sum(line.startswith("New connection") for line in server.lines) == n)
        clients.append(client)
    ports = [int(re.search(r", (\d+)\)", line).group(1))
             for line in server.lines if line.startswith("New connection")]
    script = [(0, "Hi!"), (1, "Hello!"), (2, "How are you guys doing?"), (1, "Good.")]
    for sender, text in script:
        clients[sender].type(text + "\r")
        for other in range(3):
            if other != sender:
                clients[other].wait_for(f"{ports[sender]}: {text}")
    for client in clients:
        client.type("exit\r")
        assert client.wait_exit() == 0
    for me, client in enumerate(clients):
        expected = ["Connected to chat server. Type 'exit' to leave."]
        expected += [text if sender == me else f"{ports[sender]}: {text}" for sender, text in script]
        expected += ["exit", "Disconnected from server"]
        assert [line for line in screen_lines(client.output) if line] == expected
    wait_until(lambda: sum("closed (exit)" in line for line in server.lines) == 3)
    status, lines, err = server.stop()
    assert status == 0 and err == ""
    assert lines[4:8] == [f"{ports[sender]}: {text}" for sender, text in script]


def test_long_typed_line_is_split_into_writes_of_at_most_1024_bytes():
    from a2.mychatclient import encode_message
    assert encode_message("hi") == [b"hi\n"]
    writes = encode_message("é" * 1000)  # 2000 bytes
    assert [len(w) for w in writes] == [1023, 979]
    assert all(w.endswith(b"\n") for w in writes)
    assert b"".join(w[:-1] for w in writes).decode() == "é" * 1000
    assert encode_message("x" * 1023) == [b"x" * 1023 + b"\n"]  # exactly 1024 bytes
    assert encode_message("x" * 1024) == [b"x" * 1023 + b"\n", b"x\n"]


def test_client_sanitize_keeps_text_tab_and_newline():
    from a2.mychatclient import sanitize
    assert sanitize("a\tb\nc") == "a\tb\nc"
    assert sanitize("\x1b[2J\x1b]0;t\x07x\r\x07\x9by") == "xy"


def test_client_sanitize_removes_line_separators_and_bidi_controls_keeps_zwj():
    from a2.mychatclient import sanitize
    assert sanitize("hi\u2028" + "12345: forged line") == "hi12345: forged line"
    assert sanitize("a\u2029b\u0085c") == "abc"
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    assert sanitize(f"x{bidi}y") == "xy"
    emoji = "\U0001F469\u200D\U0001F4BB \U0001F468\u200D\U0001F469\u200D\U0001F467"  # ZWJ sequences
    assert sanitize(emoji) == emoji
    for text in (sanitize(f"hi\u2028\u2029{bidi}12345: forged"), sanitize("\x1c\x1d\x1e\x0b\x0c\r")):
        assert len(text.splitlines()) <= 1  # nothing a Unicode-aware reader splits on
