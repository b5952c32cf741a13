"""MessageFramer and its helpers, without sockets (the sans-IO part).

Like h11's tests: every rule is checked with the input whole, split at every
position, and fed one byte at a time. At the end, two rules also seen on the
wire, against a server in this process: Unicode line separators cannot forge
a line, and `exit` split across reads."""

import socket

import pytest

from conftest import Peer, wait_until

from a2.mychatserver import (BUFSIZE, MAX_MESSAGE_CHARS, MAX_PAYLOAD_BYTES, MessageFramer,
                             frame, sanitize, send_frames, split_utf8)


def feed_all(chunks, bursts=False):
    """Feed chunks in order; with bursts=True each chunk ends a burst (the
    sender paused after it), as a raw-text client's separate sends do."""
    framer = MessageFramer()
    messages = []
    for chunk in chunks:
        messages += framer.feed(chunk)
        if bursts:
            messages += framer.end_of_burst()
    return framer, messages


def splits(data):
    """The data whole, cut in two at every position, and one byte at a time."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


def test_a_newline_ends_each_message_whatever_the_segmentation():
    stream = b"Hi!\nHow are you guys doing?\r\nGood.\n"
    for chunks in splits(stream):
        framer, messages = feed_all(chunks)
        assert messages == ["Hi!", "How are you guys doing?", "Good."], chunks
        assert framer.line_mode


def test_raw_text_without_newline_is_one_message_per_burst():
    framer, messages = feed_all([b"Hi!", b"Hello!", b"exi", b"t?"], bursts=True)
    assert messages == ["Hi!", "Hello!", "exi", "t?"]
    assert not framer.line_mode and not framer.exit_requested


def test_raw_burst_is_held_until_it_ends():
    framer = MessageFramer()
    assert framer.feed(b"part one, ") == []
    assert framer.feed(b"part two") == []
    assert framer.end_of_burst() == ["part one, part two"]


def test_line_client_keeps_unfinished_line_across_bursts():
    framer, messages = feed_all([b"first\nsec", b"ond\n"], bursts=True)
    assert messages == ["first", "second"]


def test_eof_completes_an_unterminated_message():
    framer = MessageFramer()
    assert framer.feed(b"one\ntwo") == ["one"]
    assert framer.feed(b"") == ["two"]
    assert framer.closed
    assert framer.feed(b"more") == []


@pytest.mark.parametrize("data", [
    b"exit", b"EXIT", b"Exit", b" exit ", b"exit\n", b"exit\r\n", b"\texit  \n",
])
def test_exit_variants_end_the_session(data):
    framer, messages = feed_all([data], bursts=True)
    assert framer.exit_requested
    assert messages == []


def test_unterminated_exit_then_close_counts_as_exit():
    framer = MessageFramer()
    assert framer.feed(b"bye\nexit") == ["bye"]
    assert not framer.exit_requested
    assert framer.feed(b"") == []
    assert framer.exit_requested


@pytest.mark.parametrize("data", [b"exiting", b"I exit now", b"exit exit", b"exit.", b"e x i t"])
def test_exit_is_never_matched_as_a_substring(data):
    framer, messages = feed_all([data + b"\n"])
    assert not framer.exit_requested
    assert messages == [data.decode()]


def test_messages_after_exit_are_not_relayed():
    framer, messages = feed_all([b"last words\nexit\nafter exit\n"])
    assert messages == ["last words"]
    assert framer.exit_requested
    assert framer.feed(b"more\n") == []


def test_utf8_character_split_across_reads_survives():
    text = "héllo wörld 👋 ok"
    data = text.encode() + b"\n"
    for chunks in splits(data):
        assert feed_all(chunks)[1] == [text]


def test_utf8_split_in_a_raw_client_burst_moves_to_the_next_message():
    wave = "👋".encode()
    framer, messages = feed_all([b"a" + wave[:2], wave[2:] + b"b"], bursts=True)
    assert messages == ["a", "👋b"]


def test_invalid_utf8_becomes_replacement_character():
    framer, messages = feed_all([b"bad \xff\xfe bytes \xc3\n"])
    assert messages == ["bad \ufffd\ufffd bytes \ufffd"]


def test_empty_and_blank_messages_are_not_relayed():
    framer, messages = feed_all([b"\n\n  \n\r\n\t\nreal\n"])
    assert messages == ["real"]


def test_escape_sequences_and_controls_are_removed():
    data = (b"\x1b[2J\x1b[H\x1b]0;pwned\x07clear\x07 \x1b[31mred\x1b[0m"
            b" \x00nul\x08 \xc2\x9b31m \x1bPdcs\x1b\\tab\tok\x7f\n")
    assert feed_all([data])[1] == ["clear red nul 31m tab\tok"]


def test_lone_carriage_return_cannot_overwrite_the_line():
    assert feed_all([b"12345: fake\rreal text\n"])[1] == ["12345: fakereal text"]


def test_two_lines_cannot_forge_another_prefix():
    # The second line becomes a message of its own, relayed with the sender's
    # own prefix: "51044: 12345: forged" can never pass for port 12345.
    assert feed_all([b"hello\n12345: forged\n"])[1] == ["hello", "12345: forged"]


def test_long_line_is_cut_at_the_same_places_however_it_arrives():
    line = ("0123456789" * 350).encode()  # 3500 characters
    expected = [line[i:i + MAX_MESSAGE_CHARS].decode() for i in range(0, 3500, MAX_MESSAGE_CHARS)]
    for chunks in ([line + b"\n"], [line[i:i + BUFSIZE] for i in range(0, len(line), BUFSIZE)] + [b"\n"],
                   [line[:1500], line[1500:] + b"\n"]):
        assert feed_all(chunks)[1] == expected


def test_raw_burst_longer_than_one_read_is_one_message_cut_to_fit():
    line = b"x" * 3000
    framer = MessageFramer()
    messages = []
    for i in range(0, len(line), BUFSIZE):
        messages += framer.feed(line[i:i + BUFSIZE])
    messages += framer.end_of_burst()
    assert messages == ["x" * 1000] * 3


def test_every_message_frame_fits_one_send():
    # 4-byte characters: 1000 of them are 4000 bytes, so pieces are cut again
    # by bytes, between characters.
    text = "😀" * 1500
    framer, messages = feed_all([text.encode() + b"\n"])
    assert "".join(messages) == text
    for message in messages:
        assert len(frame(65535, message)) <= BUFSIZE
    assert [len(m.encode()) for m in messages] == [1016, 1016, 1016, 952, 1016, 984]


def test_unterminated_input_held_is_bounded():
    framer = MessageFramer()
    messages = framer.feed(b"y" * 5000)
    assert messages == ["y" * 1000] * 5
    assert framer.feed(b"") == []


def test_sanitize_keeps_ordinary_text_and_tab():
    assert sanitize("plain text, ünïcode 👋\tand tab") == "plain text, ünïcode 👋\tand tab"
    assert sanitize("\x1b[1;31mbold red\x1b[0m\x07") == "bold red"
    assert sanitize("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\") == "link"


def test_split_utf8_cuts_between_characters():
    assert split_utf8("ab", limit=1) == ["a", "b"]
    assert split_utf8("é" * 3, limit=3) == ["é", "é", "é"]
    assert split_utf8("aé", limit=2) == ["a", "é"]
    assert split_utf8("") == [""]
    assert split_utf8("x" * MAX_PAYLOAD_BYTES) == ["x" * MAX_PAYLOAD_BYTES]


def test_frame_is_the_assignment_format_plus_newline():
    assert frame(51044, "Hi!") == b"51044: Hi!\n"
    assert frame(7, "ü") == "7: ü\n".encode()


class RecordingSocket:
    """Stands in for the client socket under send_frames(), which is what is
    tested: records each send() call; accepts at most `capacity` bytes."""

    def __init__(self, capacity=None, per_send=None):
        self.sends, self.capacity, self.per_send = [], capacity, per_send

    def send(self, data, flags=0):
        room = len(data) if self.capacity is None else self.capacity - sum(map(len, self.sends))
        if room <= 0:
            raise BlockingIOError
        taken = bytes(data[:min(room, self.per_send or room)])
        self.sends.append(taken)
        return len(taken)


def test_send_frames_sends_whole_frames_up_to_1024_bytes():
    frames = [frame(51044, "m%03d" % i) for i in range(200)]
    data = b"".join(frames)
    sock = RecordingSocket()
    assert send_frames(sock, data) == len(data)
    assert b"".join(sock.sends) == data
    assert all(len(chunk) <= BUFSIZE for chunk in sock.sends)
    assert all(chunk.endswith(b"\n") for chunk in sock.sends)  # no frame split across sends
    assert len(sock.sends) == -(-len(data) // (BUFSIZE - BUFSIZE % len(frames[0])))


def test_send_frames_stops_when_the_socket_is_full_and_resumes_mid_frame():
    data = b"".join(frame(7, "x" * 100) for _ in range(30))  # 104-byte frames
    full = RecordingSocket(capacity=1500)
    sent = send_frames(full, data, socket.MSG_DONTWAIT)
    assert sent == 1500 and b"".join(full.sends) == data[:1500]
    rest = RecordingSocket(per_send=50)  # a kernel taking less than offered
    assert send_frames(rest, data[sent:]) == len(data) - sent
    assert b"".join(rest.sends) == data[sent:]
    assert all(len(chunk) <= BUFSIZE for chunk in rest.sends)


def test_bare_exit_after_lines_ends_the_session_at_burst_end():
    # Newline messages, then "exit" with no newline (what our client sends,
    # since most classmates' servers compare each read with "exit").
    framer, messages = feed_all([b"hello\n", b"EXIT "], bursts=True)
    assert messages == ["hello"]
    assert framer.exit_requested


def test_line_client_text_starting_with_exit_waits_for_the_rest():
    framer = MessageFramer()
    assert framer.feed(b"hello\nexit") == ["hello"]
    assert framer.wants_burst_end  # the reader checks whether more is waiting...
    assert framer.feed(b"ing now\n") == ["exiting now"]  # ...and it was
    assert not framer.exit_requested
    assert framer.feed(b"half a line") == []
    assert not framer.wants_burst_end  # an unfinished line is just held


# --- Unicode line forgery (relay core v2), also over a socket -------------------------

FORBIDDEN = "\u061c\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def test_sanitize_removes_unicode_line_separators_and_bidi_controls_keeps_zwj():
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one emoji, joined by ZWJ
    for char in FORBIDDEN:
        assert sanitize(f"a{char}b") == "ab", hex(ord(char))
    assert sanitize(f"hi {family}") == f"hi {family}"
    framer = MessageFramer()
    assert framer.feed("hi\u2028 12345: forged line\u202e\n".encode()) == ["hi 12345: forged line"]


def test_no_relay_splits_into_two_lines_for_a_unicode_aware_receiver(server, peers):
    a, b = peers(2)
    a.send("hi\u202812345: forged line\u2029also\u0085this\n".encode())
    b.read_until(lambda got: got.endswith(b"\n"))
    text = b.received.decode()
    assert text == f"{a.port}: hi12345: forged linealsothis\n"
    assert len(text.splitlines()) == 1


# --- `exit` split across reads: the stated rule, over a socket ------------------------

def test_exit_then_a_pause_is_an_exit_even_if_more_of_the_line_follows(server, peers):
    """README: for a client that has sent a newline, an unfinished line that is
    just `exit` when the server has nothing more to read from it ends the
    session (the way clients send `exit`); the same bytes in one read are text."""
    a, b = peers(2)
    a.send("hello\n")
    b.expect(f"{a.port}: hello\n")
    a.send("exit")
    a.expect_closed()
    try:
        a.send("ing the building\n")
    except OSError:
        pass  # the server already closed: a reset is as good as silence
    c = Peer(server.address)
    wait_until(lambda: server.client_count == 2, message="c registered, a gone")
    c.send("marker\n")
    b.expect(f"{c.port}: marker\n")  # nothing of a's arrived before c's marker
    c.close()


def test_exit_and_the_rest_of_the_line_in_one_read_is_a_message(server, peers):
    a, b = peers(2)
    a.send("hello\n")
    b.expect(f"{a.port}: hello\n")
    a.send("exiting the building\n")
    b.expect(f"{a.port}: exiting the building\n")
