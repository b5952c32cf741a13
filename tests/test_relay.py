"""The relay over real sockets: the assignment's rules and classmates' clients."""

import socket

import pytest

from conftest import Peer, reset, running_server, wait_until


def test_assignment_example_three_clients(server, peers):
    c1, c2, c3 = peers(3)
    c2.send("Hi!")
    c1.expect(f"{c2.port}: Hi!\n")
    c3.expect(f"{c2.port}: Hi!\n")
    c1.send("Hello!")
    c2.expect(f"{c1.port}: Hello!\n")
    c3.expect(f"{c1.port}: Hello!\n")
    c3.send("How are you guys doing?")
    c1.expect(f"{c3.port}: How are you guys doing?\n")
    c2.expect(f"{c3.port}: How are you guys doing?\n")
    c1.send("Good.")
    c2.expect(f"{c1.port}: Good.\n")
    c3.expect(f"{c1.port}: Good.\n")
    for peer in (c1, c2, c3):
        peer.assert_silent()  # nothing echoed, nothing unasked
    for leaving in (c1, c2, c3):
        leaving.send("exit")
        assert leaving.expect_closed() == b""
    wait_until(lambda: server.client_count == 0)
    stats = server.stats()
    assert stats["messages_received_total"] == 4
    assert stats["messages_relayed_total"] == 8


def test_message_is_never_echoed_to_its_sender(server, peers):
    a, b = peers(2)
    a.send("only for b\n")
    b.expect(f"{a.port}: only for b\n")
    a.assert_silent(settle_with=(a, b, "marker\n"))
    assert a.received == f"{b.port}: marker\n".encode()


def test_raw_chunk_clients_in_classmate_style(server, peers):
    # Classmates' clients: sendall(text) with no newline, one message per send.
    a, b, c = peers(3)
    for text in ("Hi!", "Hello!", "How are you guys doing?"):
        a.send(text)
        b.expect(f"{a.port}: {text}\n")
        c.expect(f"{a.port}: {text}\n")


def test_two_lines_in_one_write_are_two_messages(server, peers):
    a, b = peers(2)
    a.send("first\nsecond\n12345: forged\n")
    b.expect(f"{a.port}: first\n{a.port}: second\n{a.port}: 12345: forged\n")


def test_utf8_character_split_across_writes(server, peers):
    a, b = peers(2)
    a.send("line mode\n")
    b.expect(f"{a.port}: line mode\n")
    data = "¡olé 👋!\n".encode()
    a.send(data[:9])  # cut inside the 👋
    wait_until(lambda: server.stats()["received_bytes_total"] == 10 + 9)
    a.send(data[9:])
    b.expect(f"{a.port}: ¡olé 👋!\n")


def test_utf8_character_split_between_raw_sends(server, peers):
    # A raw client's burst is a message; the split character goes whole into
    # the next one instead of becoming two replacement characters.
    a, b = peers(2)
    data = "¡olé 👋!".encode()
    a.send(data[:9])
    b.expect(f"{a.port}: ¡olé \n")
    a.send(data[9:])
    b.expect(f"{a.port}: 👋!\n")


def test_line_split_across_writes_is_one_message(server, peers):
    a, b = peers(2)
    a.send("start\n")
    b.expect(f"{a.port}: start\n")
    a.send("hel")
    wait_until(lambda: server.stats()["received_bytes_total"] == 9)
    a.send("lo world\n")
    b.expect(f"{a.port}: hello world\n")


def test_escape_injection_is_neutralised(server, peers):
    a, b = peers(2)
    a.send("\x1b[2J\x1b]0;owned\x07\x1b[31mred\x1b[0m\x07 text\n")
    b.expect(f"{a.port}: red text\n")


def test_invalid_utf8_and_nul_bytes(server, peers):
    a, b = peers(2)
    a.send(b"\xff\x00ok\xc3\n")
    b.expect(f"{a.port}: \ufffdok\ufffd\n")


def test_long_message_becomes_self_contained_relays(server, peers):
    a, b = peers(2)
    a.send("z" * 2500 + "\n")
    prefix = f"{a.port}: "
    b.expect(f"{prefix}{'z' * 1000}\n{prefix}{'z' * 1000}\n{prefix}{'z' * 500}\n")


@pytest.mark.parametrize("goodbye", ["exit", "EXIT", " Exit ", "exit\n", "exit\r\n"])
def test_exit_variants_remove_the_client(server, peers, goodbye):
    a, b = peers(2)
    a.send(goodbye)
    assert a.expect_closed() == b""
    wait_until(lambda: server.client_count == 1)
    b.send("anyone?\n")
    wait_until(lambda: server.stats()["messages_received_total"] == 1)
    b.assert_silent()  # not echoed, and a has gone
    wait_until(lambda: server.stats()["disconnects_total"]["exit"] == 1)
    assert server.stats()["messages_relayed_total"] == 0


def test_exit_as_substring_is_just_a_message(server, peers):
    a, b = peers(2)
    a.send("where is the exit?\n")
    b.expect(f"{a.port}: where is the exit?\n")
    assert server.client_count == 2


def test_departed_client_receives_nothing_more(server, peers):
    a, b, c = peers(3)
    c.send("exit")
    assert c.expect_closed() == b""
    wait_until(lambda: server.client_count == 2)
    a.send("after\n")
    b.expect(f"{a.port}: after\n")


def test_empty_messages_are_not_relayed(server, peers):
    a, b = peers(2)
    a.send("\n\n   \n")
    a.send("real\n")
    b.expect(f"{a.port}: real\n")


def test_newcomer_gets_only_later_messages(server, peers):
    a, b = peers(2)
    a.send("before\n")
    b.expect(f"{a.port}: before\n")
    (c,) = peers(1)
    a.send("after\n")
    c.expect(f"{a.port}: after\n")
    b.expect(f"{a.port}: after\n")


def test_client_closing_without_exit_is_removed(server, peers):
    a, b = peers(2)
    a.close()
    wait_until(lambda: server.client_count == 1)
    wait_until(lambda: server.stats()["disconnects_total"]["closed"] == 1)


def test_unterminated_message_before_close_is_still_relayed(server, peers):
    a, b = peers(2)
    a.send("line\n")
    b.expect(f"{a.port}: line\n")
    a.send("last words")  # a line client: held for its newline...
    a.sock.shutdown(socket.SHUT_WR)  # ...which never comes: EOF completes it
    b.expect(f"{a.port}: last words\n")


def test_reset_mid_broadcast_costs_nobody_else(server, peers):
    senders = peers(3)
    victim, survivor = peers(2)
    for i in range(50):
        senders[i % 3].send(f"m{i}\n")
    # RST instead of FIN, with relays in flight towards the victim.
    reset(victim.sock)
    for i in range(50, 100):
        senders[i % 3].send(f"m{i}\n")
    expected_per_sender = {s.port: [f"m{i}" for i in range(100) if i % 3 == n] for n, s in enumerate(senders)}
    total = sum(len(f"{s.port}: m{i}\n") for n, s in enumerate(senders) for i in range(100) if i % 3 == n)
    got = survivor.read_until(lambda data: len(data) >= total).decode().splitlines()
    by_sender = {}
    for line in got:
        port, text = line.split(": ", 1)
        by_sender.setdefault(int(port), []).append(text)
    assert by_sender == expected_per_sender
    wait_until(lambda: server.client_count == 4)


def test_max_clients_refuses_newcomers_with_a_notice():
    with running_server(max_clients=2) as server:
        a, b = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2)
        extra = Peer(server.address)
        assert extra.expect_closed() == b"Server full (2 clients). Try again later.\n"
        a.send("still here\n")
        b.expect(f"{a.port}: still here\n")
        wait_until(lambda: server.stats()["disconnects_total"]["rejected"] == 1)
        for peer in (a, b, extra):
            peer.close()


def test_thread_start_failure_refuses_that_client_and_keeps_serving(monkeypatch):
    # The OS refusing a new thread ("can't start new thread") is simulated at
    # the one call that starts a client's threads; everything else is real.
    from a2 import mychatserver
    real_start = mychatserver.ClientConnection.start
    failures = []

    def start_or_fail(connection):
        if not failures:
            failures.append(connection.port)
            raise RuntimeError("can't start new thread")
        real_start(connection)

    monkeypatch.setattr(mychatserver.ClientConnection, "start", start_or_fail)
    with running_server() as server:
        refused = Peer(server.address)
        assert refused.expect_closed() == b""
        assert failures == [refused.port]
        a, b = Peer(server.address), Peer(server.address)
        wait_until(lambda: server.client_count == 2)
        a.send("after the failure\n")
        b.expect(f"{a.port}: after the failure\n")
        wait_until(lambda: server.stats()["disconnects_total"]["rejected"] == 1)
        for peer in (refused, a, b):
            peer.close()


# --- every queued relay goes out without waiting for another message (relay core v2) ---

@pytest.mark.timeout(90)
def test_no_relay_is_stranded_in_a_quiet_room(server_process):
    """A sends a line and leaves with a bare `exit` while B sends a line; no
    one speaks afterwards. Both lines must reach the observer (the old rotating
    flusher could leave B's line unsent until someone else spoke)."""
    server = server_process("--quiet")
    idle = [Peer(server.address) for _ in range(300)]
    observer = Peer(server.address)
    server.wait_for_count("New connection", 301, timeout=20)
    try:
        for round_ in range(20):
            a, b = Peer(server.address), Peer(server.address)
            server.wait_for_count("New connection", 303 + 2 * round_, timeout=10)
            a.send(f"a{round_}\n")
            a.send("exit")
            b.send(f"b{round_}\n")
            want = {f"{a.port}: a{round_}\n".encode(), f"{b.port}: b{round_}\n".encode()}
            got = observer.read_until(lambda data: all(w in data for w in want), timeout=2)
            assert sorted(got.splitlines(keepends=True)) == sorted(want), round_
            observer.received = bytearray()
            a.expect_closed()
            a.close()
            b.close()
    finally:
        for peer in idle + [observer]:
            peer.close()
    status, _, err = server.stop()
    assert status == 0, err
