"""The chat server's Prometheus endpoint: /metrics over HTTP, built on prometheus-client.

Why it exists: the design card asks for connection and message counters on an
optional Prometheus endpoint. a2/mychatserver.py imports this module only when
started with --metrics-port, so without the flag the server stays stdlib-only.
Who owns what: the server (a2/mychatserver.py, the lead) owns the counters and
ChatServer.stats(); the cluster package (cluster/, the cluster helper) owns
backbone.stats(); this module (metrics/, the metrics helper) owns only their
translation into metric families and the HTTP endpoint that serves them.

Why a custom Collector instead of Counter/Gauge/Histogram objects: the relay's
hot path must stay cheap. The server already counts everything in plain
per-connection integers, each written by exactly one thread (no lock, no lost
increment), and folds a departed connection's counts into its totals. Calling
prometheus-client on every message or delivery would add a lock acquisition per
call; instead nothing happens per message here at all. At scrape time
ChatCollector.collect() takes ONE snapshot, ChatServer.stats() (exact, taken
under the server's lock, O(number of connections)), and translates it into
metric families. That is "no-op by default, counting in batches": with no
scraper, the metrics cost nothing beyond the integer additions the server does
anyway.

Why our own HTTP server instead of prometheus-client's start_http_server: that
one keeps one thread and one descriptor per connection, with no timeout and no
limit, and walks every chat connection for every scrape. 300 idle connections
held 300 threads and, under `ulimit -n 256`, took the descriptors the chat
listener needed; 200 concurrent scrapers raised the room's relay p50 from
13 ms to ~750 ms. MetricsHTTPServer below is one thread around one selector:
    * at most MAX_CONNECTIONS connections are open; a newcomer beyond that
      closes the oldest one that has been waiting EVICTION_GRACE for its
      request without sending it (so an idle flood cannot lock a real
      scraper out for long, and descriptors stay bounded); if there is none,
      newcomers wait in the kernel's listen backlog, costing no descriptor;
    * a connection must send its request head within REQUEST_TIMEOUT and take
      its response within RESPONSE_TIMEOUT, or it is closed; one request per
      connection (Connection: close);
    * at most ACCEPT_RATE connections are accepted per second (bursts of
      MAX_CONNECTIONS), so the endpoint's CPU stays bounded under any storm;
    * the exposition is generated at most once per SNAPSHOT_WINDOW and the same
      bytes are served to every scrape inside that window, so a storm of
      scrapers costs the room one stats() snapshot per window, not one each.
      Consequence, documented in metrics/README.md: two scrapes less than
      SNAPSHOT_WINDOW apart may see the same values.
When the process is out of descriptors (EMFILE), accepting pauses for
ACCEPT_BACKOFF instead of spinning.

The registry is our own CollectorRegistry, not prometheus-client's global
REGISTRY: two servers in one process (the tests) must not share or clash, and
importing this module must not register anything as a side effect.

THE STATS() KEYS READ HERE (exactly these; a missing key fails the scrape with
HTTP 500, which the tests would catch):
    server, see /work/briefs/core-v2-contract.md and a2/mychatserver.py:
        connections_total, clients, max_clients, messages_received_total,
        messages_relayed_total, received_bytes_total, sent_bytes_total,
        disconnects_total {reason: n}, outbound_backlog_bytes,
        relay_latency_buckets, relay_latency_counts, relay_latency_sum,
        version, max_client_backlog_bytes, accept_errors_total {reason: n},
        flow_control_pauses_total, flow_control_pause_seconds_total,
        log_lines_dropped_total, backbone (None or the dict below)
    server, strangers (issue 19; every key present from the first call, zeros included):
        refused_connections_total {reason: n} (reasons: full, per_host, connect_rate),
        throttled_clients, throttle_pauses_total, throttled_seconds_total,
        memory_budget_bytes, log_lines_summarised_total
    backbone (stats()["backbone"], owned by cluster/; also metrics/README.md):
        {"connected": bool,               "entries_out_total": int,
         "messages_out_total": int,       "entries_in_total": int,
         "messages_in_total": int,        "reconnects_total": int,
         "publish_errors_total": int,     "outbox_bytes": int,
         "outbox_budget_bytes": int,      "dropped_messages_total": int,
         "duplicates_total": int,         "gaps_total": int,
         "peers": int,                    "losses_total": int,
         "rejected_total": {reason: int} (cluster/validate.py's REJECT_REASONS),
         "delay_buckets": tuple (ascending upper bounds, seconds),
         "delay_counts": list (per bucket, NOT cumulative, last is +Inf),
         "delay_sum": float}
"""

import collections
import errno
import itertools
import logging
import selectors
import socket
import threading
import time

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.utils import floatToGoString

log = logging.getLogger("mychatserver.metrics")  # the server's handlers print it

DEFAULT_HOST = "127.0.0.1"  # loopback: the endpoint is not reachable off this machine unless asked
DEFAULT_PORT = 9100         # the port metrics/prometheus.yml and metrics/README.md use

# --- The endpoint's bounds. Each says why it has its value. ---
# A scrape storm gets one exposition per window: stats() walks every chat
# connection under the registry lock, so this caps that walk at 2/s however
# many scrape. Prometheus scrapes every 15 s, so 0.5 s staleness is invisible.
SNAPSHOT_WINDOW = 0.5
# Open HTTP connections at once. One or two Prometheus servers need 1-2; 32
# lets a burst of scrapers in without queueing while bounding descriptors.
MAX_CONNECTIONS = 32
# At the limit, a newcomer closes the oldest connection that has not sent its
# request although it has been open this long: a real client sends it right
# behind the handshake, so 0.25 s is generous even on a loaded machine. An
# idle flood therefore drains at MAX_CONNECTIONS per EVICTION_GRACE (128/s).
EVICTION_GRACE = 0.25
# A scraper sends its request at once (Prometheus: a few hundred bytes right
# after connecting); 2 s is generous on any network and short for an attacker.
REQUEST_TIMEOUT = 2.0
# The response is ~10 KB; a client that has not taken it in 5 s is stuck.
# Both stay below Prometheus' default scrape_timeout (10 s).
RESPONSE_TIMEOUT = 5.0
# New connections accepted per second (a token bucket, bursts of
# MAX_CONNECTIONS): bounds the endpoint's CPU, and so its share of the GIL the
# relay needs, whatever a storm of scrapers offers (one Prometheus needs one
# per 15 s). Beyond it connections wait in the kernel's listen backlog.
ACCEPT_RATE = 100.0
MAX_REQUEST_BYTES = 8192  # a request head longer than this is not a scrape: 431
LISTEN_BACKLOG = 64       # the kernel queues this many beyond MAX_CONNECTIONS, costing us no descriptor
ACCEPT_BACKOFF = 0.1      # seconds not to accept after EMFILE (like the chat server's accept loop)

# Every family this collector exposes, in exposition order. Tests and the
# README check against these lists, so a renamed metric cannot go unnoticed.
# Names follow Prometheus conventions: base units (seconds, bytes), counters
# end in _total (prometheus-client appends it to a counter family's name).
METRIC_NAMES = (
    "chat_connections_total",
    "chat_clients",
    "chat_max_clients",
    "chat_messages_received_total",
    "chat_messages_relayed_total",
    "chat_received_bytes_total",
    "chat_sent_bytes_total",
    "chat_disconnects_total",
    "chat_outbound_backlog_bytes",
    "chat_relay_latency_seconds",
    "chat_build_info",
    "chat_max_client_backlog_bytes",
    "chat_accept_errors_total",
    "chat_flow_control_pauses_total",
    "chat_flow_control_pause_seconds_total",
    "chat_log_lines_dropped_total",
    # Strangers (issue 19): refusals, flood control, the memory budget, the log flood gate.
    "chat_refused_connections_total",
    "chat_throttled_clients",
    "chat_throttle_pauses_total",
    "chat_throttled_seconds_total",
    "chat_memory_budget_bytes",
    "chat_log_lines_summarised_total",
)
# Exposed only when the server runs with --backbone (stats()["backbone"] is a dict).
BACKBONE_METRIC_NAMES = (
    "chat_backbone_connected",
    "chat_backbone_entries_out_total",
    "chat_backbone_messages_out_total",
    "chat_backbone_entries_in_total",
    "chat_backbone_messages_in_total",
    "chat_backbone_reconnects_total",
    "chat_backbone_publish_errors_total",
    "chat_backbone_outbox_bytes",
    "chat_backbone_outbox_budget_bytes",
    "chat_backbone_dropped_messages_total",
    "chat_backbone_duplicates_total",
    "chat_backbone_gaps_total",
    "chat_backbone_peers",
    "chat_backbone_losses_total",
    "chat_backbone_rejected_total",
    "chat_backbone_delay_seconds",
)

# (name, type, stats() key, help). The help text is what an operator reads in
# Prometheus' UI, so it says exactly what is counted and what is not.
_SCALARS = (
    ("chat_connections_total", "counter", "connections_total",
     "TCP connections accepted, including ones then refused (see chat_refused_connections_total)."),
    ("chat_clients", "gauge", "clients",
     "Clients connected now (those messages are relayed to)."),
    ("chat_max_clients", "gauge", "max_clients",
     "Configured maximum number of clients (--max-clients); more are refused."),
    ("chat_messages_received_total", "counter", "messages_received_total",
     "Chat messages received from clients; 'exit' and empty messages are not counted."),
    ("chat_messages_relayed_total", "counter", "messages_relayed_total",
     "Deliveries: one per recipient of each message (messages queued for other clients)."),
    ("chat_received_bytes_total", "counter", "received_bytes_total",
     "Bytes received from clients, everything recv() returned (including 'exit' lines)."),
    ("chat_sent_bytes_total", "counter", "sent_bytes_total",
     "Bytes of relayed chat frames sent to clients (accepted by the kernel)."),
)

# Families after the latency histogram, in the same (name, type, key, help) form.
_SCALARS_V2 = (
    ("chat_max_client_backlog_bytes", "gauge", "max_client_backlog_bytes",
     "The largest single client's bytes queued but not yet accepted by its socket "
     "(over --outbound-budget it is dropped as a slow consumer)."),
)
_FLOW_AND_LOG = (
    ("chat_flow_control_pauses_total", "counter", "flow_control_pauses_total",
     "Times a sender's reader waited because the queue to the sender thread was full (back-pressure)."),
    ("chat_flow_control_pause_seconds_total", "counter", "flow_control_pause_seconds_total",
     "Total seconds senders' readers waited for back-pressure to clear."),
    ("chat_log_lines_dropped_total", "counter", "log_lines_dropped_total",
     "Log lines dropped because the log output was stalled (the server never blocks on logging)."),
)
# Strangers (issue 19), after the refusals by reason, in the same form.
_STRANGERS = (
    ("chat_throttled_clients", "gauge", "throttled_clients",
     "Clients paused by flood control right now (--max-rate/--max-burst): not read until their budget allows."),
    ("chat_throttle_pauses_total", "counter", "throttle_pauses_total",
     "Times a client was paused by flood control (its lines are delayed, never dropped)."),
    ("chat_throttled_seconds_total", "counter", "throttled_seconds_total",
     "Total seconds clients were paused by flood control; rate() of it is the average number of clients paused."),
    ("chat_memory_budget_bytes", "gauge", "memory_budget_bytes",
     "The configured --memory-budget: past it, all outboxes together, the largest outboxes are dropped."),
    ("chat_log_lines_summarised_total", "counter", "log_lines_summarised_total",
     "Warnings held back by the log flood gate and summed up in one '... and N more like' line."),
)

_BACKBONE_SCALARS = (
    ("chat_backbone_connected", "gauge", "connected",
     "1 if the backbone (Redis) is connected and its publish and read loops run, else 0."),
    ("chat_backbone_entries_out_total", "counter", "entries_out_total",
     "Stream entries this node added to the backbone (data and heartbeats), acknowledged by Redis."),
    ("chat_backbone_messages_out_total", "counter", "messages_out_total",
     "Chat messages published to the backbone, inside those entries."),
    ("chat_backbone_entries_in_total", "counter", "entries_in_total",
     "Stream entries read from other nodes (own entries and duplicates not counted)."),
    ("chat_backbone_messages_in_total", "counter", "messages_in_total",
     "Chat messages from other nodes handed to this node's local clients."),
    ("chat_backbone_reconnects_total", "counter", "reconnects_total",
     "Reconnections to the backbone after a lost connection (not the first connect)."),
    ("chat_backbone_publish_errors_total", "counter", "publish_errors_total",
     "Failed publish attempts to the backbone (retried or not)."),
    ("chat_backbone_outbox_bytes", "gauge", "outbox_bytes",
     "Bytes waiting in the outbox towards the backbone now."),
    ("chat_backbone_outbox_budget_bytes", "gauge", "outbox_budget_bytes",
     "The outbox's byte budget: near it senders are slowed, past it messages are dropped."),
    ("chat_backbone_dropped_messages_total", "counter", "dropped_messages_total",
     "Local messages not published because the outbox was over its budget (other nodes see a gap)."),
    ("chat_backbone_duplicates_total", "counter", "duplicates_total",
     "Entries received again (sequence number already seen) and dropped."),
    ("chat_backbone_gaps_total", "counter", "gaps_total",
     "Unrepairable gaps in another node's sequence; local clients were closed (backbone_gap)."),
    ("chat_backbone_peers", "gauge", "peers",
     "Other nodes heard from recently (this node excluded)."),
    ("chat_backbone_losses_total", "counter", "losses_total",
     "Times the backbone (Redis) was lost, whichever layer noticed (a reconnect follows each)."),
)
_REJECTED_HELP = ("Stream entries rejected unread by reason: fields, node_id, size, frame, control "
                  "(escape sequences or control characters), sequence (a number far ahead of the node's).")

_DISCONNECTS_HELP = ("Connections ended, by reason: exit (client sent exit), closed (client closed), "
                     "error (socket error), slow_consumer (outbound queue over budget), "
                     "memory_budget (largest outbox, all outboxes together over --memory-budget), "
                     "rejected (refused: full, per_host or connect_rate), shutdown (server stopping), "
                     "backbone_gap (the backbone lost messages for this node's clients).")
_BACKLOG_HELP = "Bytes queued for clients but not yet accepted by their sockets, summed over clients."
_LATENCY_HELP = ("Relay latency: from a read's arrival at the server to its messages' frames being "
                 "queued for every recipient (not to the kernel). Observed once per message.")
_BUILD_HELP = "Always 1; the label `version` is the server's VERSION (also `mychatserver.py --version`)."
_ACCEPT_ERRORS_HELP = ("accept() failures by reason: emfile/enfile (out of file descriptors, process/system), "
                       "enobufs/enomem (out of kernel memory), other. The client waits in the backlog.")
_REFUSED_HELP = ("Connections refused with a one-line notice, by reason: full (--max-clients), "
                 "per_host (--max-per-host), connect_rate (--max-connect-rate). Each is also a "
                 "disconnect with reason rejected.")
_DELAY_HELP = ("Backbone delay: from the publishing node's publish time (wall clock) to the "
               "messages being handed to this node's clients. Observed once per message.")


def _scalar(name, kind, help_text, value):
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text)
    if value is not None:
        family.add_metric([], value)
    return family


def _labelled(name, help_text, label, values):
    family = CounterMetricFamily(name, help_text, labels=[label])
    # Every label value is always exposed, 0 included: a series that appears
    # only at its first event would hide that event from increase()/rate().
    for value, count in (values or {}).items():
        family.add_metric([value], count)
    return family


def _histogram(name, help_text, bounds, counts, total):
    family = HistogramMetricFamily(name, help_text, labels=[])
    if bounds is not None:
        counts = list(counts)  # per bucket, NOT cumulative; last is +Inf
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"{name}: {len(bounds)} buckets but {len(counts)} counts")
        # Prometheus buckets are cumulative ("le" = less than or equal). The
        # server files an observation with bisect_left, i.e. into the first
        # bucket whose bound is >= the value: exactly "le" semantics.
        cumulative = itertools.accumulate(counts)
        les = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        family.add_metric([], list(zip(les, cumulative)), total)
    return family


class ChatCollector:
    """A prometheus-client Collector that reads one ChatServer.stats() snapshot per collect()."""

    def __init__(self, server):
        self._server = server

    def describe(self):
        """The families without samples: lets the registry check for name clashes
        at register() time without calling stats() (the server may not be up yet)."""
        return self._families(None)

    def collect(self):
        return self._families(self._server.stats())

    @staticmethod
    def _families(stats):
        get = (lambda key: None) if stats is None else stats.__getitem__
        families = [_scalar(name, kind, help_text, get(key)) for name, kind, key, help_text in _SCALARS]
        families.append(_labelled("chat_disconnects_total", _DISCONNECTS_HELP, "reason",
                                  get("disconnects_total")))
        families.append(_scalar("chat_outbound_backlog_bytes", "gauge", _BACKLOG_HELP,
                                get("outbound_backlog_bytes")))
        families.append(_histogram("chat_relay_latency_seconds", _LATENCY_HELP,
                                   get("relay_latency_buckets"), get("relay_latency_counts"),
                                   get("relay_latency_sum")))
        build = GaugeMetricFamily("chat_build_info", _BUILD_HELP, labels=["version"])
        if stats is not None:
            build.add_metric([stats["version"]], 1)
        families.append(build)
        families += [_scalar(name, kind, help_text, get(key)) for name, kind, key, help_text in _SCALARS_V2]
        families.append(_labelled("chat_accept_errors_total", _ACCEPT_ERRORS_HELP, "reason",
                                  get("accept_errors_total")))
        families += [_scalar(name, kind, help_text, get(key)) for name, kind, key, help_text in _FLOW_AND_LOG]
        families.append(_labelled("chat_refused_connections_total", _REFUSED_HELP, "reason",
                                  get("refused_connections_total")))
        families += [_scalar(name, kind, help_text, get(key)) for name, kind, key, help_text in _STRANGERS]
        backbone = get("backbone")
        if backbone is not None:  # only with --backbone
            families += [_scalar(name, kind, help_text, backbone[key])
                         for name, kind, key, help_text in _BACKBONE_SCALARS]
            families.append(_labelled("chat_backbone_rejected_total", _REJECTED_HELP, "reason",
                                      backbone["rejected_total"]))
            families.append(_histogram("chat_backbone_delay_seconds", _DELAY_HELP,
                                       backbone["delay_buckets"], backbone["delay_counts"],
                                       backbone["delay_sum"]))
        return families


def build_registry(server):
    """A fresh registry with the chat collector and the client library's default
    process, platform (python_info) and GC collectors. Uncached: every
    collect() takes a new stats() snapshot (the HTTP server below caches)."""
    registry = CollectorRegistry()
    registry.register(ChatCollector(server))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, open fds, memory...
    PlatformCollector(registry=registry)  # python_info
    GCCollector(registry=registry)        # python_gc_*
    return registry


# --- the HTTP endpoint ---------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class _Connection:
    """One HTTP connection: reading its request head, then writing one response."""
    __slots__ = ("sock", "request", "response", "deadline", "accepted")

    def __init__(self, sock, now, request_timeout):
        self.sock = sock
        self.request = bytearray()
        self.response = None  # a memoryview of what is left to send, once the request is read
        self.accepted = now
        self.deadline = now + request_timeout


class MetricsHTTPServer:
    """A bounded HTTP/1.1 server for one registry, run by one thread (see the
    module docstring for its bounds). Descriptors: the listener, the selector,
    a wake-up socket pair, and at most MAX_CONNECTIONS connections."""

    def __init__(self, registry, host=DEFAULT_HOST, port=DEFAULT_PORT, *,
                 max_connections=MAX_CONNECTIONS, request_timeout=REQUEST_TIMEOUT,
                 response_timeout=RESPONSE_TIMEOUT, snapshot_window=SNAPSHOT_WINDOW,
                 eviction_grace=EVICTION_GRACE, accept_rate=ACCEPT_RATE):
        self.registry = registry
        self.accept_rate = accept_rate
        self.max_connections = max_connections
        self.eviction_grace = eviction_grace
        self.request_timeout = request_timeout
        self.response_timeout = response_timeout
        self.snapshot_window = snapshot_window
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dual_stack = host == "::" and socket.has_dualstack_ipv6()  # "::" takes IPv4 too
        self._listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG,
                                              dualstack_ipv6=dual_stack)
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()[:2]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        # Open connections, oldest first (insertion order = accept order).
        self._connections = collections.OrderedDict()  # socket -> _Connection
        self._accepting = True  # the listener is registered with the selector
        self._backoff_until = 0.0  # after EMFILE: not before this (monotonic)
        self._tokens = float(max_connections)  # the accept rate's token bucket
        self._tokens_time = time.monotonic()
        self._running = True
        self._body = b""
        self._body_time = float("-inf")
        self.expositions = 0  # how many times the registry was collected (tests, README)
        self.scrapes = 0      # responses with status 200

    def serve_forever(self):
        try:
            while self._running:
                for key, events in self._selector.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_reader:
                        self._running = False
                    else:
                        self._service(key.data, events)
                self._expire()
                self._watch_listener()
        finally:
            for connection in list(self._connections.values()):
                self._close(connection)
            self._selector.close()
            self._listener.close()
            self._wake_reader.close()

    def shutdown(self):
        """Thread-safe: make serve_forever() return (at once, via the wake-up socket)."""
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass  # already woken or closed

    def server_close(self):
        self._wake_writer.close()

    # Called by the loop thread only, so none of the state needs a lock.

    def _timeout(self):
        """Seconds until the next deadline, or until a newcomer may be accepted."""
        now = time.monotonic()
        times = [c.deadline for c in self._connections.values()]
        if not self._accepting:
            times.append(self._accept_time(now))
        times = [t for t in times if t != float("inf")]
        return max(0.0, min(times) - now) if times else None

    def _next_eviction(self):
        """When the oldest connection still waiting for its request may be evicted
        (inf if every connection is being answered)."""
        for connection in self._connections.values():  # oldest first
            if connection.response is None:
                return connection.accepted + self.eviction_grace
        return float("inf")

    def _accept_time(self, now):
        """The earliest time a newcomer may be accepted: not during an EMFILE
        backoff, not without a token, and at the limit not before a connection
        may be evicted (inf: only once one ends)."""
        self._tokens = min(float(self.max_connections),
                           self._tokens + (now - self._tokens_time) * self.accept_rate)
        self._tokens_time = now
        earliest = max(self._backoff_until, now + max(0.0, 1.0 - self._tokens) / self.accept_rate)
        if len(self._connections) >= self.max_connections:
            earliest = max(earliest, self._next_eviction())
        return earliest

    def _may_accept(self, now):
        return self._accept_time(now) <= now

    def _watch_listener(self):
        """Watch the listener only while a newcomer could be taken: otherwise it
        waits in the kernel's backlog and the loop does not spin on it."""
        want = self._may_accept(time.monotonic())
        if want != self._accepting:
            if want:
                self._selector.register(self._listener, selectors.EVENT_READ)
            else:
                self._selector.unregister(self._listener)
            self._accepting = want

    def _accept(self):
        while self._may_accept(time.monotonic()):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the chat listener needs them more.
                    # Stop accepting for a moment instead of spinning.
                    self._backoff_until = time.monotonic() + ACCEPT_BACKOFF
                    return
                continue  # e.g. ECONNABORTED
            now = time.monotonic()
            self._tokens -= 1.0
            if len(self._connections) >= self.max_connections:
                oldest_waiting = next(c for c in self._connections.values() if c.response is None)
                self._close(oldest_waiting)  # _may_accept() saw it past its grace
            sock.setblocking(False)
            connection = _Connection(sock, now, self.request_timeout)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _expire(self):
        now = time.monotonic()
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            self._close(connection)

    def _close(self, connection):
        self._connections.pop(connection.sock, None)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    def _service(self, connection, events):
        try:
            if connection.response is None:
                data = connection.sock.recv(4096)
                if not data:
                    self._close(connection)  # gave up before asking
                    return
                connection.request += data
                self._maybe_respond(connection)
            if connection.response is not None:
                sent = connection.sock.send(connection.response)
                connection.response = connection.response[sent:]
                if not connection.response:
                    self._close(connection)  # one request per connection
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(connection)  # reset by the client, etc.

    def _maybe_respond(self, connection):
        head_end = connection.request.find(b"\r\n\r\n")
        if head_end < 0:
            if len(connection.request) > MAX_REQUEST_BYTES:
                self._respond(connection, 431, b"Request head too long\n")
            return
        request_line = bytes(connection.request[:connection.request.find(b"\r\n")])
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._respond(connection, 400, b"Bad request\n")
        elif parts[0] not in (b"GET", b"HEAD"):
            self._respond(connection, 405, b"Only GET and HEAD\n")
        else:
            try:
                body = self._exposition()
            except Exception as exc:  # a broken snapshot must not kill the endpoint
                log.warning("Metrics scrape failed: %r", exc)
                self._respond(connection, 500, f"Cannot collect metrics: {exc!r}\n".encode())
                return
            self.scrapes += 1
            self._respond(connection, 200, body, head_only=parts[0] == b"HEAD",
                          content_type=CONTENT_TYPE_PLAIN_0_0_4)

    def _exposition(self):
        """One exposition per snapshot window, the same bytes for every scrape in it."""
        now = time.monotonic()
        if now - self._body_time >= self.snapshot_window:
            self._body = generate_latest(self.registry)
            self._body_time = time.monotonic()
            self.expositions += 1
        return self._body

    def _respond(self, connection, status, body, head_only=False, content_type="text/plain; charset=utf-8"):
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        connection.response = memoryview(head if head_only else head + body)
        connection.deadline = time.monotonic() + self.response_timeout
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)


class MetricsExporter:
    """A running /metrics endpoint. `port` is the bound port (useful with port 0);
    stop() shuts the HTTP server down, closes its sockets and joins its thread."""

    def __init__(self, httpd, thread, registry):
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        self.host, self.port = httpd.server_address[:2]
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def httpd(self):
        return self._httpd

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout=5.0):
        """Idempotent; returns at once (the loop is woken by a socket, not polled)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._thread.join(timeout)
        self._httpd.server_close()


def start_metrics_server(server, port=DEFAULT_PORT, host=DEFAULT_HOST, **bounds):
    """Serve `server`'s metrics on http://host:port/metrics from a daemon thread.

    Raises OSError if the address cannot be bound (mychatserver.main reports it).
    Every path is served the same exposition (GET or HEAD); Prometheus scrapes
    /metrics. `bounds` overrides MetricsHTTPServer's limits (tests).
    """
    registry = build_registry(server)
    httpd = MetricsHTTPServer(registry, host, port, **bounds)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsExporter(httpd, thread, registry)
