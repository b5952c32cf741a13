"""Property-based tests of the framing (hypothesis): whatever bytes arrive, cut
into whatever reads, the server's MessageFramer yields the same messages,
never a control character or a newline, never a frame over one send, and
never raises. Plus the client's own sanitiser and the server's send_frames().

The streams are built from tokens that matter to the framer (newlines, CR,
escape sequences, C1 controls, multi-byte and broken UTF-8, runs around the
1000-character cut, `exit` variants) mixed with arbitrary bytes, so hypothesis
explores the edges rather than uniform noise.
"""

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from a2 import mychatclient
from a2.mychatserver import (BUFSIZE, MAX_MESSAGE_CHARS, MAX_PAYLOAD_BYTES, MessageFramer,
                             cut_frames, frame, send_frames, split_utf8)

PROPERTY_SETTINGS = settings(max_examples=400, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# What must never reach another user's terminal: C0 controls (TAB excepted),
# newline and CR included, DEL and the C1 controls (ESC-free CSI is U+009B).
FORBIDDEN_IN_MESSAGE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# The client may print newlines between messages, nothing else of the kind.
FORBIDDEN_ON_SCREEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

SPECIAL_TOKENS = [
    b"\n", b"\r\n", b"\r", b"\t", b" ", b"\x00", b"\x07", b"\x08", b"\x7f",
    b"\x1b", b"\x1b[", b"\x1b[2J", b"\x1b[1;31m", b"\x1b[?2004h", b"\x1b]0;title\x07",
    b"\x1b]8;;http://x\x1b\\", b"\x1bPdcs\x1b\\", b"\x1b_apc", b"\x1bc", b"\x1b\x1b",
    "\u009b2J".encode(), "\u0085".encode(), "\u009d0;t".encode(),  # C1 controls as UTF-8
    b"\x9b", b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xff\xfe", b"\xed\xa0\x80",
    "é".encode(), "€".encode(), "😀".encode(), "\u202e".encode(),
    b"12345: forged",
]
EXIT_TOKENS = [b"exit", b"EXIT", b" eXiT\t", b"exit\n", b"exit\r\n", b"\x1b[1mexit", b"ex\x00it"]


def _run(length, unit):
    return unit * length


def stream_tokens(with_exit):
    tokens = [
        st.sampled_from(SPECIAL_TOKENS),
        st.binary(max_size=40),
        st.text(max_size=40).map(str.encode),
        # Runs that straddle the 1000-character cut and the 1016-byte one.
        st.builds(_run, st.integers(990, 1010) | st.sampled_from([1000, 2000]),
                  st.sampled_from([b"y", "é".encode(), "😀".encode()])),
        st.builds(_run, st.integers(1, 3100), st.just(b"z")),
    ]
    if with_exit:
        tokens.append(st.sampled_from(EXIT_TOKENS))
    return st.one_of(*tokens)


def without_exit(data):
    # No "t" byte, so no line can ever read as "exit" (UTF-8 never decodes
    # non-ASCII bytes to ASCII letters).
    return data.replace(b"t", b"_").replace(b"T", b"_")


exit_free_streams = st.lists(stream_tokens(False), max_size=25).map(b"".join).map(without_exit)
any_streams = st.lists(stream_tokens(True), max_size=25).map(b"".join)


@st.composite
def cut(draw, stream_strategy):
    """(stream, chunks): the stream and one way TCP might deliver it."""
    data = draw(stream_strategy)
    if not data:
        return data, []
    # Cuts anywhere, and cuts near where the framer cuts a long line (1000
    # characters after a line start, for ASCII), where state changes hands.
    line_starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == 0x0A]
    near_cuts = [s + MAX_MESSAGE_CHARS + d for s in line_starts for d in (-1, 0, 1, 2, 3)]
    anywhere = st.integers(1, max(1, len(data) - 1))
    positions = draw(st.lists(anywhere | st.sampled_from(near_cuts), max_size=12, unique=True))
    # Sometimes one byte at a time (capped: long streams would be slow).
    if draw(st.integers(0, 9)) == 0 and len(data) <= 2000:
        positions = range(1, len(data))
    bounds = [0, *sorted(p for p in positions if 0 < p < len(data)), len(data)]
    return data, [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_then_eof(chunks):
    """Feed the reads in order with no pause between them, then EOF."""
    framer = MessageFramer()
    messages = []
    for chunk in chunks:
        messages += framer.feed(chunk)
    messages += framer.feed(b"")
    return messages, framer.exit_requested


def assert_deliverable(messages):
    for message in messages:
        assert isinstance(message, str)
        assert message.strip(), f"blank message {message!r}"
        assert not FORBIDDEN_IN_MESSAGE.search(message), f"control character in {message!r}"
        assert "\x1b" not in message
        assert len(message.encode()) <= MAX_PAYLOAD_BYTES
        assert len(frame(65535, message)) <= BUFSIZE


@PROPERTY_SETTINGS
@given(cut(exit_free_streams))
def test_any_cut_yields_the_messages_of_the_whole_stream(stream_and_chunks):
    data, chunks = stream_and_chunks
    assert feed_then_eof(chunks) == feed_then_eof([data] if data else [])


@PROPERTY_SETTINGS
@example((b"y" * 1000 + b"exit\n", [b"y" * 1000, b"exit\n"]))  # the minimal counterexample
@given(cut(any_streams))
def test_any_cut_yields_the_same_messages_and_exit_as_the_whole_stream(stream_and_chunks):
    data, chunks = stream_and_chunks
    assert feed_then_eof(chunks) == feed_then_eof([data] if data else [])


@PROPERTY_SETTINGS
@given(cut(exit_free_streams))
def test_exit_free_stream_read_whole_or_cut_never_requests_exit(stream_and_chunks):
    # Checks the generator behind the property above: without a "t" no
    # reading of the stream can contain `exit`, so that property excludes
    # exactly the streams that involve exit.
    data, chunks = stream_and_chunks
    assert feed_then_eof([data])[1] is False
    assert feed_then_eof(chunks)[1] is False


# One step of a client's life as the server's reader sees it.
steps = st.one_of(
    stream_tokens(True).map(lambda data: ("feed", data)),
    st.just(("burst_end", None)),
)


@PROPERTY_SETTINGS
@given(st.lists(steps, max_size=40), st.booleans())
def test_no_message_ever_holds_a_control_character_newline_or_oversized_frame(ops, eof):
    """Any reads, any pauses (burst ends), EOF or not: decoding never raises and
    every message is non-blank, free of controls and fits one send."""
    framer = MessageFramer()
    messages = []
    for op, data in ops:
        if op == "feed":
            if data:  # b"" is EOF, fed only at the end
                messages += framer.feed(data)
        else:
            messages += framer.end_of_burst()
        assert len(framer._pending) < MAX_MESSAGE_CHARS  # unterminated text held is bounded
    if eof:
        messages += framer.feed(b"")
        assert framer._pending == ""  # EOF completes whatever was held
        assert framer.feed(b"after close\n") == []
    assert_deliverable(messages)
    if framer.exit_requested:
        assert framer.feed(b"after exit\n") == [] and framer.end_of_burst() == []


printable_lines = st.lists(
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="tT"),
             min_size=1, max_size=2600).filter(str.strip),
    min_size=1, max_size=6)


@PROPERTY_SETTINGS
@given(printable_lines, st.data())
def test_printable_lines_arrive_intact_in_order_however_cut(lines, data):
    """No loss, no reordering, no duplication: each line is relayed as its
    1000-character pieces (each cut again at 1016 UTF-8 bytes), in order."""
    stream = "".join(line + "\n" for line in lines).encode()
    _, chunks = data.draw(cut(st.just(stream)))
    messages, exit_requested = feed_then_eof(chunks)
    expected = []
    for line in lines:
        for start in range(0, len(line), MAX_MESSAGE_CHARS):
            piece = line[start:start + MAX_MESSAGE_CHARS]
            if piece.strip():
                expected += split_utf8(piece)
    assert messages == expected
    assert not exit_requested
    assert "".join(messages) == "".join(
        piece for line in lines for piece in
        (line[i:i + MAX_MESSAGE_CHARS] for i in range(0, len(line), MAX_MESSAGE_CHARS))
        if piece.strip())


@PROPERTY_SETTINGS
@given(st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="tT"),
                        min_size=1, max_size=900).filter(str.strip), min_size=1, max_size=8))
def test_raw_text_client_each_burst_is_one_message(bursts):
    """A classmate's client (no newline ever): each burst is exactly one message."""
    framer = MessageFramer()
    messages = []
    for burst in bursts:
        messages += framer.feed(burst.encode())
        messages += framer.end_of_burst()
    expected = [piece for burst in bursts for piece in split_utf8(burst)]
    assert messages == expected
    assert not framer.line_mode


@PROPERTY_SETTINGS
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode(errors="replace"))
       | st.lists(st.sampled_from(SPECIAL_TOKENS + EXIT_TOKENS)).map(
           lambda tokens: b"".join(tokens).decode(errors="replace")))
def test_client_sanitizer_leaves_nothing_that_drives_a_terminal(text):
    shown = mychatclient.sanitize(text)
    assert not FORBIDDEN_ON_SCREEN.search(shown), repr(shown)
    if not FORBIDDEN_ON_SCREEN.search(text):
        assert shown == text  # ordinary text, tabs and newlines pass untouched


@PROPERTY_SETTINGS
@given(st.text(max_size=3000), st.integers(4, 2000))
def test_split_utf8_keeps_text_and_fits_the_limit(text, limit):
    pieces = split_utf8(text, limit)
    assert "".join(pieces) == text
    assert all(len(piece.encode()) <= limit for piece in pieces)
    assert all(pieces[:-1])  # only the last piece may be empty (empty text)


@PROPERTY_SETTINGS
@given(st.lists(st.binary(max_size=BUFSIZE - 1).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                max_size=60))
def test_send_frames_preserves_bytes_and_never_splits_a_frame(frames):
    sends = []

    class RecordingSocket:  # stands in for the socket under send_frames()
        def send(self, data, flags=0):
            sends.append(bytes(data))
            return len(data)

    data = b"".join(frames)
    assert send_frames(RecordingSocket(), data) == len(data)
    assert b"".join(sends) == data
    assert all(len(chunk) <= BUFSIZE for chunk in sends)
    assert all(chunk.endswith(b"\n") for chunk in sends)  # runs of whole frames
    assert cut_frames(data) == (sends or [b""])  # the Sender's fan-out sends these pieces


@PROPERTY_SETTINGS
@given(st.text(max_size=3000))
def test_client_encoding_fits_one_write_and_round_trips(text):
    writes = mychatclient.encode_message(text)
    assert all(len(write) <= BUFSIZE and write.endswith(b"\n") for write in writes)
    assert b"".join(write[:-1] for write in writes).decode() == text
