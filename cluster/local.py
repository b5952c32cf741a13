"""A redis-server and relay nodes on loopback, as child processes.

Why it exists: the one-command demo (cluster/demo.py) and the cluster tests
both need the same real parts: Debian's `redis-server` on
127.0.0.1 and a free port (AOF on or off, killable, restartable on its data
or without it), and `a2/mychatserver.py --backbone ...` nodes. Standard
library only; each object owns its process and kills it in stop()/kill().
"""

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relayproc import SERVER_SCRIPT, RelayProcess, free_port

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 10.0  # seconds for redis-server to answer PING / a node to listen


def _ping(port, timeout=0.5):
    """True if a Redis server answers PING on 127.0.0.1:port (with a
    password set, it answers that it wants one: up all the same)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """`redis-server` on 127.0.0.1:port with its data in its own directory.

    appendonly=True: AOF, fsync every second (a SIGKILLed server loses
    nothing it acknowledged: the writes are in the kernel before replies go
    out). appendonly=False: no persistence at all (no RDB snapshots either).
    """

    def __init__(self, port=None, appendonly=True, directory=None, program="redis-server", args=()):
        self.args = list(args)  # more redis-server options, e.g. ["--requirepass", "..."]
        self.program = shutil.which(program)
        if self.program is None:
            raise FileNotFoundError(f"{program} not found (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.appendonly = appendonly
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="chat-redis-"))
        self.proc = None

    def url(self, db=0, **query):
        """redis://127.0.0.1:PORT/DB, with the backbone's options as a query."""
        text = "&".join(f"{key}={value}" for key, value in query.items())
        return f"redis://{LOOPBACK}:{self.port}/{db}" + (f"?{text}" if text else "")

    def start(self, wipe=False, ready=None):
        """Start it (on its old data unless wipe=True); wait until it answers
        (`ready()` is true: by default, PING on its port answers)."""
        if wipe:
            for path in self.directory.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        command = [self.program, "--bind", LOOPBACK, "--port", str(self.port),
                   "--dir", str(self.directory), "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no",
                   "--appendfsync", "everysec", "--daemonize", "no",
                   "--logfile", str(self.directory / "redis.log"), *self.args]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not (ready() if ready is not None else _ping(self.port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.directory / "redis.log")
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
            time.sleep(0.01)  # a poll interval while it loads its data
        return self

    def kill(self, sig=signal.SIGKILL):
        """Send `sig` (default SIGKILL) and, unless it is SIGSTOP/SIGCONT, reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        """SIGCONT (in case it was stopped), SIGTERM, wait; remove its data if ours."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill(signal.SIGTERM)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class SentinelServer:
    """`redis-server sentinel.conf --sentinel` on 127.0.0.1:port, watching
    the master `name` at 127.0.0.1:master_port (quorum 2, down after 1 s,
    failover timeout 5 s: ../shared/spec/cluster.md's measured setup).
    `password`: the sentinel's own (requirepass); `auth_pass`: the
    master's and replicas'."""

    def __init__(self, master_port, name="mymaster", port=None, quorum=2, down_after_ms=1000,
                 failover_timeout_ms=5000, password=None, auth_pass=None, program="redis-server"):
        self.program = shutil.which(program)
        if self.program is None:
            raise FileNotFoundError(f"{program} not found (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.name = name
        self.directory = Path(tempfile.mkdtemp(prefix="chat-sentinel-"))
        lines = [f"port {self.port}", f"bind {LOOPBACK}", f"dir {self.directory}",
                 f"sentinel monitor {name} {LOOPBACK} {master_port} {quorum}",
                 f"sentinel down-after-milliseconds {name} {down_after_ms}",
                 f"sentinel failover-timeout {name} {failover_timeout_ms}",
                 f"sentinel parallel-syncs {name} 1"]
        if password:
            lines.append(f"requirepass {password}")
        if auth_pass:
            lines.append(f"sentinel auth-pass {name} {auth_pass}")
        self.config = self.directory / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")  # sentinel rewrites it: its own copy
        self.proc = None

    def start(self):
        command = [self.program, str(self.config), "--sentinel", "--daemonize", "no",
                   "--logfile", str(self.directory / "sentinel.log")]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis sentinel did not start on port {self.port}")
            time.sleep(0.01)  # a poll interval while it starts
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


class Node(RelayProcess):
    """`python a2/mychatserver.py --port PORT [args] --backbone URL` as a child
    process (relayproc.RelayProcess): its output lines, stderr included, are
    collected as they arrive (`lines`); `echo(node, line)` sees each one."""

    def __init__(self, url, port=0, args=(), echo=None, wait=True, env=None):
        command = [sys.executable, str(SERVER_SCRIPT), "--port", str(port), *args]
        if url is not None:  # None: a plain single server, or the URL in env's CHAT_BACKBONE
            command += ["--backbone", url]
        super().__init__(command, env=env, merge_stderr=True, on_line=echo, wait=wait, timeout=READY_TIMEOUT,
                         new_session=True)  # a terminal's Ctrl-C goes to our owner

    def wait_listening(self, timeout=READY_TIMEOUT):
        """Wait for its "Server listening on HOST:PORT" line; sets `address`."""
        super().wait_listening(timeout)
        return self

    @property
    def node_id(self):
        """Its backbone node id, from its "Backbone: node ID ..." line."""
        match = self.find(r"^Backbone: node ([0-9a-f]+) ")
        return match.group(1) if match else None

    def stop(self, timeout=5.0):
        """SIGINT (the server's clean shutdown), then kill if it lingers."""
        super().stop(signal.SIGINT, timeout)


def start_nodes(url, count, args=(), env=None):
    """`count` nodes started together (each takes ~0.3 s to import and bind)."""
    nodes = [Node(url, args=args, wait=False, env=env) for _ in range(count)]
    try:
        for node in nodes:
            node.wait_listening()
    except Exception:
        for node in nodes:
            node.kill()
        raise
    return nodes


def stop_all(nodes, redis_server):
    """Stop every node, then Redis (nodes first: their shutdown is clean then)."""
    for node in nodes:
        node.stop()
    if redis_server is not None:
        redis_server.stop()


__all__ = ["RedisServer", "SentinelServer", "Node", "free_port", "start_nodes", "stop_all", "LOOPBACK"]
