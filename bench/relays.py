"""relays.py - the relays under test: what `bench.py --relays` can name, how
each is prepared once per run and started, fresh, for every step.

    project    a2/mychatserver.py (or --project-script): relay core v2
    previous   a2/mychatserver.py and metrics/ as they were at --previous-commit
    baseline   bench/baseline_relay.py: the class demo, the shape most classmates submit
    reference  bench/reference_relay.py: the driver's calibration, never compared

The yardstick's C relay is made by bench/yardstick.py from --anchors, not
listed here: it is never in the default comparison (CRelay, below).

An entry knows three things: what it is (one line, printed with the
results), whether it serves /metrics (`--metrics-port 0`), and the command
that starts it on a free loopback port (it prints `Server listening on
HOST:PORT`, as every relay of this project does). One that must be made
first (extracted from git, or compiled) does so in prepare(), into the run's
temporary directory. A relay written in another language is one more
entry: a subclass whose prepare() builds it and whose command() runs it
(CRelay: it prints nothing when it listens, so its readiness is a connect
that succeeds).
"""

import io
import re
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relayproc import SERVER_SCRIPT, RelayProcess, free_port  # noqa: E402 - after the path fix

DEFAULT_ANCHORS = ROOT.parent / "shared" / "bench-anchors"  # the C instruments, outside the repository
PREVIOUS_COMMIT = "a25aa6b"  # the last commit before relay core v2 (one Sender thread)


class Relay:
    """A relay under test: a Python script started as `python SCRIPT --port 0 ARGS`."""

    def __init__(self, name, about, script, args=(), metrics=False, compared=True):
        self.name = name
        self.about = about
        self.script = script    # None until prepare() has made it
        self.args = list(args)
        self.metrics = metrics  # takes --metrics-port 0 and prints "Metrics on URL"
        self.compared = compared  # False: an instrument, not in the comparison
        self.announces = True     # prints `Server listening on HOST:PORT` once it listens

    def prepare(self, workdir):
        """Make what this relay needs in `workdir` (a directory that lives as
        long as the run); return a short note on what was made, or None.
        RuntimeError, with a one-line reason, if it cannot be made."""
        return None

    def command(self):
        if self.script is None:
            raise RuntimeError(f"the {self.name} relay was not prepared")
        return [sys.executable, str(self.script), "--port", "0", *self.args]

    def start(self, metrics=False):
        """This relay as a fresh process, listening; see RunningRelay."""
        return RunningRelay(self, metrics=metrics and self.metrics)


class PreviousDesign(Relay):
    """The project's relay as it was at an older commit, extracted with git."""

    def __init__(self, commit):
        super().__init__("previous", f"a2/mychatserver.py as it was at {commit}", None,
                         args=["--quiet"], metrics=True)
        self.commit = commit

    def prepare(self, workdir):
        """Write a2/mychatserver.py and metrics/ as they were at the commit into
        `workdir` (so the old script's --metrics-port finds its own metrics/
        beside its a2/); return the commit's short hash."""
        done = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", self.commit,
                               "a2/mychatserver.py", "metrics"], capture_output=True, check=False)
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"cannot extract a2/mychatserver.py at {self.commit!r} with git: "
                               f"{reason[-1] if reason else 'git failed'}")
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            tar.extractall(workdir)  # noqa: S202 - our own repository's tree
        self.script = Path(workdir) / "a2" / "mychatserver.py"
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", self.commit],
                             capture_output=True, text=True, check=False).stdout.strip()
        self.about = f"a2/mychatserver.py as it was at {rev or self.commit}"
        return rev or self.commit


def compile_c(source, workdir, name):
    """`cc -O2 -o WORKDIR/NAME SOURCE`; the binary's path. RuntimeError, one
    line, when the source or cc is missing or the build fails."""
    source = Path(source)
    if not source.is_file():
        raise RuntimeError(f"no {source.name} at {source.parent}")
    cc = shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    binary = Path(workdir) / name
    done = subprocess.run([cc, "-O2", "-o", str(binary), str(source)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["cc failed"])[-1]
        raise RuntimeError(f"cc could not build {source.name}: {reason}")
    return binary


class CRelay(Relay):
    """The C yardstick, c_relay.c, compiled from `anchors` (outside the
    repository; never copied into it). It takes only a port, and prints
    nothing when it listens: started on a port found free, ready when a
    connect succeeds (the probe connection just leaves again)."""

    def __init__(self, anchors):
        super().__init__("c", "c_relay.c: one epoll thread in C, no limits (the yardstick)", None,
                         compared=False)
        self.source = Path(anchors) / "c_relay.c"
        self.announces = False
        self.port = None

    def prepare(self, workdir):
        self.script = compile_c(self.source, workdir, "c_relay")
        return str(self.script)

    def command(self):
        if self.script is None:
            raise RuntimeError(f"the {self.name} relay was not prepared")
        self.port = free_port()  # below the ephemeral range: chatbench's thousands of clients use that
        return [str(self.script), str(self.port)]


def wait_accepting(relay, address, timeout=10.0):
    """Poll-connect to `address` until the relay process `relay` accepts
    (return `address`); RuntimeError if it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return address
        except OSError:
            if not relay.running() or time.monotonic() > deadline:
                relay.kill()
                raise RuntimeError(f"{relay.name()} did not start accepting on {address}: "
                                   f"{relay.tail()}") from None
            time.sleep(0.01)


def registry(project_script=SERVER_SCRIPT, previous_commit=PREVIOUS_COMMIT):
    """Every relay under test by name, the compared ones in table order."""
    relays = [
        # Flood control off: each of the benchmark's senders sends thousands a second.
        Relay("project", "a2/mychatserver.py: relay core v2, one Sender thread owns every send",
              Path(project_script), args=["--quiet", "--max-rate", "0"], metrics=True),
        PreviousDesign(previous_commit),
        Relay("baseline", "bench/baseline_relay.py: the class demo, a thread per client "
                          "relaying each recv(1024) under the list lock", HERE / "baseline_relay.py"),
        Relay("reference", "bench/reference_relay.py: one epoll thread, C-speed per byte "
                           "(calibrates the driver)", HERE / "reference_relay.py", compared=False),
    ]
    return {relay.name: relay for relay in relays}


COMPARED = tuple(name for name, relay in registry().items() if relay.compared)


def raise_nofile():
    """Soft limit on descriptors -> the hard one: a relay (and the benchmark)
    may hold 10,000+ sockets. Also the relays' preexec_fn."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RunningRelay(RelayProcess):
    """One relay under test as a process on a free loopback port
    (relayproc.RelayProcess: address, CPU and memory from /proc, stop())."""

    def __init__(self, relay, metrics=False):
        command = relay.command() + (["--metrics-port", "0"] if metrics else [])
        super().__init__(command, preexec_fn=raise_nofile, timeout=20, wait=relay.announces)
        if not relay.announces:
            self.address = wait_accepting(self, ("127.0.0.1", relay.port))
        self.kind = relay.name
        self.metrics_url = None
        if metrics:
            found = self.wait_for(lambda: self.find(r"^Metrics on (\S+)"), 20, "its metrics line")
            self.metrics_url = found.group(1)

    def slow_consumer_drops(self):
        """(clients this relay dropped as slow consumers, where the count came
        from). /metrics is exact; the log line is the fallback (the project's
        relay drops log lines rather than block, so its stderr may miss some)."""
        if self.metrics_url:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                    text = response.read().decode()
                match = re.search(r'^chat_disconnects_total\{reason="slow_consumer"\} (\S+)$', text, re.M)
                if match:
                    return int(float(match.group(1))), "metrics"
            except OSError:
                pass
        return self.count("(slow consumer)", self.errors), "stderr"
