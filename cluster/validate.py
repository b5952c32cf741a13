"""The stream is not trusted: every entry read is checked before any of it
reaches a client. Sans-IO, like sequence.py (no Redis, no clock of its own).

Why (issue #20): whoever can write the stream (any Redis client with XADD
on the key: a node, an operator, anyone holding a node's credentials) could
put raw bytes - `\\x1b[2J`, a terminal title, a bell - in front of every
client, bypassing the sanitiser that local input goes through, and one
forged `s 1000000000000` for a live node id cut that node off from every
other (its real entries were then all "duplicates").

An entry is delivered exactly as published, or rejected whole:
* fields: exactly n, s, c, t (and f when c > 0), each of its type: decimal
  numbers, a finite non-negative time;
* node_id: 16 lowercase hex digits;
* size: at most ENTRY_MAX_MESSAGES messages and ENTRY_MAX_BYTES of frames
  (cluster/backbone.py's publisher never makes a larger one), no frame
  over 1,024 bytes (a2's one-send rule);
* frame: c frames of `PORT: text\\n`, PORT 1-65535, text valid UTF-8 and
  not blank;
* control: each text unchanged by a2/mychatserver.py's own sanitize() (the
  one local input goes through): an escape sequence, a control byte, a
  bidi control or a line separator cannot have come from a node, whose
  frames were sanitised when its client sent them;
* sequence: s at most 2**53, and - for a peer already heard from - not far
  ahead of what that peer can have published since (JumpGuard below);
  a real entry that a forged one got ahead of (same number, or a forged
  jump past it) is still delivered (Rescue, below).
A rejected entry is not shown to the SequenceTracker: it cannot move a
peer's numbers. If it was a real node's entry after all (a version with
another sanitiser, say), that node's next entry shows the gap and the
local clients are told: never a silent loss.
"""

import collections
import math
import re

from a2.mychatserver import BUFSIZE, sanitize  # the very sanitiser local input goes through

REJECT_REASONS = ("fields", "node_id", "size", "frame", "control", "sequence")

MAX_SEQ = 2 ** 53  # a node numbering 1,000 entries a second reaches this in 285,000 years
# A peer's numbers may jump (entries lost: Redis restarted without them, a
# failover, the reader behind the retention, an outbox drop) but not by
# more than JUMP_BASE plus JUMP_RATE per second since its last accepted
# entry, by this node's clock (monotonic: an entry cannot forge it). A real
# node XADDs at most one 64-entry round per round trip and, under load,
# packs 256 messages per entry: far below 10,000 entries a second. A jump
# over the bound is rejected, not adopted; a real one is accepted once
# enough time has passed (then it is a gap, and the clients are told).
JUMP_BASE = 1_000
JUMP_RATE = 10_000.0  # entries per second
JUMP_REMEMBER = 4_096  # peers whose last acceptance time is kept (bounded memory)

_NODE_ID = re.compile(rb"[0-9a-f]{16}")
_NUMBER = re.compile(rb"0|[1-9][0-9]{0,19}")
_TIME = re.compile(rb"[0-9][0-9.eE+-]{0,31}")
_FRAME_HEAD = re.compile(rb"([1-9][0-9]{0,4}): ")
_FIELDS = frozenset((b"n", b"s", b"c", b"t", b"f"))
_REQUIRED = frozenset((b"n", b"s", b"c", b"t"))


class Entry(collections.namedtuple("Entry", "node seq count published frames")):
    """A checked entry: node id (bytes), sequence number, message count,
    publish time (seconds), frames (bytes, exactly as published)."""

    @property
    def heartbeat(self):
        return self.count == 0


class Rejected(Exception):
    """An entry that is not delivered: `reason` is one of REJECT_REASONS."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def show_node(node):
    """A node id as a log may show it: forged bytes are escaped, never raw."""
    if isinstance(node, bytes) and _NODE_ID.fullmatch(node):
        return node.decode()
    return repr(node[:40] if isinstance(node, bytes) else node)


def check_entry(fields, max_messages, max_bytes):
    """The Entry that `fields` (an XREAD entry's dict of bytes) makes, or Rejected."""
    if not _REQUIRED <= fields.keys() or not fields.keys() <= _FIELDS:
        raise Rejected("fields", f"fields {sorted(fields)[:8]!r} are not n, s, c, t[, f]")
    node, seq, count, published = fields[b"n"], fields[b"s"], fields[b"c"], fields[b"t"]
    if not _NODE_ID.fullmatch(node):
        raise Rejected("node_id", "the node id is not 16 hex digits")
    if not _NUMBER.fullmatch(seq) or not _NUMBER.fullmatch(count):
        raise Rejected("fields", "s and c must be decimal numbers")
    seq, count = int(seq), int(count)
    if seq > MAX_SEQ:
        raise Rejected("sequence", f"sequence number {seq} is beyond any node's")
    try:
        if not _TIME.fullmatch(published):
            raise ValueError
        published = float(published)
        if not math.isfinite(published):
            raise ValueError
    except ValueError:
        raise Rejected("fields", "t is not a time") from None
    frames = fields.get(b"f")
    if count == 0:
        if frames is not None:
            raise Rejected("fields", "a heartbeat (c 0) carries no frames")
        return Entry(node, seq, 0, published, b"")
    if frames is None:
        raise Rejected("fields", f"c {count} but no frames")
    if count > max_messages or len(frames) > max_bytes:
        raise Rejected("size", f"{count} messages, {len(frames)} bytes (at most {max_messages}, "
                               f"{max_bytes})")
    _check_frames(frames, count)
    return Entry(node, seq, count, published, frames)


def _check_frames(data, count):
    if not data.endswith(b"\n"):
        raise Rejected("frame", "the frames do not end with a newline")
    lines = data[:-1].split(b"\n")
    if len(lines) != count:
        raise Rejected("frame", f"c {count} but {len(lines)} frames")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise Rejected("frame", "a frame is not UTF-8") from None
    printable = text.replace("\n", "").isprintable()  # the common case: nothing to sanitise
    for line in lines:
        if len(line) + 1 > BUFSIZE:
            raise Rejected("size", f"a frame of {len(line) + 1} bytes (at most {BUFSIZE})")
        head = _FRAME_HEAD.match(line)
        if head is None or int(head.group(1)) > 65535:
            raise Rejected("frame", "a frame does not start with 'PORT: '")
        message = line[head.end():].decode()
        if not message.strip():
            raise Rejected("frame", "a frame without text")
        if not printable and sanitize(message) != message:
            raise Rejected("control", "a frame holds escape sequences or control characters")


class JumpGuard:
    """Is a peer's next number plausible? See JUMP_BASE and JUMP_RATE."""

    def __init__(self, base=JUMP_BASE, rate=JUMP_RATE, remember=JUMP_REMEMBER):
        self.base, self.rate, self.remember = base, rate, remember
        self._accepted = collections.OrderedDict()  # node -> local time of its last accepted entry

    def allows(self, node, covered, last, now):
        """`covered`: the numbers the entry says its node has published
        (a data entry's number - 1, a heartbeat's number); `last`: the
        peer's last number (None: never heard, the entry is its baseline);
        `now`: local monotonic seconds."""
        if last is None or covered - last <= self.base:
            return True
        since = self._accepted.get(node, now)
        return covered - last <= self.base + self.rate * max(0.0, now - since)

    def accepted(self, node, now):
        self._accepted[node] = now
        self._accepted.move_to_end(node)
        while len(self._accepted) > self.remember:
            self._accepted.popitem(last=False)


class Rescue:
    """A forged entry must not stop a node's real traffic. The sequence
    tracker drops an entry whose number it has seen as a duplicate; two
    cases are not duplicates but real entries a forgery got ahead of:

    * conflict: the number was delivered, but with other contents. A real
      resend is the same entry byte for byte (the publisher keeps the
      fields it sent), so one of the two is forged: this one is delivered
      too (which of them is real cannot be told; losing the real one would
      be worse than showing a forged line, which a writer of the stream can
      post anyway);
    * late: the number lies in a range that a jump declared missing (the
      clients were told). A real node's entries reach the stream in
      increasing order, resends included, so an entry after a higher one
      of the same node means the higher one was forged: it is delivered.

    Bounded: the last `window` delivered numbers and the last `ranges`
    skipped ranges of each of at most `remember` nodes."""

    def __init__(self, window=256, ranges=16, remember=JUMP_REMEMBER):
        self.window, self.ranges, self.remember = window, ranges, remember
        self._nodes = collections.OrderedDict()  # node -> (OrderedDict seq -> digest, [[lo, hi], ...])

    def _state(self, node):
        state = self._nodes.get(node)
        if state is None:
            state = self._nodes[node] = (collections.OrderedDict(), [])
            while len(self._nodes) > self.remember:
                self._nodes.popitem(last=False)
        self._nodes.move_to_end(node)
        return state

    def delivered(self, node, seq, digest):
        recent, _ = self._state(node)
        recent[seq] = digest
        while len(recent) > self.window:
            recent.popitem(last=False)

    def skipped(self, node, low, high):
        """Numbers low..high of `node` were declared missing (a gap)."""
        _, skipped = self._state(node)
        skipped.append([low, high])
        del skipped[:-self.ranges]

    def check(self, node, seq, digest):
        """For an entry the tracker calls a duplicate: "conflict", "late", or None (a duplicate)."""
        state = self._nodes.get(node)
        if state is None:
            return None
        recent, skipped = state
        if seq in recent:
            if recent[seq] == digest:
                return None
            recent[seq] = digest  # a third copy of either is a duplicate
            return "conflict"
        for i, (low, high) in enumerate(skipped):
            if low <= seq <= high:
                skipped[i:i + 1] = [part for part in ([low, seq - 1], [seq + 1, high]) if part[0] <= part[1]]
                self.delivered(node, seq, digest)
                return "late"
        return None
