"""The Redis Streams backbone: one chat room shared by several relay nodes.

Why it exists: one a2/mychatserver.py process holds one room. With
`--backbone redis://HOST:PORT/DB` it becomes one node of a room shared over a
Redis stream: what its clients send goes to its own clients directly (the
server's sender, never through Redis) and, through this module, to the
stream; what the other nodes put in the stream goes to its clients. The
server imports this module only with the flag (a2/ stays stdlib-only).

Who owns what (the threads, and what each alone touches):
* the server's reader threads call publish(): they append whole frames to
  the *outbox* (bounded in bytes, guarded by `_cond`'s lock) and never touch
  Redis. Near the budget they wait, bounded (flow control, like the core's);
  past it the messages are dropped and a sequence number is burnt, so every
  other node sees the gap instead of missing it silently.
* the publisher thread alone owns the publishing Redis connection and the
  node's sequence numbers: it takes the outbox in rounds, packs many frames
  per entry, and XADDs a round's entries in one pipeline (MAXLEN ~ trims the
  stream). An entry stays in the outbox until Redis acknowledged it; after
  an error it is resent with the same number (at least once; the readers
  drop the duplicate). When idle it XADDs a heartbeat about every second
  carrying its last number.
* the reader thread alone owns the reading Redis connection, the last stream
  ID read and the SequenceTracker (cluster/sequence.py): XREAD BLOCK COUNT
  from the last ID; each entry is delivered (server.relay_remote), dropped
  as a duplicate, or shows a gap, after which every local client is closed
  with server.disconnect_all("backbone_gap"): never a silent gap. After a
  reconnect it resumes from the last ID; if the stream went backwards (Redis
  replaced or emptied) it says so and re-reads what the stream holds, the
  sequence numbers sorting out what was already delivered.
* redis-py is used synchronously, one connection per thread, with its own
  retries off: this module owns the loops, the reconnect backoff and the
  resend (redis-py's run_in_thread and pub/sub lose messages; see
  ../shared/spec/cluster.md).

Wire format and guarantees: cluster/README.md. Hidden options, in the URL's
query (removed before redis-py sees it): `stream=NAME`, `maxlen=ENTRIES`
(the retention; tests use a small one), `outbox=BYTES` (the budget).
"""

import bisect
import collections
import logging
import os
import threading
import time
import urllib.parse

from cluster.sequence import DEFAULT_FORGET_AFTER, SequenceTracker

log = logging.getLogger("mychatserver.backbone")  # the server's handlers print it

# --- Limits. Each says why it has its value and what it relates to. ---

DEFAULT_STREAM = "chat:room"
# Stream retention, in entries (MAXLEN ~: Redis trims whole nodes, so a little
# more stays). At 1,000 entries/s (up to 256 messages each) that is 100 s: a
# node paused or cut off for longer than that cannot catch up and closes its
# clients with backbone_gap.
DEFAULT_MAXLEN = 100_000
# Bytes of frames waiting to reach Redis (acknowledged entries leave it). 4 MiB
# is ~50,000 typical messages, seconds of a busy room during an outage.
DEFAULT_OUTBOX_BUDGET = 4 * 1024 * 1024
# From this fill on, publish() makes the sender wait (bounded) while Redis is
# reachable: a sender faster than Redis is slowed before anything is dropped.
# During an outage nobody waits: the local room goes on, the outbox fills.
FLOW_CONTROL_FRACTION = 0.75
FLOW_CONTROL_WAIT = 1.0        # seconds, at most, per publish() call
# One entry carries at most this many frames / bytes: per-entry costs (one
# XADD, one XREAD item, one relay_remote) are paid per batch, not per message
# (cluster.md: 1 message per entry caps a node near 3k msg/s, 50 near 135k).
ENTRY_MAX_MESSAGES = 256
ENTRY_MAX_BYTES = 64 * 1024
ROUND_MAX_ENTRIES = 64         # entries per pipelined round trip
HEARTBEAT_INTERVAL = 1.0       # seconds without an entry before a heartbeat
FORGET_AFTER = DEFAULT_FORGET_AFTER  # seconds of stream time; a silent peer is forgotten
READ_COUNT = 1024              # entries per XREAD
READ_BLOCK_MS = 100            # XREAD BLOCK: also how soon the reader sees stop()
SOCKET_TIMEOUT = 2.0           # seconds; > READ_BLOCK_MS, so a hung Redis is noticed
CONNECT_TIMEOUT = 1.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # seconds between reconnection attempts, doubling
STOP_JOIN = 0.2                # seconds per thread in stop() (stop() returns within ~0.5 s)

# Backbone delay histogram (publish() on the sending node to relay_remote() here),
# the buckets the metrics exporter expects (0.1 exactly: the p99 > 100 ms alert).
DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The fields of an entry (cluster/README.md, "Wire format").
F_NODE, F_SEQ, F_COUNT, F_TIME, F_FRAMES = b"n", b"s", b"c", b"t", b"f"

_DROPPED = None  # an outbox item: messages dropped here (burns one sequence number)


def parse_url(url):
    """Split our options off the URL's query: (redis URL, stream, maxlen,
    outbox budget). Raises ValueError for a bad URL or option."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"backbone URL must start with redis://, rediss:// or unix://, got {url!r}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in query if key in ("stream", "maxlen", "outbox")}
    rest = [(key, value) for key, value in query if key not in ours]
    stream = ours.get("stream", DEFAULT_STREAM)
    try:
        maxlen = int(ours.get("maxlen", DEFAULT_MAXLEN))
        budget = int(ours.get("outbox", DEFAULT_OUTBOX_BUDGET))
    except ValueError:
        raise ValueError(f"backbone URL: maxlen and outbox must be integers: {url!r}") from None
    if maxlen < 1 or budget < 1 or not stream:
        raise ValueError(f"backbone URL: maxlen and outbox must be >= 1, stream non-empty: {url!r}")
    redis_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return redis_url, stream, maxlen, budget


def _redacted(url):
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def _stream_seconds(entry_id):
    """An entry ID's time part (ms since the epoch, Redis's clock) in seconds."""
    return int(entry_id.split(b"-", 1)[0]) / 1000.0


def _id_tuple(entry_id):
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class Backbone:
    """One node's link to the shared stream. start(), publish(), stats(), stop()."""

    def __init__(self, server, url, node_port=None):
        import redis  # here, not at the top: a missing package is an ImportError from start_backbone
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self._redis = redis
        self.server = server
        self.redis_url, self.stream, self.maxlen, self.budget = parse_url(url)
        self.node_port = node_port
        self.node_id = os.urandom(8).hex().encode()  # random per process start
        self._high_water = int(self.budget * FLOW_CONTROL_FRACTION)
        options = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                       retry=Retry(NoBackoff(), 0), health_check_interval=0)
        try:
            from redis.maint_notifications import MaintNotificationsConfig
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        except ImportError:
            pass  # older redis-py: no such handshake
        # One client (and so one connection) per thread; from_url checks the URL, no I/O yet.
        self._publisher_redis = redis.Redis.from_url(self.redis_url, **options)
        self._reader_redis = redis.Redis.from_url(self.redis_url, **options)
        self._stopping = threading.Event()
        # The outbox and every counter below: guarded by _cond's lock.
        self._cond = threading.Condition(threading.Lock())
        self._outbox = collections.deque()  # (frames, count, publish time) or _DROPPED
        self._outbox_bytes = 0               # queued + in flight, until Redis acknowledged
        self._link = {"publisher": False, "reader": False}
        self._ever_connected = False
        self._warned_unreachable = False
        self._run_id = None  # Redis's INFO run_id at the reader's last connect (new on a restart)
        self._down_since = None
        self._stats = dict.fromkeys(
            ("entries_out_total", "messages_out_total", "entries_in_total", "messages_in_total",
             "reconnects_total", "publish_errors_total", "dropped_messages_total",
             "duplicates_total", "gaps_total"), 0)
        self._delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        self._delay_sum = 0.0
        self._peers = 0
        self._threads = [threading.Thread(target=self._publish_loop, name="backbone-publisher", daemon=True),
                         threading.Thread(target=self._read_loop, name="backbone-reader", daemon=True)]

    # --- the server's side -------------------------------------------------------

    def start(self):
        log.info("Backbone: node %s (port %s) on %s, stream %r", self.node_id.decode(),
                 self.node_port, _redacted(self.redis_url), self.stream)
        for thread in self._threads:
            thread.start()
        return self

    def publish(self, port, messages):
        """Queue a local client's messages for the other nodes (its reader
        thread calls this). Never raises; waits at most FLOW_CONTROL_WAIT."""
        try:
            blob = b"".join([f"{port}: {message}\n".encode() for message in messages])
            now = time.time()
            with self._cond:
                if self._outbox_bytes >= self._high_water and self._connected():
                    deadline = time.monotonic() + FLOW_CONTROL_WAIT
                    while (self._outbox_bytes >= self._high_water and self._connected()
                           and not self._stopping.is_set()):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                if self._outbox_bytes + len(blob) > self.budget:
                    self._stats["dropped_messages_total"] += len(messages)
                    if not self._outbox or self._outbox[-1] is not _DROPPED:
                        self._outbox.append(_DROPPED)
                        log.warning("Backbone: outbox over its budget (%d bytes): dropping messages; "
                                    "the other nodes will see a gap", self.budget)
                    return
                self._outbox.append((blob, len(messages), now))
                self._outbox_bytes += len(blob)
                self._cond.notify_all()
        except Exception:  # never let the backbone break a client's reader
            log.exception("Backbone: publish failed")

    def stats(self):
        """The exact dict metrics/exporter.py reads (/work/briefs/backbone-stats.md)."""
        with self._cond:
            return {
                "connected": self._connected(),
                **self._stats,
                "outbox_bytes": self._outbox_bytes,
                "outbox_budget_bytes": self.budget,
                "peers": self._peers,
                "delay_buckets": DELAY_BUCKETS,
                "delay_counts": list(self._delay_counts),
                "delay_sum": self._delay_sum,
            }

    def stop(self):
        """Stop both threads (returns within ~0.5 s); what is still in the
        outbox is not published (this node's clients are being closed)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(STOP_JOIN)
        for client in (self._publisher_redis, self._reader_redis):
            try:
                client.close()
            except Exception:
                pass

    # --- connection state ----------------------------------------------------------

    def _connected(self):
        return self._link["publisher"] and self._link["reader"]

    def _set_link(self, which, up, error=None):
        """Record one thread's connection state; log the node's transitions once."""
        with self._cond:
            was = self._connected()
            if self._link[which] == up:
                return
            self._link[which] = up
            now = self._connected()
            if now and not was:
                if self._ever_connected:
                    self._stats["reconnects_total"] += 1
                    log.info("Backbone: reconnected to Redis after %.1fs", time.monotonic() - self._down_since)
                else:
                    log.info("Backbone: connected to Redis")
                self._ever_connected = True
                self._down_since = None
            elif was and not now:
                self._down_since = time.monotonic()
                log.warning("Backbone: lost Redis (%s); the local room goes on, reconnecting",
                            error or "error")
            self._cond.notify_all()

    def _failed(self, which, exc, backoff, client):
        """After a Redis error: mark the link down, drop the connection, back off."""
        with self._cond:
            first = not self._ever_connected and not self._warned_unreachable
            self._warned_unreachable = True
        if first:
            log.warning("Backbone: cannot reach Redis (%s); the local room goes on, retrying", exc)
        self._set_link(which, False, exc)
        try:
            client.connection_pool.disconnect()
        except Exception:
            pass
        self._stopping.wait(backoff)
        return min(backoff * 2, BACKOFF_MAX)

    # --- publisher thread ----------------------------------------------------------

    def _publish_loop(self):
        redis = self._redis
        client = self._publisher_redis
        seq = 0               # this node's last sequence number (used or burnt)
        inflight = []         # [(fields, message count, bytes)] sent, not yet acknowledged
        last_sent = 0.0       # time.monotonic() of the last acknowledged round
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            if not inflight:
                with self._cond:
                    while not self._outbox and not self._stopping.is_set():
                        remaining = last_sent + HEARTBEAT_INTERVAL - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    inflight, seq = self._take_round(seq)
            entries = inflight or [({F_NODE: self.node_id, F_SEQ: seq, F_COUNT: 0,
                                     F_TIME: repr(time.time())}, 0, 0)]
            try:
                pipe = client.pipeline(transaction=False)
                for fields, _, _ in entries:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                pipe.execute()
            except Exception as exc:  # RedisError; or stop() closed the connection under us
                if self._stopping.is_set():
                    break
                if not isinstance(exc, redis.RedisError):
                    log.warning("Backbone: unexpected publish error: %r", exc)
                with self._cond:
                    self._stats["publish_errors_total"] += 1
                backoff = self._failed("publisher", exc, backoff, client)
                continue  # the same entries again, same numbers: readers drop what arrived twice
            backoff = BACKOFF_MIN
            self._set_link("publisher", True)
            last_sent = time.monotonic()
            with self._cond:
                self._stats["entries_out_total"] += len(entries)
                self._stats["messages_out_total"] += sum(count for _, count, _ in entries)
                self._outbox_bytes -= sum(size for _, _, size in entries)
                self._cond.notify_all()  # senders waiting for room
            inflight = []

    def _take_round(self, seq):
        """Under _cond: pack the outbox into at most ROUND_MAX_ENTRIES entries,
        numbering them from seq + 1; a _DROPPED mark burns a number. Returns
        (entries, last number)."""
        entries = []
        frames, count, size, first_time = [], 0, 0, None

        def close():
            nonlocal seq, frames, count, size, first_time
            if count:
                seq += 1
                entries.append(({F_NODE: self.node_id, F_SEQ: seq, F_COUNT: count,
                                 F_TIME: repr(first_time), F_FRAMES: b"".join(frames)}, count, size))
            frames, count, size, first_time = [], 0, 0, None

        outbox = self._outbox
        while outbox and len(entries) < ROUND_MAX_ENTRIES:
            item = outbox[0]
            if item is _DROPPED:
                close()
                seq += 1  # never published: the others see this number missing
                outbox.popleft()
                continue
            blob, messages, published = item
            if count and (count + messages > ENTRY_MAX_MESSAGES or size + len(blob) > ENTRY_MAX_BYTES):
                close()
                continue
            outbox.popleft()
            frames.append(blob)
            count += messages
            size += len(blob)
            if first_time is None:
                first_time = published
        close()
        return entries, seq

    # --- reader thread -------------------------------------------------------------

    def _read_loop(self):
        redis = self._redis
        client = self._reader_redis
        tracker = SequenceTracker(forget_after=FORGET_AFTER)
        last_id = None       # the last stream ID read; None until the first connect
        fresh = True         # (re)connected: check the stream before reading on
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            try:
                if fresh:
                    last_id = self._resume_point(client, last_id)
                    fresh = False
                    self._set_link("reader", True)
                    backoff = BACKOFF_MIN
                reply = client.xread({self.stream: last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
            except Exception as exc:  # RedisError; or stop() closed the connection under us
                if self._stopping.is_set():
                    break
                if not isinstance(exc, redis.RedisError):
                    log.warning("Backbone: unexpected read error: %r", exc)
                fresh = True
                backoff = self._failed("reader", exc, backoff, client)
                continue
            if self._stopping.is_set():
                break
            for _, entries in reply or ():
                if entries:
                    try:
                        self._receive(entries, tracker)
                    except Exception:  # a bug, never a silent stop: say so, read on
                        log.exception("Backbone: delivering %d entries failed", len(entries))
                    last_id = entries[-1][0]

    def _resume_point(self, client, last_id):
        """Where to read from after a (re)connect: the stream's end on the first
        connect (a node joins the room now), else the last ID read. The stream
        went backwards (Redis replaced, or restarted without all its data) when
        it is gone, ends before that ID, or - on a Redis with a new run_id - no
        longer holds that entry: say so, and read on from where the stream now
        ends (what was lost shows as gaps in the sequence numbers; re-reading
        older entries would replay another Redis's history)."""
        run_id = client.info("server").get("run_id")
        restarted, self._run_id = self._run_id not in (None, run_id), run_id
        try:
            newest = client.xinfo_stream(self.stream)["last-generated-id"]
        except self._redis.ResponseError:  # no such stream (yet)
            newest = None
        if last_id in (None, b"0-0"):  # nothing read yet: join at the end
            return newest or b"0-0"
        if newest is not None and _id_tuple(newest) >= _id_tuple(last_id):
            if not (restarted and not client.xrange(self.stream, last_id, last_id, count=1)):
                return last_id
            resume = last_id  # emptied, then written again: everything after last_id is new
        else:
            resume = newest or b"0-0"
        log.warning("Backbone: the stream went backwards (Redis replaced or emptied; this node "
                    "had read up to %s, the stream now ends at %s): reading on from %s, "
                    "sequence numbers tell what was lost", last_id.decode(),
                    (newest or b"nothing").decode(), resume.decode())
        return resume

    def _receive(self, entries, tracker):
        """Deliver one XREAD's entries in order; a gap closes the local clients."""
        frames, count, delays = [], 0, []
        entries_in = duplicates = gaps = 0
        stream_time = None
        for entry_id, fields in entries:
            stream_time = _stream_seconds(entry_id)
            try:
                node = fields[F_NODE]
                seq, messages = int(fields[F_SEQ]), int(fields[F_COUNT])
                published = float(fields[F_TIME])
                data = fields.get(F_FRAMES, b"")
            except (KeyError, ValueError) as exc:
                log.warning("Backbone: ignoring a malformed entry %s (%r)", entry_id.decode(), exc)
                continue
            if node == self.node_id:
                continue  # our own: our clients had it directly
            verdict = tracker.observe(node, seq, messages == 0, stream_time)
            if verdict.duplicate:
                duplicates += 1
                continue
            entries_in += 1
            if verdict.new_peer:
                log.info("Backbone: hearing node %s", node.decode())
            if verdict.missing:
                gaps += 1
                self._deliver(frames, count, delays)  # what came before the gap, first
                frames, count, delays = [], 0, []
                log.warning("Backbone: gap: %d entr%s from node %s cannot arrive; closing local "
                            "clients (backbone_gap)", verdict.missing,
                            "y" if verdict.missing == 1 else "ies", node.decode())
                self.server.disconnect_all("backbone_gap")
            if verdict.deliver and data:
                frames.append(data)
                count += messages
                delays.append((published, messages))
        self._deliver(frames, count, delays)
        for node in tracker.expire(stream_time) if stream_time is not None else ():
            log.info("Backbone: node %s silent for %.0fs: forgotten", node.decode(), tracker.forget_after)
        with self._cond:
            self._stats["entries_in_total"] += entries_in
            self._stats["duplicates_total"] += duplicates
            self._stats["gaps_total"] += gaps
            self._peers = tracker.peers

    def _deliver(self, frames, count, delays):
        if not count:
            return
        self.server.relay_remote(b"".join(frames), count)
        now = time.time()
        with self._cond:
            self._stats["messages_in_total"] += count
            for published, messages in delays:
                delay = max(0.0, now - published)  # clock skew between machines: filed as 0
                self._delay_counts[bisect.bisect_left(DELAY_BUCKETS, delay)] += messages
                self._delay_sum += delay * messages


def start_backbone(server, url, node_port=None):
    """Connect `server` (a2/mychatserver.py's ChatServer) to the room's stream:
    returns the started Backbone (publish/stats/stop). Raises ImportError
    without the `redis` package, ValueError for a bad URL. Redis being down
    is not an error: the node serves its local room and keeps reconnecting."""
    return Backbone(server, url, node_port).start()
