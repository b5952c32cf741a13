"""chatwire.py - the load generator's view of the chat wire, with no I/O.

Why this module exists
    loadtest/chatusers.py runs inside Locust, which monkey-patches the standard
    library with gevent as soon as it is imported. Everything that decides
    whether the relay behaved - the token each message carries, parsing the
    relayed `PORT: message` frames, tracking every sender's sequence numbers
    and the run's totals - lives here instead, imports neither locust nor
    gevent, and is unit-tested in the ordinary pytest process
    (tests/test_chatwire.py).

    It depends on the wire format only, never on a2/ code: it is an
    independent second reading of the protocol, so it can catch the server
    and the server's own parser agreeing on a mistake.

The wire, as the load generator uses it
    Each user sends one newline-terminated line per message, at most
    MAX_MESSAGE_CHARS characters, so the relay never cuts it into pieces.
    The relay sends every *other* client `f"{port}: {message}\\n"`, where port
    is the sender's port. A message is a token followed by padding:

        chat1|<sender>|<seq>|<port>|<sent>|<padding length>|xxxx...

    sender   one TCP connection of one simulated user, unique across
             processes and machines ("<random process tag>.<counter>"); with
             several relay nodes (--chat-hosts), "@<node index>" follows: the
             node the sender is connected to, so receivers can tell that
             messages cross from node to node
    seq      1, 2, 3, ... per sender (per connection)
    port     the sender's own local port: the receiver checks the relay's
             `PORT:` prefix against it
    sent     time.time() at sending, for the send-to-receipt latency
    padding  "x" repeated, so messages have the configured size; its declared
             length lets the receiver notice a truncated or altered message

    Everything a receiver needs is in the message, so the check works the
    same when sender and receiver are in different Locust worker processes.
"""

import collections
import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345  # the assignment's example port, the relay's default

# The relay cuts a longer line into several frames (its MAX_MESSAGE_CHARS), and
# a frame, "65535: " + message + "\n", must fit in one 1024-byte send. A
# message that stays whole is what lets one message be one token.
MAX_MESSAGE_CHARS = 1000

TOKEN_MAGIC = "chat1"

# How many later messages from the same sender a missing one may trail by
# before it is written off as lost (instead of waiting for the connection to
# close). A relay that delivers a message after 64 of its successors is
# broken anyway; the late arrival is then still counted, as a reordering.
REORDER_WINDOW = 64

_TOKEN = re.compile(
    r"chat1\|(?P<sender>[0-9a-z]+\.\d+(?:@\d+)?)\|(?P<seq>\d+)\|(?P<port>\d+)"
    r"\|(?P<sent>\d+\.\d+)\|(?P<padding>\d+)\|(?P<pad>x*)\Z"
)
_FRAME = re.compile(r"(?P<port>\d{1,5}): (?P<message>.*)\Z", re.DOTALL)


# --- faults: each is one kind of Locust failure, named for what went wrong ---

class DeliveryFault(Exception):
    """Something the relay did wrong, as seen by one receiving user.

    `request_name` is the row under which Locust counts it. The exception's
    message is a fixed summary, because Locust's failure table groups by it
    (one row per kind, not one per message); the particulars - which sender,
    which seq, the frame - are in `detail`, for the log."""

    request_name = "delivery fault"
    summary = "the relay did something wrong"

    def __init__(self, detail="", summary=None):
        super().__init__(summary or self.summary)
        self.detail = detail


class LostMessage(DeliveryFault):
    request_name = "lost message"
    summary = "a message skipped in a sender's sequence never arrived"


class DuplicateMessage(DeliveryFault):
    request_name = "duplicate message"
    summary = "a message arrived more than once"


class ReorderedMessage(DeliveryFault):
    request_name = "reordered message"
    summary = "a message arrived after a later one from the same sender"


class MalformedFrame(DeliveryFault):
    request_name = "bad frame"
    summary = "a frame is not 'PORT: message'"


class WrongPort(DeliveryFault):
    request_name = "wrong port"
    summary = "a message was relayed with a port other than its sender's"


class EchoedMessage(DeliveryFault):
    request_name = "echoed message"
    summary = "a message was relayed back to its own sender"


class UnexpectedDisconnect(DeliveryFault):
    request_name = "unexpected disconnect"
    summary = "the relay ended a connection that had not sent 'exit'"


# --- addresses -----------------------------------------------------------------

def parse_address(text, default_port=DEFAULT_PORT):
    """Locust's --host for a TCP relay -> (host, port).

    Accepts "tcp://HOST:PORT", "HOST:PORT", "HOST", "[IPv6]:PORT"; without a
    port, `default_port`. Any other scheme (Locust's usual http://...) is a
    mistake here, and raises ValueError rather than being guessed at.
    """
    text = (text or "").strip()
    if not text:
        return DEFAULT_HOST, default_port
    if "://" not in text:
        text = "tcp://" + text
    parts = urlsplit(text)
    if parts.scheme != "tcp":
        raise ValueError(f"--host must be tcp://HOST:PORT or HOST:PORT, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--host must be tcp://HOST:PORT or HOST:PORT, got {text!r}")
    try:
        port = parts.port  # raises ValueError itself when out of range
    except ValueError as exc:
        raise ValueError(f"bad port in --host {text!r}: {exc}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host name in --host {text!r}")
    return host, default_port if port is None else port


def parse_hosts(text):
    """--chat-hosts "HOST:PORT,HOST:PORT,..." -> [(host, port), ...], in order.
    Each entry is read as parse_address reads --host. Empty -> []; an empty
    entry (",,") or a bad one raises ValueError naming it."""
    text = (text or "").strip()
    if not text:
        return []
    addresses = []
    for entry in text.split(","):
        if not entry.strip():
            raise ValueError(f"--chat-hosts has an empty entry: {text!r}")
        try:
            addresses.append(parse_address(entry))
        except ValueError as exc:
            raise ValueError(f"--chat-hosts entry {entry.strip()!r}: {exc}") from None
    return addresses


def sender_node(sender):
    """The --chat-hosts index in a sender id ("tag.7@1" -> 1), or None."""
    _, at, index = sender.partition("@")
    return int(index) if at else None


def route_name(from_node, to_node):
    return f"{from_node} -> {to_node}"


def node_name(address):
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- messages and frames ----------------------------------------------------------

@dataclass(frozen=True)
class Token:
    """What one chat message says about itself."""

    sender: str
    seq: int
    port: int
    sent: float  # time.time() at the sender


def format_message(sender, seq, port, sent, size):
    """The text of one message: its token, padded with "x" to `size` characters
    (or just the token, if that is already longer). Never over MAX_MESSAGE_CHARS."""
    head = f"{TOKEN_MAGIC}|{sender}|{seq}|{port}|{sent:.6f}|"
    # The padding length is written before the padding and its digits count
    # towards the size too: take the longest padding that fits. (Where the
    # digit count changes, e.g. 9 -> 10, the message may come out one short.)
    budget = size - len(head) - 1  # the length's digits + "|" + the padding
    padding = max(0, budget - 1)
    while padding and len(str(padding)) + padding > budget:
        padding -= 1
    message = f"{head}{padding}|{'x' * padding}"
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"message of {len(message)} characters would be cut by the relay")
    return message


def parse_message(text):
    """Token of a relayed message; MalformedFrame if it is not one of ours intact."""
    match = _TOKEN.match(text)
    if match is None:
        raise MalformedFrame(repr(shorten(text)), summary="a message is not a load-test token")
    if len(match["pad"]) != int(match["padding"]):
        raise MalformedFrame(f"{len(match['pad'])} of {match['padding']} padding characters: "
                             f"{shorten(text)!r}", summary="a message arrived truncated or altered")
    return Token(match["sender"], int(match["seq"]), int(match["port"]), float(match["sent"]))


def parse_frame(line):
    """One relayed line (bytes, without its newline) -> (port, message text).

    Raises MalformedFrame unless it is exactly `PORT: message` with a port in
    1-65535 and a non-empty message in valid UTF-8."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedFrame(repr(shorten(line)), summary="a frame is not UTF-8") from None
    match = _FRAME.match(text)
    if match is None or not match["message"]:
        raise MalformedFrame(repr(shorten(text)))
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise MalformedFrame(repr(shorten(text)), summary="a frame's port is not 1-65535")
    return port, match["message"]


def split_lines(buffer, data):
    """Append received bytes to `buffer`; return (complete lines, rest)."""
    lines = (buffer + data).split(b"\n")
    rest = lines.pop()
    return lines, rest


def shorten(text, limit=80):
    return text if len(text) <= limit else text[:limit] + "..."


# --- the run's totals ------------------------------------------------------------

# Every counter the load generator keeps. The fault counters are the ones a
# clean run must leave at zero.
FAULT_COUNTERS = ("lost", "duplicate", "reordered", "bad_frame", "wrong_port", "echoed",
                  "unexpected_disconnect")
COUNTERS = ("sent", "expected", "delivered") + FAULT_COUNTERS


class RunTally:
    """Counts for the summary, in one process.

    In a distributed run each worker ships what it counted since its last
    report (take_unreported) and the master adds it up (merge): the same
    delta scheme Locust uses for its own statistics. Besides the COUNTERS,
    `nodes` counts connections opened per relay node (--chat-hosts), so a
    run shows how its users were spread.
    """

    def __init__(self):
        self.counts = collections.Counter()
        self.nodes = collections.Counter()
        self.routes = collections.Counter()
        self._unreported = collections.Counter()
        self._unreported_nodes = collections.Counter()
        self._unreported_routes = collections.Counter()

    def add(self, counter, amount=1):
        if counter not in COUNTERS:
            raise KeyError(counter)
        if amount:
            self.counts[counter] += amount
            self._unreported[counter] += amount

    def add_connection(self, node):
        self.nodes[node] += 1
        self._unreported_nodes[node] += 1

    def add_route(self, from_node, to_node):
        """One good delivery from a sender on node `from_node` to a receiver
        on `to_node` (names, as node_name gives them)."""
        route = route_name(from_node, to_node)
        self.routes[route] += 1
        self._unreported_routes[route] += 1

    def take_unreported(self):
        delta = dict(self._unreported)
        if self._unreported_nodes:
            delta["nodes"] = dict(self._unreported_nodes)
        if self._unreported_routes:
            delta["routes"] = dict(self._unreported_routes)
        self._unreported = collections.Counter()
        self._unreported_nodes = collections.Counter()
        self._unreported_routes = collections.Counter()
        return delta

    def merge(self, delta):
        for counter, amount in delta.items():
            if counter in COUNTERS:
                self.counts[counter] += amount
        for node, amount in delta.get("nodes", {}).items():
            self.nodes[node] += amount
        for route, amount in delta.get("routes", {}).items():
            self.routes[route] += amount

    def reset(self):
        for counter in (self.counts, self.nodes, self.routes, self._unreported,
                        self._unreported_nodes, self._unreported_routes):
            counter.clear()


# --- loss, duplicate and reorder accounting for one receiving connection -----------

@dataclass
class _SenderRecord:
    first: int    # the first seq this receiver saw from the sender: its baseline
    highest: int  # the highest seq seen so far
    missing: set = field(default_factory=set)  # seqs skipped over, not (yet) arrived


class DeliveryLedger:
    """What one receiving connection got from every sender, and what it lacks.

    The rule (README "How delivery is checked"): a receiver expects, from each
    sender, every message from the first one it saw from that sender up to the
    last one it saw. So
      * a receiver that joined late is not expected to have the sender's
        earlier messages (the first one seen sets the baseline);
      * messages still in flight when either side leaves are not expected -
        they are after the last one seen, never inside a gap;
      * a gap - seq n+2 arrived, n+1 did not - is a loss, because the relay
        queues each sender's messages in order for each recipient: once n+2 is
        here, n+1 can only be late (reordered) or lost.
    A skipped seq is pending until it arrives (a reordering) or is written
    off: when it trails the sender's newest by more than `reorder_window`, or
    when this connection closes (close()).

    Counts go to `tally`: expected = delivered + lost (+ still pending); each
    message inside the window is counted once, duplicates and reorderings on
    their own. observe() and close() return what Locust should be told.
    """

    def __init__(self, tally, reorder_window=REORDER_WINDOW):
        self.tally = tally
        self.reorder_window = reorder_window
        self._senders = {}
        self.closed = False

    def observe(self, sender, seq):
        """One message `seq` from `sender` arrived. Returns (fault, newly_lost):
        fault is None, DuplicateMessage or ReorderedMessage (the class);
        newly_lost is how many skipped messages were just written off."""
        record = self._senders.get(sender)
        if record is None:
            self._senders[sender] = _SenderRecord(first=seq, highest=seq)
            self.tally.add("expected")
            self.tally.add("delivered")
            return None, 0
        if seq > record.highest:
            # In order, or past a gap. Skipped seqs older than the window are
            # lost at once (so a huge jump cannot make `missing` huge).
            oldest_pending = seq - self.reorder_window
            skipped_from = record.highest + 1
            lost_at_once = max(0, oldest_pending - skipped_from)
            self.tally.add("lost", lost_at_once)
            record.missing.update(range(max(skipped_from, oldest_pending), seq))
            self.tally.add("expected", seq - record.highest)
            self.tally.add("delivered")
            record.highest = seq
            newly_lost = lost_at_once + self._write_off(record, below=oldest_pending)
            return None, newly_lost
        if seq in record.missing:
            # It was skipped over and has now arrived: late, not lost.
            record.missing.discard(seq)
            self.tally.add("delivered")
            self.tally.add("reordered")
            return ReorderedMessage, 0
        if seq < record.first or seq < record.highest - self.reorder_window:
            # Older than anything we can still account for: it came after
            # later messages (a reordering), and is outside the expected window.
            self.tally.add("reordered")
            return ReorderedMessage, 0
        self.tally.add("duplicate")
        return DuplicateMessage, 0

    def _write_off(self, record, below):
        if not record.missing:
            return 0
        stale = [seq for seq in record.missing if seq < below]
        record.missing.difference_update(stale)
        self.tally.add("lost", len(stale))
        return len(stale)

    @property
    def pending(self):
        return sum(len(record.missing) for record in self._senders.values())

    def describe_pending(self, limit=5):
        """The missing seqs, per sender, for a log line (at most `limit` senders)."""
        parts = [f"{sender}: {', '.join(map(str, sorted(record.missing)[:10]))}"
                 for sender, record in self._senders.items() if record.missing]
        more = f" (+{len(parts) - limit} more senders)" if len(parts) > limit else ""
        return "; ".join(parts[:limit]) + more

    def close(self):
        """This connection is over: whatever is still missing is lost.
        Returns how many that is (idempotent: a second call returns 0)."""
        if self.closed:
            return 0
        self.closed = True
        lost = self.pending
        self.tally.add("lost", lost)
        self._senders.clear()
        return lost


# --- the summary -------------------------------------------------------------------

_LABELS = {
    "sent": "messages sent",
    "expected": "expected deliveries",
    "delivered": "delivered",
    "lost": "lost",
    "duplicate": "duplicates",
    "reordered": "reordered",
    "bad_frame": "bad frames",
    "wrong_port": "wrong port",
    "echoed": "echoed to sender",
    "unexpected_disconnect": "unexpected disconnects",
}


def loss_percent(lost, expected):
    """lost/expected as a percentage with enough digits that a small loss
    never reads as 0: three significant digits (0.200%, 0.00123%, 45.3%),
    and "0%" only for no loss at all."""
    if not lost:
        return "0%"
    if not expected:
        return "n/a"
    percent = 100.0 * lost / expected
    decimals = max(1, 2 - math.floor(math.log10(percent)))
    return f"{percent:.{decimals}f}%"


def silent_routes(nodes, routes):
    """With several relay nodes: the pairs of nodes (both with connections)
    between which not one message was delivered. Each receiver's expectations
    come from what it sees (first..last seen per sender), so nodes that do not
    share one room would pass them; this is what catches that."""
    used = sorted(node for node, connections in (nodes or {}).items() if connections)
    return [route_name(a, b) for a in used for b in used
            if a != b and not (routes or {}).get(route_name(a, b))]


def judge(counts, *, p99_ms=None, latency_target_ms=0.0, locust_failures=0,
          missing_final_reports=0, nodes=None, routes=None):
    """What is wrong with a run: a list of reasons, empty exactly when the run
    proves the relay delivered everything it should. `nodes` and `routes`
    (RunTally.nodes/.routes) matter with several relay nodes."""
    problems = []
    for counter in FAULT_COUNTERS:
        if counts.get(counter, 0):
            problems.append(f"{counts[counter]} {_LABELS[counter]}")
    if not counts.get("delivered", 0):
        problems.append("no message was delivered, so nothing was checked "
                        "(a run needs at least 2 users connected at once)")
    if latency_target_ms and p99_ms is not None and p99_ms > latency_target_ms:
        problems.append(f"broadcast p99 {p99_ms:g} ms is above the {latency_target_ms:g} ms target")
    if missing_final_reports:
        problems.append(f"{missing_final_reports} worker(s) sent no report after their users stopped, "
                        "so the counts are incomplete")
    silent = silent_routes(nodes, routes) if counts.get("delivered", 0) else []
    if silent:
        problems.append(f"no delivery across nodes {', '.join(silent)} (do they share one room?)")
    if locust_failures:
        problems.append(f"{locust_failures} Locust failures in all (see the failure table)")
    return problems


def verdict(problems):
    """`PASS` or `FAIL - <reasons>`: the one-line result everywhere it is shown."""
    return "FAIL - " + "; ".join(problems) if problems else "PASS"


def figures(counts, *, p50_ms=None, p99_ms=None, latency_target_ms=0.0, problems=()):
    """The run's figures in display order, as (label, text): what the web UI's
    Delivery view, the HTML report and the summary show."""
    rows = [("verdict", verdict(problems))]
    for counter in COUNTERS:
        rows.append((_LABELS[counter], str(counts.get(counter, 0))))
        if counter == "lost":
            rows.append(("loss ratio", f"{loss_percent(counts.get('lost', 0), counts.get('expected', 0))} "
                                       f"({counts.get('lost', 0)} of {counts.get('expected', 0)} expected)"))
    target = f"{latency_target_ms:g} ms" if latency_target_ms else "off"
    rows.append(("broadcast p50", "n/a" if p50_ms is None else f"{p50_ms:g} ms"))
    rows.append(("broadcast p99", ("n/a" if p99_ms is None else f"{p99_ms:g} ms") + f" (target: {target})"))
    return rows


def summarize(counts, *, p50_ms=None, p99_ms=None, latency_target_ms=0.0, locust_failures=0,
              missing_final_reports=0, nodes=None, routes=None):
    """The end-of-test report. Returns (lines, problems): problems is empty
    exactly when the run proves the relay delivered everything it should.
    `nodes` ({"HOST:PORT": connections}) adds a line when users were spread
    over more than one relay node."""
    problems = judge(counts, p99_ms=p99_ms, latency_target_ms=latency_target_ms,
                     locust_failures=locust_failures, missing_final_reports=missing_final_reports,
                     nodes=nodes, routes=routes)
    width = max(len(label) for label in (*_LABELS.values(), "deliveries across nodes"))
    lines = ["Chat delivery check"]
    for counter in COUNTERS:
        lines.append(f"  {_LABELS[counter]:<{width}}  {counts.get(counter, 0)}")
        if counter == "lost":
            lines.append(f"  {'loss ratio':<{width}}  {loss_percent(counts.get('lost', 0), counts.get('expected', 0))}")
    latency = "n/a" if p99_ms is None else f"p50 {p50_ms:g} ms, p99 {p99_ms:g} ms"
    target = f"{latency_target_ms:g} ms" if latency_target_ms else "off"
    lines.append(f"  {'broadcast latency':<{width}}  {latency} (p99 target: {target})")
    if nodes and len(nodes) > 1:
        lines.append(f"  {'connections by node':<{width}}  "
                     + ", ".join(f"{node} {count}" for node, count in sorted(nodes.items())))
        across = {route: n for route, n in (routes or {}).items()
                  if route.split(" -> ")[0] != route.split(" -> ")[1]}
        lines.append(f"  {'deliveries across nodes':<{width}}  "
                     + (", ".join(f"{route} {n}" for route, n in sorted(across.items())) or "none"))
    if problems:
        lines.append("  RESULT: FAIL - " + "; ".join(problems))
    else:
        lines.append("  RESULT: PASS - every expected delivery arrived once, in order, intact")
    return lines, problems
