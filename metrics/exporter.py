"""The chat server's Prometheus endpoint: /metrics over HTTP, built on prometheus-client.

Why it exists: the design card asks for connection and message counters on an
optional Prometheus endpoint. a2/mychatserver.py imports this module only when
started with --metrics-port, so without the flag the server stays stdlib-only.

Why a custom Collector instead of Counter/Gauge/Histogram objects: the relay's
hot path must stay cheap. The server already counts everything in plain
per-connection integers, each written by exactly one thread (no lock, no lost
increment), and folds a departed connection's counts into its totals. Calling
prometheus-client on every message or delivery would add a lock acquisition per
call; instead nothing happens per message here at all. At scrape time
ChatCollector.collect() takes ONE snapshot, ChatServer.stats() (exact, taken
under the server's lock, O(number of connections)), and translates it into
metric families. That is the issue's "no-op by default, counting in batches":
with no scraper, the metrics cost nothing beyond the integer additions the
server does anyway; a delivery is counted once per fan-out (+= recipients),
not once per recipient.

The registry is our own CollectorRegistry, not prometheus-client's global
REGISTRY: two servers in one process (the tests) must not share or clash, and
importing this module must not register anything as a side effect.
"""

import itertools
import threading

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

DEFAULT_HOST = "127.0.0.1"  # loopback: the endpoint is not reachable off this machine unless asked
DEFAULT_PORT = 9100         # the port metrics/prometheus.yml and metrics/README.md use

# Every family this collector exposes, in exposition order. Tests and the
# README check against this list, so a renamed metric cannot go unnoticed.
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
)

# (name, type, stats() key, help). The help text is what an operator reads in
# Prometheus' UI, so it says exactly what is counted and what is not.
_SCALARS = (
    ("chat_connections_total", "counter", "connections_total",
     "TCP connections accepted, including ones then refused because the server was full."),
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

_DISCONNECTS_HELP = ("Connections ended, by reason: exit (client sent exit), closed (client closed), "
                     "error (socket error), slow_consumer (outbound queue over budget), "
                     "rejected (server full), shutdown (server stopping).")
_BACKLOG_HELP = "Bytes queued for clients but not yet accepted by their sockets, summed over clients."
_LATENCY_HELP = ("Relay latency: from a read's arrival at the server to its messages' frames being "
                 "queued for every recipient (not to the kernel). Observed once per message.")


class ChatCollector:
    """A prometheus-client Collector that reads one ChatServer.stats() snapshot per scrape."""

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
        families = []
        for name, kind, key, help_text in _SCALARS:
            family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_class(name, help_text)
            if stats is not None:
                family.add_metric([], stats[key])
            families.append(family)

        disconnects = CounterMetricFamily("chat_disconnects_total", _DISCONNECTS_HELP, labels=["reason"])
        if stats is not None:
            # Every reason is always exposed, 0 included: a series that appears
            # only at its first drop would hide that drop from increase()/rate(),
            # and the slow-consumer alert is built on increase().
            for reason, count in stats["disconnects_total"].items():
                disconnects.add_metric([reason], count)
        families.append(disconnects)

        backlog = GaugeMetricFamily("chat_outbound_backlog_bytes", _BACKLOG_HELP)
        if stats is not None:
            backlog.add_metric([], stats["outbound_backlog_bytes"])
        families.append(backlog)

        latency = HistogramMetricFamily("chat_relay_latency_seconds", _LATENCY_HELP, labels=[])
        if stats is not None:
            bounds = stats["relay_latency_buckets"]
            counts = stats["relay_latency_counts"]  # per bucket, NOT cumulative; last is +Inf
            if len(counts) != len(bounds) + 1:
                raise ValueError(f"{len(bounds)} latency buckets but {len(counts)} counts")
            # Prometheus buckets are cumulative ("le" = less than or equal).
            # The server files an observation with bisect_left, i.e. into the
            # first bucket whose bound is >= the value: exactly "le" semantics.
            cumulative = itertools.accumulate(counts)
            les = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
            latency.add_metric([], list(zip(les, cumulative)), stats["relay_latency_sum"])
        families.append(latency)
        return families


class MetricsExporter:
    """A running /metrics endpoint. `port` is the bound port (useful with port 0);
    stop() shuts the HTTP server down, closes its socket and joins its thread."""

    def __init__(self, httpd, thread, registry):
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        self.host, self.port = httpd.server_address[:2]
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout=5.0):
        """Idempotent. shutdown() returns once serve_forever() has left its
        loop (it polls every 0.5 s), so this takes at most about half a second."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


def build_registry(server):
    """A fresh registry with the chat collector and the client library's default
    process, platform (python_info) and GC collectors."""
    registry = CollectorRegistry()
    registry.register(ChatCollector(server))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, open fds, memory...
    PlatformCollector(registry=registry)  # python_info
    GCCollector(registry=registry)        # python_gc_*
    return registry


def start_metrics_server(server, port=DEFAULT_PORT, host=DEFAULT_HOST):
    """Serve `server`'s metrics on http://host:port/metrics from a daemon thread.

    Raises OSError if the address cannot be bound (mychatserver.main reports it).
    Every path is served the same exposition; Prometheus scrapes /metrics.
    """
    registry = build_registry(server)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    thread.name = "metrics-http"
    return MetricsExporter(httpd, thread, registry)
