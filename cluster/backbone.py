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

* nothing read is trusted (cluster/validate.py): an entry is delivered
  exactly as published or rejected whole (logged once per kind, counted in
  rejected_total); a peer's number far ahead of what it can have published
  is rejected, not adopted.
* every loss of Redis and every recovery is one log line and a count
  (losses_total, reconnects_total), whichever layer reconnected: a connect
  hook counts each connection redis-py opens, so its own silent reconnect
  (a pooled connection found dead and replaced) is seen and treated as a
  loss, and the reader checks the stream again before reading on.

The URL, the secrets from the environment, Sentinel and the fail-fast
check: cluster/config.py. Wire format and guarantees: cluster/README.md.
Hidden options, in the URL's query (removed before redis-py sees it):
`stream=NAME`, `maxlen=ENTRIES` (the retention; tests use a small one),
`outbox=BYTES` (the budget).
"""

import bisect
import collections
import logging
import os
import threading
import time

from cluster.config import (BackboneConfig, BackboneConfigError, close_client, describe, fatal_reason,
                            redact)
from cluster.sequence import DEFAULT_FORGET_AFTER, SequenceTracker
from cluster.validate import REJECT_REASONS, JumpGuard, Rejected, Rescue, check_entry, show_node

log = logging.getLogger("mychatserver.backbone")  # the server's handlers print it


class _Redacting(logging.Filter):
    """Every line this module logs, traceback included, goes through redact():
    a secret cannot reach a log even by way of an exception's text."""

    def filter(self, record):
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


log.addFilter(_Redacting())

# --- Limits. Each says why it has its value and what it relates to. ---

DEFAULT_STREAM = "chat:room"
# Stream retention, in entries (MAXLEN ~: Redis trims whole nodes, so a little
# more stays). With entries of at most ENTRY_MAX_BYTES this bounds the
# stream's memory in bytes: Redis keeps a 16 KiB entry in 20.75 KB (jemalloc
# rounds its node up to 20 KiB), so 10,000 (+ at most 100 past MAXLEN ~) full
# entries take ~200 MiB: STREAM_MEMORY_BOUND, checked by a test that fills
# the stream. In time: 10,000 one-message entries at 100 msg/s is 100 s; a
# busy room packs more per entry. A node paused or cut off for longer than
# the retention cannot catch up and closes its clients with backbone_gap.
DEFAULT_MAXLEN = 10_000
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
ENTRY_MAX_BYTES = 16 * 1024    # frames per entry; readers reject a larger one
STREAM_MEMORY_BOUND = 256 * 1024 * 1024  # the stream's worst case with the defaults (see DEFAULT_MAXLEN)
ROUND_MAX_ENTRIES = 64         # entries per pipelined round trip
HEARTBEAT_INTERVAL = 1.0       # seconds without an entry before a heartbeat
FORGET_AFTER = DEFAULT_FORGET_AFTER  # seconds of stream time; a silent peer is forgotten
READ_COUNT = 1024              # entries per XREAD
READ_BLOCK_MS = 100            # XREAD BLOCK: also how soon the reader sees stop()
SOCKET_TIMEOUT = 2.0           # seconds; > READ_BLOCK_MS, so a hung Redis is noticed
CONNECT_TIMEOUT = 1.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # seconds between reconnection attempts, doubling
STOP_JOIN = 0.2                # seconds per thread in stop() (stop() returns within ~0.5 s)
REJECT_LOG_INTERVAL = 10.0     # seconds: rejected entries of one kind, after the first, are summed up

# Backbone delay histogram (publish() on the sending node to relay_remote() here),
# the buckets the metrics exporter expects (0.1 exactly: the p99 > 100 ms alert).
DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The fields of an entry (cluster/README.md, "Wire format").
F_NODE, F_SEQ, F_COUNT, F_TIME, F_FRAMES = b"n", b"s", b"c", b"t", b"f"

_DROPPED = None  # an outbox item: messages dropped here (burns one sequence number)


def parse_url(url, env=None):
    """Split our options off a plain redis://, rediss:// or unix:// URL:
    (redis URL, stream, maxlen, outbox budget). Raises BackboneConfigError
    (a ValueError, its message redacted) for a bad URL or option."""
    config = BackboneConfig(url, {} if env is None else env, "--backbone")
    if config.kind != "redis":
        raise BackboneConfigError(f"{config.shown}: not a plain Redis URL")
    return config.redis_url, config.stream, config.maxlen, config.budget


def _stream_seconds(entry_id):
    """An entry ID's time part (ms since the epoch, Redis's clock) in seconds."""
    return int(entry_id.split(b"-", 1)[0]) / 1000.0


def _id_tuple(entry_id):
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class Backbone:
    """One node's link to the shared stream. start(), publish(), stats(), stop()."""

    def __init__(self, server, url, node_port=None, env=None, source="--backbone"):
        import redis  # here, not at the top: a missing package is an ImportError from start_backbone
        self._redis = redis
        self.server = server
        self.config = BackboneConfig(url, os.environ if env is None else env, source)
        self.stream, self.maxlen, self.budget = self.config.stream, self.config.maxlen, self.config.budget
        self.node_port = node_port
        self.node_id = os.urandom(8).hex().encode()  # random per process start
        self._high_water = int(self.budget * FLOW_CONTROL_FRACTION)
        # Connections redis-py opened for each thread's client (the connect
        # hook below counts them): a change the thread did not ask for is
        # redis-py's silent reconnect, reported as a loss and a recovery.
        self._connects = {"publisher": 0, "reader": 0}
        # One client (and so one connection) per thread; no I/O yet.
        self._publisher_redis = self.config.client(self._options("publisher"))
        self._reader_redis = self.config.client(self._options("reader"))
        self._stopping = threading.Event()
        # The outbox and every counter below: guarded by _cond's lock.
        self._cond = threading.Condition(threading.Lock())
        self._outbox = collections.deque()  # (frames, count, publish time) or _DROPPED
        self._outbox_bytes = 0               # queued + in flight, until Redis acknowledged
        self._link = {"publisher": False, "reader": False}
        self._ever_connected = False
        self._warned_unreachable = False
        self._fatal_logged = set()  # runtime refusals (credentials, ACL) already logged since the last connect
        self._run_id = None  # Redis's INFO run_id at the reader's last connect (new on a restart)
        self._down_since = None
        self._stats = dict.fromkeys(
            ("entries_out_total", "messages_out_total", "entries_in_total", "messages_in_total",
             "reconnects_total", "losses_total", "publish_errors_total", "dropped_messages_total",
             "duplicates_total", "gaps_total"), 0)
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._reject_log = {}  # reason -> [time of its last log line, rejections not logged since]
        self._delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        self._delay_sum = 0.0
        self._peers = 0
        self._guard = JumpGuard()  # the reader's
        self._rescue = Rescue()    # the reader's
        self._threads = [threading.Thread(target=self._publish_loop, name="backbone-publisher", daemon=True),
                         threading.Thread(target=self._read_loop, name="backbone-reader", daemon=True)]

    def _options(self, which):
        """redis-py options for one thread's client: our timeouts, redis-py's
        retries off (these loops own them), and the connect hook."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        options = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                       retry=Retry(NoBackoff(), 0), health_check_interval=0)
        if which is not None:
            def connected(connection):
                connection.on_connect()  # what redis-py does without a hook: AUTH, SELECT...
                self._connects[which] += 1  # only this thread's client connects this pool
            options["redis_connect_func"] = connected
        try:
            from redis.maint_notifications import MaintNotificationsConfig
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        except ImportError:
            pass  # older redis-py: no such handshake
        return options

    # --- the server's side -------------------------------------------------------

    def start(self):
        """Check what waiting cannot fix (BackboneConfigError), then start the
        two threads. Redis down or restarting is not an error: they retry."""
        log.info("Backbone: node %s (port %s) on %s, stream %r", self.node_id.decode(),
                 self.node_port, self.config.describe(), self.stream)
        self._check()
        for thread in self._threads:
            thread.start()
        return self

    def _check(self):
        """Fail fast: the sentinels and Redis must accept our credentials (and
        certificate), and the user must be allowed the backbone's commands
        (this writes the node's first heartbeat). Unreachable: a warning."""
        redis = self._redis
        options = self._options(None)
        where = self.config.shown
        try:
            if self.config.kind == "sentinel":
                sentinel = self.config.sentinel(options)
                try:
                    for client in sentinel.sentinels:
                        address = "{host}:{port}".format_map(client.connection_pool.connection_kwargs)
                        where = f"the sentinel at {address}"
                        try:
                            client.ping()
                        except redis.RedisError as exc:
                            if fatal_reason(exc):
                                raise
                finally:
                    sentinel.close()
                where = f"the master {self.config.service!r} of {self.config.shown}"
            client = self.config.client(options)
            try:
                client.ping()
                client.info("server")
                try:
                    client.xinfo_stream(self.stream)
                except redis.ResponseError as exc:
                    if fatal_reason(exc):
                        raise
                client.xadd(self.stream, self._heartbeat(0), maxlen=self.maxlen, approximate=True)
            finally:
                close_client(client)
        except Exception as exc:
            reason = fatal_reason(exc)
            if reason is not None:
                raise BackboneConfigError(f"{where}: {reason} ({describe(exc)})") from None
            if isinstance(exc, (TypeError, ValueError)):  # an option redis-py refuses at connect
                raise BackboneConfigError(f"{where}: {describe(exc)}") from None
            if not isinstance(exc, redis.RedisError):
                raise
            self._warned_unreachable = True
            log.warning("Backbone: cannot reach Redis (%s); the local room goes on, retrying", describe(exc))

    def publish(self, port, messages):
        """Queue a local client's messages for the other nodes (its reader
        thread calls this). Never raises; waits at most FLOW_CONTROL_WAIT."""
        try:
            # Items that each fit one entry (a read can hold 500 short lines).
            items, frames, size = [], [], 0
            for message in messages:
                data = f"{port}: {message}\n".encode()
                if frames and (len(frames) == ENTRY_MAX_MESSAGES or size + len(data) > ENTRY_MAX_BYTES):
                    items.append((b"".join(frames), len(frames)))
                    frames, size = [], 0
                frames.append(data)
                size += len(data)
            if frames:
                items.append((b"".join(frames), len(frames)))
            total = sum(len(blob) for blob, _ in items)
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
                if self._outbox_bytes + total > self.budget:
                    self._stats["dropped_messages_total"] += len(messages)
                    if not self._outbox or self._outbox[-1] is not _DROPPED:
                        self._outbox.append(_DROPPED)
                        log.warning("Backbone: outbox over its budget (%d bytes): dropping messages; "
                                    "the other nodes will see a gap", self.budget)
                    return
                for blob, count in items:
                    self._outbox.append((blob, count, now))
                self._outbox_bytes += total
                self._cond.notify_all()
        except Exception:  # never let the backbone break a client's reader
            log.exception("Backbone: publish failed")

    def stats(self):
        """The exact dict metrics/exporter.py reads (metrics/README.md)."""
        with self._cond:
            return {
                "connected": self._connected(),
                **self._stats,
                "outbox_bytes": self._outbox_bytes,
                "outbox_budget_bytes": self.budget,
                "peers": self._peers,
                "rejected_total": dict(self._rejected),
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
            close_client(client)

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
                self._fatal_logged.clear()
                if self._ever_connected:
                    self._stats["reconnects_total"] += 1
                    log.info("Backbone: reconnected to Redis after %.1fs", time.monotonic() - self._down_since)
                else:
                    log.info("Backbone: connected to Redis")
                self._ever_connected = True
                self._down_since = None
            elif was and not now:
                self._stats["losses_total"] += 1
                self._down_since = time.monotonic()
                log.warning("Backbone: lost Redis (%s); the local room goes on, reconnecting",
                            describe(error or "error"))
            self._cond.notify_all()

    def _replaced(self, which):
        """redis-py opened a new connection under a command of ours (its pool
        found the old one dead and reconnected by itself): a loss and a
        recovery like any other."""
        self._set_link(which, False, f"the {which}'s connection was dropped and redis-py "
                                     f"reconnected by itself")

    def _failed(self, which, exc, backoff, client):
        """After a Redis error: mark the link down, drop the connection, back off."""
        reason = fatal_reason(exc)
        with self._cond:
            first = not self._ever_connected and not self._warned_unreachable and reason is None
            self._warned_unreachable = self._warned_unreachable or first
            fatal_first = reason is not None and reason not in self._fatal_logged
            if fatal_first:
                self._fatal_logged.add(reason)
        if first:
            log.warning("Backbone: cannot reach Redis (%s); the local room goes on, retrying", describe(exc))
        if fatal_first:
            log.error("Backbone: %s (%s): waiting will not fix this; the local room goes on, "
                      "retrying every %.0fs", reason, describe(exc), BACKOFF_MAX)
        self._set_link(which, False, exc)
        try:
            client.connection_pool.disconnect()
        except Exception:
            pass
        if reason is not None:
            backoff = BACKOFF_MAX
        self._stopping.wait(backoff)
        return min(backoff * 2, BACKOFF_MAX)

    def _heartbeat(self, seq):
        return {F_NODE: self.node_id, F_SEQ: seq, F_COUNT: 0, F_TIME: repr(time.time())}

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
            entries = inflight or [(self._heartbeat(seq), 0, 0)]
            connects = self._connects["publisher"]
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
            if self._connects["publisher"] != connects and self._link["publisher"]:
                self._replaced("publisher")  # acknowledged all the same: nothing to resend
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
                connects = self._connects["reader"]
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
            if self._connects["reader"] != connects:
                # redis-py replaced a dead connection under this XREAD: Redis
                # may have restarted or been replaced meanwhile. Check the
                # stream again before trusting what this read returned.
                self._replaced("reader")
                fresh = True
                continue
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
        except self._redis.ResponseError as exc:  # no such stream (yet)
            if fatal_reason(exc):
                raise
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
        now = time.monotonic()
        for entry_id, fields in entries:
            try:
                entry = check_entry(fields, ENTRY_MAX_MESSAGES, ENTRY_MAX_BYTES)
            except Rejected as exc:
                self._reject(entry_id, fields.get(F_NODE), exc)
                continue
            node = entry.node
            if node == self.node_id:
                stream_time = _stream_seconds(entry_id)
                continue  # our own: our clients had it directly
            last = tracker.last_seq(node)
            covered = entry.seq if entry.heartbeat else entry.seq - 1
            if not self._guard.allows(node, covered, last, now):
                self._reject(entry_id, node, Rejected(
                    "sequence", f"number {entry.seq} is {covered - last} ahead of the node's last, "
                                f"{last}: more than it can have published"))
                continue
            stream_time = _stream_seconds(entry_id)
            verdict = tracker.observe(node, entry.seq, entry.heartbeat, stream_time)
            digest = hash((entry.count, fields[F_TIME], entry.frames))
            if verdict.duplicate:
                rescued = self._rescue.check(node, entry.seq, digest)
                if rescued is None:
                    duplicates += 1
                    continue
                self._note(rescued, entry_id, node, (
                    f"entry {entry.seq} has the number of an earlier one with other contents: "
                    f"one of them is forged; delivering this one too" if rescued == "conflict" else
                    f"entry {entry.seq} came after the node's numbers had jumped past it: "
                    f"the jump was forged; delivering it"))
                entries_in += 1
                frames.append(entry.frames)
                count += entry.count
                delays.append((entry.published, entry.count))
                continue
            if verdict.missing:
                self._rescue.skipped(node, covered - verdict.missing + 1, covered)
            if verdict.deliver:
                self._rescue.delivered(node, entry.seq, digest)
            self._guard.accepted(node, now)
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
            if verdict.deliver:
                frames.append(entry.frames)
                count += entry.count
                delays.append((entry.published, entry.count))
        self._deliver(frames, count, delays)
        for node in tracker.expire(stream_time) if stream_time is not None else ():
            log.info("Backbone: node %s silent for %.0fs: forgotten", node.decode(), tracker.forget_after)
        with self._cond:
            self._stats["entries_in_total"] += entries_in
            self._stats["duplicates_total"] += duplicates
            self._stats["gaps_total"] += gaps
            self._peers = tracker.peers

    def _reject(self, entry_id, node, exc):
        """Count a rejected entry and log it (see _note)."""
        with self._cond:
            self._rejected[exc.reason] += 1
        self._note(exc.reason, entry_id, node, exc, rejected=True)

    def _note(self, kind, entry_id, node, what, rejected=False):
        """Log the first entry of each kind, then a sum at most every
        REJECT_LOG_INTERVAL: a flood of forgeries is not a flood of lines."""
        now = time.monotonic()
        state = self._reject_log.get(kind)
        if state is None:
            self._reject_log[kind] = [now, 0]
            if rejected:
                log.warning("Backbone: rejected entry %s from node %s (%s); more of this kind are counted "
                            "in chat_backbone_rejected_total{reason=\"%s\"}", entry_id.decode(),
                            show_node(node), what, kind)
            else:
                log.warning("Backbone: entry %s from node %s: %s", entry_id.decode(), show_node(node), what)
            return
        state[1] += 1
        if now - state[0] >= REJECT_LOG_INTERVAL:
            log.warning("Backbone: %d more entr%s (%s%s) in %.0fs, the latest %s from node %s (%s)",
                        state[1], "y" if state[1] == 1 else "ies", "rejected: " if rejected else "", kind,
                        now - state[0], entry_id.decode(), show_node(node), what)
            state[0], state[1] = now, 0

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


def start_backbone(server, url, node_port=None, env=None, source="--backbone"):
    """Connect `server` (a2/mychatserver.py's ChatServer) to the room's stream:
    returns the started Backbone (publish/stats/stop). `env`: where the
    secrets are (default os.environ); `source`: where the URL came from
    (--backbone or CHAT_BACKBONE), for the start-up line.

    Raises ImportError without the `redis` package, BackboneConfigError (a
    ValueError whose message holds no secret) for what waiting cannot fix:
    a malformed URL, credentials or a certificate Redis refuses, a user
    without the backbone's commands. Redis being down is not an error: the
    node serves its local room and keeps reconnecting."""
    return Backbone(server, url, node_port, env=env, source=source).start()
