"""relayproc.py - a chat relay as a child process, and what /proc says about it.

Every relay of this project prints `Server listening on HOST:PORT` once it
listens: the assignment's server, the benchmark's baseline and reference
relays, the test suite's fault relay, a cluster node. Whoever starts one as a
process to talk to it, or to measure it, does it here:

    relay = RelayProcess([sys.executable, str(SERVER_SCRIPT), "--port", "0", "--quiet"])
    relay.address           # ("127.0.0.1", 40123), from its listening line
    relay.cpu_seconds()     # user + system CPU so far, from /proc/PID/stat
    relay.usage()           # (threads, open descriptors, resident KiB)
    relay.stop()            # SIGTERM, then SIGKILL if it lingers
    free_port()             # a loopback port for what cannot take --port 0

Why a top-level module of its own: the benchmark (bench/), the local cluster
(cluster/local.py) and the tests all start relays and read /proc, and none of
them may lean on another for it: tests never import benchmark code, and
a2/ stays the assignment (its three files, standard library only). So this
module is standard library only too, and depends on nothing in the
repository: anything that has the repository root on sys.path (pytest's
`pythonpath = .`, bench/'s scripts, cluster/demo.py) imports it.
Linux only (/proc).
"""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SERVER_SCRIPT = ROOT / "a2" / "mychatserver.py"


def free_port(count=1):
    """The first of `count` consecutive loopback ports nothing listens on now,
    below the kernel's ephemeral range: a port that every outgoing connection
    may take is no port to start, or restart, a server on (a redis-server, a
    relay that cannot take --port 0) while thousands of clients connect."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        base = random.randrange(10_000, max(10_001, low - count))
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise OSError("no free port found below the ephemeral range")


_LISTENING = re.compile(r"Server listening on (\S+):(\d+)\s*$")


def listening_address(line):
    """(host, port) from a relay's `Server listening on HOST:PORT` line, else
    None. The port is the text after the LAST colon and the host everything
    before it, so IPv6 reads right: `::1:5000` and `[::1]:5000` both give
    ("::1", 5000)."""
    match = _LISTENING.search(line)
    if match is None:
        return None
    host = match.group(1)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(match.group(2))


# --- /proc --------------------------------------------------------------------------

def cpu_seconds(pid):
    """User + system CPU time process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid, key):
    """One numeric field of /proc/PID/status (Threads, VmRSS, VmHWM in KiB...);
    0 if the field is absent."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def process_usage(pid):
    """(threads, open descriptors, resident set in KiB) of process `pid`."""
    threads = rss = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd")), rss


# --- the process ---------------------------------------------------------------------

class RelayProcess:
    """`command` as a child process that prints `Server listening on HOST:PORT`.

    Its stdout and stderr are read line by line as they arrive, by threads,
    into `lines` and `errors` (merge_stderr=True: both into `lines`), so the
    relay never blocks on a full pipe and a caller can wait for a log line.
    `on_line(relay, line)` is called for every stdout line. With wait=True
    (the default) the constructor returns once the relay listens (`address`)
    and raises RuntimeError, with its last output, if it exits or stays
    silent for `timeout` seconds first."""

    def __init__(self, command, *, env=None, preexec_fn=None, new_session=False, merge_stderr=False,
                 on_line=None, wait=True, timeout=15.0):
        self.command = [str(part) for part in command]
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                     text=True, env=env, preexec_fn=preexec_fn,
                                     start_new_session=new_session)
        self.pid = self.proc.pid
        self.lines, self.errors = [], []
        self.address = None
        self._on_line = on_line
        self._listening = threading.Event()  # set on the listening line, or at end of output
        streams = [(self.proc.stdout, self.lines, True)]
        if not merge_stderr:
            streams.append((self.proc.stderr, self.errors, False))
        self._readers = [threading.Thread(target=self._collect, args=stream, daemon=True,
                                          name=f"relay-{self.pid}-output") for stream in streams]
        for reader in self._readers:
            reader.start()
        if wait:
            self.wait_listening(timeout)

    def _collect(self, stream, into, is_stdout):
        try:
            for line in stream:
                line = line.rstrip("\n")
                into.append(line)
                if is_stdout:
                    if self.address is None:
                        self.address = listening_address(line)
                        if self.address is not None:
                            self._listening.set()
                    if self._on_line is not None:
                        self._on_line(self, line)
        except ValueError:
            pass  # the pipe was closed under us by kill()
        finally:
            if is_stdout:
                self._listening.set()  # ended without listening: wake the waiter

    def wait_listening(self, timeout=15.0):
        """Wait for the listening line; return `address`. RuntimeError if the
        relay ends or stays silent for `timeout` seconds (it is killed then)."""
        if not self._listening.wait(timeout) or self.address is None:
            self.kill()
            raise RuntimeError(f"{self.name()} did not start listening: {self.tail()}")
        return self.address

    def name(self):
        script = next((part for part in self.command[1:] if part.endswith(".py")), self.command[0])
        return Path(script).name

    def tail(self, n=5):
        """Its last n lines of output, stdout then stderr, as one line of text."""
        return " | ".join(list(self.lines)[-n:] + list(self.errors)[-n:]) or "(no output)"

    # --- its output --------------------------------------------------------------

    def count(self, text, stream=None):
        """How many stdout lines (or lines of `stream`) contain `text`."""
        return sum(text in line for line in list(self.lines if stream is None else stream))

    def find(self, pattern, stream=None):
        """The first match of regex `pattern` in stdout (or `stream`), else None."""
        pattern = re.compile(pattern)
        for line in list(self.lines if stream is None else stream):
            match = pattern.search(line)
            if match:
                return match
        return None

    def wait_for(self, predicate, timeout=10.0, what="a condition"):
        """Poll predicate() until true (return its value); RuntimeError if the
        relay exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name()}: gave up waiting for {what}: {self.tail()}")
            time.sleep(0.01)  # a poll interval, not a synchronisation point

    # --- /proc -------------------------------------------------------------------

    def cpu_seconds(self):
        return cpu_seconds(self.pid)

    def status(self, key):
        return proc_status(self.pid, key)

    def usage(self):
        return process_usage(self.pid)

    # --- ending ------------------------------------------------------------------

    def running(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Send `sig` (after SIGCONT, in case it was stopped), wait up to
        `timeout` seconds, SIGKILL it if it lingers; return its exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self):
        """SIGKILL it if still running, reap it, close its pipes (idempotent)."""
        if self.running():
            self.proc.kill()
        self.proc.wait()
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def python_relay(script, *args, python_args=(), **options):
    """RelayProcess of `python [python_args] SCRIPT --port 0 ARGS` (this interpreter)."""
    return RelayProcess([sys.executable, *python_args, str(script), "--port", "0", *args], **options)
