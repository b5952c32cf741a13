"""driver.py - the benchmark's load driver: one process, many chat clients.

bench/bench.py starts one or more of these worker processes
(`worker_main`) and commands them over a multiprocessing pipe: connect N
clients, probe until the relay serves all of them, run a timed load phase,
close. Everything here is built so that the driver costs far less than the
relay it measures:

* one event loop (epoll), no thread or greenlet per client;
* each read takes everything the kernel has for that socket (up to 256 KiB,
  recv_into one preallocated buffer), and is checked IN BULK with bytes
  methods: C loops, no Python work per delivered message;
* one latency sample per read, weighted by the read's message count, with
  its intended send time (so bench.py can show latency over the run).

The wire. Every benchmark message has a fixed length and carries its
sender's port, a sequence number and its intended send time:

    m<port:5>.<seq:9>.<t_us:15>\\n          32 characters + newline

so every correctly attributed relay is exactly FRAME bytes:

    <port:5>: m<port:5>.<seq:9>.<t_us:15>\\n    (5 + 2 + 32 + 1 = 40 bytes)

where the prefix port must equal the port inside the message. A read whose
complete part is k frames is checked with strided slices
(`data[39:end:40] == b"\\n" * k`, the ": m" columns, and the five prefix
digit columns equal to the five message digit columns) and a newline count.
If any check fails, the read is parsed line by line (slow path) and only
lines that are exactly one correctly prefixed message count: a relay that
glued two messages into one chunk (the second has no prefix) or cut one in
two (two prefixes on one line, wrong length) does not get them counted.

Clock: time.monotonic_ns() (CLOCK_MONOTONIC) is system-wide on Linux, so the
sender's stamp and the receiver's clock are one clock even across processes.
The stamp is the message's *intended* send time in the open-loop schedule:
a driver or relay that falls behind shows as latency, not as a lower rate.
"""

import collections
import errno
import os
import resource
import select
import socket
import time
from array import array

FRAME = 40                 # bytes of one correctly attributed relay
MESSAGE = FRAME - 7        # what a client sends: 32 characters + "\n"
STAMP = slice(24, 39)      # the t_us digits inside a frame
READ_SIZE = 256 * 1024
_NL = b"\n"


def message(port, seq, t_us):
    return b"m%05d.%09d.%015d\n" % (port, seq, t_us)


def probe_message(port, k):
    """A probe is a frame-shaped message with a letter in the seq field; it is
    sent only while no load runs (and never counted)."""
    return b"m%05d.P%08d.%015d\n" % (port, k, time.monotonic_ns() // 1000)


def count_frames(data, end):
    """Correctly attributed frames in data[:end] (end is just past a newline):
    (count, lines that were not one correctly prefixed message, offset of the
    first good frame or -1)."""
    k, rest = divmod(end, FRAME)
    if rest == 0 and k and (data[FRAME - 1:end:FRAME] == _NL * k and data.count(_NL, 0, end) == k
            and data[5:end:FRAME] == b":" * k and data[7:end:FRAME] == b"m" * k
            and data[6:end:FRAME] == b" " * k
            and all(data[i:end:FRAME] == data[8 + i:end:FRAME] for i in range(5))):
        return k, 0, 0
    # Slow path: something is glued, cut or foreign. Judge line by line.
    good = bad = 0
    first = -1
    offset = 0
    for line in data[:end].split(_NL)[:-1]:
        if (len(line) == FRAME - 1 and line[5:8] == b": m" and line[0:5] == line[8:13]
                and line[13:14] == b"." and line[23:24] == b"." and line[14:23].isdigit()):
            good += 1
            if first < 0:
                first = offset
        else:
            bad += 1
        offset += len(line) + 1
    return good, bad, first


class Driver:
    """The clients of one worker process and the loops that drive them."""

    def __init__(self):
        self.socks = []
        self.ports = []
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)

    # --- connecting ------------------------------------------------------------

    def connect(self, address, n, window=256, timeout=60.0, slow=0):
        """Open n connections, at most `window` handshakes in flight (a burst
        larger than the relay's listen backlog only measures SYN retries).
        The last `slow` of them are slow readers: a 4 KiB receive buffer (as
        a client that reads little), so a relay feels them within seconds.
        Returns seconds taken."""
        start = time.monotonic()
        deadline = start + timeout
        poller = select.epoll()
        pending = {}
        opened = 0
        small = set()
        try:
            while len(self.socks) < n:
                while opened < n and len(pending) < window:
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if opened >= n - slow:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                        small.add(sock)
                    err = sock.connect_ex(address)
                    if err not in (0, errno.EINPROGRESS):
                        sock.close()
                        raise OSError(err, f"connect: {os.strerror(err)}")
                    pending[sock.fileno()] = sock
                    poller.register(sock.fileno(), select.EPOLLOUT)
                    opened += 1
                for fd, _ in poller.poll(0.5):
                    sock = pending.pop(fd)
                    poller.unregister(fd)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect: {os.strerror(err)}")
                    port = sock.getsockname()[1]
                    if port < 10000:  # frames assume 5-digit ports (Linux: 32768-60999)
                        raise RuntimeError(f"ephemeral port {port} has fewer than 5 digits")
                    self.socks.append(sock)
                    self.ports.append(port)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(self.socks)} of {n} connected in {timeout}s")
        finally:
            poller.close()
            for sock in pending.values():
                sock.close()
        # Handshakes complete in any order: put the slow readers last again.
        order = sorted(range(len(self.socks)), key=lambda i: self.socks[i] in small)
        self.socks = [self.socks[i] for i in order]
        self.ports = [self.ports[i] for i in order]
        return time.monotonic() - start

    def close(self):
        for sock in self.socks:
            sock.close()
        self.socks, self.ports = [], []

    # --- probing: is every client registered and served? ---------------------

    def probe(self, k, send, timeout):
        """Optionally send probe k from client 0; wait until every other client
        received it. Returns (all seen, send time ns, last receipt ns, missing)."""
        marker = b".P%08d." % k
        waiting = {sock.fileno(): sock for sock in self.socks}
        tails = dict.fromkeys(waiting, b"")
        sent_ns = None
        if send:
            self.socks[0].sendall(probe_message(self.ports[0], k))
            sent_ns = time.monotonic_ns()
            waiting.pop(self.socks[0].fileno())
        poller = select.epoll()
        for fd in waiting:
            poller.register(fd, select.EPOLLIN)
        last_ns = sent_ns or 0
        deadline = time.monotonic() + timeout
        buf, view = self.buf, self.view
        try:
            while waiting and time.monotonic() < deadline:
                for fd, _ in poller.poll(0.05):
                    sock = waiting.get(fd)
                    if sock is None:
                        continue
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        raise ConnectionError("the relay closed a client during the probe")
                    data = tails[fd] + view[:n]
                    if marker in data:
                        last_ns = time.monotonic_ns()
                        del waiting[fd]
                        poller.unregister(fd)
                    else:
                        tails[fd] = data[-len(marker):]
        finally:
            poller.close()
        return not waiting, sent_ns, last_ns, len(waiting)

    # --- the load phase -------------------------------------------------------

    def run(self, t0_ns, duration, rate, senders, drain, slow=(), phases=None, tick=0.001):
        """Open-loop load: each client index in `senders` sends `rate` msg/s
        from t0_ns for `duration` s, one message per send() call; every other
        client reads everything. Clients in `slow` read 1 KiB every 100 ms and
        are not counted. phases[j] (0 <= phase < 1) shifts sender j's schedule
        by that fraction of its interval: senders spread evenly over the
        interval offer a steady rate, not bursts of one message per sender.
        Returns the counts (see bench.py)."""
        cpu0 = time.process_time()
        interval = 1e9 / rate if rate else 0
        per_sender = int(duration * rate)
        t_end = t0_ns + int(duration * 1e9)
        socks = self.socks
        fd_index = {sock.fileno(): i for i, sock in enumerate(socks)}
        measured = [i for i in range(len(socks)) if i not in slow]
        poller = select.epoll()
        for i in measured:
            poller.register(socks[i].fileno(), select.EPOLLIN)
        carry = [b""] * len(socks)
        good = [0] * len(socks)
        bad_lines = 0
        closed = set()
        reads = 0
        received_bytes = 0
        lat_us = array("q")
        lat_w = array("q")
        lat_sent = array("q")   # each sample's intended send time (us): latency over the run
        # Per sender: next seq to generate; what is generated but not yet written.
        phases = phases or [0.0] * len(senders)
        start = {i: t0_ns + int(phase * interval) for i, phase in zip(senders, phases)}
        next_seq = {i: 1 for i in senders}
        backlog = {i: collections.deque() for i in senders}
        written = dict.fromkeys(senders, 0)
        partial = dict.fromkeys(senders, b"")
        for i in senders:  # senders are polled for writability only while backlogged
            socks[i].setblocking(False)
        for i in measured:
            socks[i].setblocking(False)
        slow_next = time.monotonic()
        slow_dropped = []
        last_data_ns = t_end
        buf, view = self.buf, self.view
        next_tick = time.monotonic()

        def write(i):
            """Write sender i's backlog, one message per send(), until EAGAIN."""
            sock = socks[i]
            pending = backlog[i]
            head = partial[i]
            try:
                while head or pending:
                    if not head:
                        head = pending.popleft()
                    n = sock.send(head)
                    if n == len(head):
                        written[i] += 1
                        head = b""
                    else:
                        head = head[n:]
            except BlockingIOError:
                pass
            except OSError:
                pending.clear()
                head = b""
            partial[i] = head

        while True:
            now = time.monotonic_ns()
            sending = now < t_end
            # 1. Generate what the schedule says is due, then write it.
            if senders and now >= t0_ns:
                for i in senders:
                    seq = next_seq[i]
                    due = min(per_sender, int((now - start[i]) / interval) + 1) if now >= start[i] else 0
                    if seq <= due:
                        port, first = self.ports[i], start[i]
                        backlog[i].extend(
                            b"m%05d.%09d.%015d\n" % (port, s, (first + int((s - 1) * interval)) // 1000)
                            for s in range(seq, due + 1))
                        next_seq[i] = due + 1
                    if backlog[i] or partial[i]:
                        write(i)
            # 2. Read what every socket has. The loop runs in ticks: sleeping out
            #    the rest of the tick lets the kernel gather a tick's worth of
            #    relays per socket, so the driver makes one read per socket per
            #    tick however fast the relay is (it adds at most a tick to the
            #    latencies it measures: the calibration step shows how much).
            pause = next_tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            next_tick = max(next_tick + tick, time.monotonic())
            events = poller.poll(0)
            t_read = time.monotonic_ns()
            t_read_us = t_read // 1000
            for fd, _ in events:
                i = fd_index[fd]
                try:
                    n = socks[i].recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                if n == 0:
                    closed.add(i)
                    poller.unregister(fd)
                    continue
                reads += 1
                received_bytes += n
                data = carry[i] + view[:n]
                end = data.rfind(_NL) + 1
                carry[i] = data[end:]
                if not end:
                    continue
                k, bad, first = count_frames(data, end)
                bad_lines += bad
                if k:
                    good[i] += k
                    stamp = int(data[first + 24:first + 39])
                    lat_us.append(t_read_us - stamp)
                    lat_w.append(k)
                    lat_sent.append(stamp)
                last_data_ns = t_read
            # 3. The slow reader(s): 1 KiB every 100 ms.
            if slow and time.monotonic() >= slow_next:
                slow_next = time.monotonic() + 0.1
                for i in slow:
                    if i in closed:
                        continue
                    try:
                        socks[i].setblocking(False)
                        if socks[i].recv(1024) == b"":
                            closed.add(i)
                            slow_dropped.append(i)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed.add(i)
                        slow_dropped.append(i)
            # 4. After the send phase: drain until quiet (or the drain deadline).
            if not sending:
                unsent = any(backlog[i] or partial[i] for i in senders)
                quiet = time.monotonic_ns() - last_data_ns > min(0.5, drain / 4) * 1e9  # 0.25 s in --smoke
                if (quiet and not unsent) or time.monotonic_ns() > t_end + int(drain * 1e9):
                    break
        poller.close()
        for i in senders:
            socks[i].setblocking(True)
        for i in measured:
            socks[i].setblocking(True)
        return {
            "sent": sum(written.values()),
            "offered": per_sender * len(senders),
            "unsent": sum(len(backlog[i]) + (1 if partial[i] else 0) for i in senders),
            "good": sum(good[i] for i in measured),
            "bad_lines": bad_lines,
            "closed": len([i for i in closed if i not in slow]),
            "slow_dropped": len(slow_dropped),
            "reads": reads,
            "received_bytes": received_bytes,
            "lat_us": lat_us.tobytes(),
            "lat_w": lat_w.tobytes(),
            "lat_sent_us": lat_sent.tobytes(),
            "cpu_s": time.process_time() - cpu0,
            "last_data_ns": last_data_ns,
        }


def worker_main(conn):
    """A worker process: obey commands from bench.py until told to quit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    driver = Driver()
    while True:
        command, args = conn.recv()
        try:
            if command == "connect":
                address, n, slow = args
                result = {"seconds": driver.connect(tuple(address), n, slow=slow), "ports": driver.ports}
            elif command == "probe":
                result = driver.probe(*args)
            elif command == "run":
                result = driver.run(**args)
            elif command == "close":
                driver.close()
                result = None
            elif command == "quit":
                driver.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 - reported to bench.py, which stops the run
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
