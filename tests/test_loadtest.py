"""End-to-end tests of the load generator: `locust -f loadtest/chatusers.py`
run headless, as a subprocess, against the real server and against
tests/fault_relay.py.

Why subprocesses: the locustfile monkey-patches the standard library with
gevent on import, which would break the threads of the in-process servers
other tests use. So it is never imported here; Locust runs it, from the same
interpreter (sys.executable), and the tests read its exit code, its summary
and its --csv files.

Each run is a few seconds of tens of users: enough traffic (thousands of
deliveries) that a fault injected into one delivery in 200 is certain to
show, short enough that the file takes well under a minute on two cores.
"""

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import LOOPBACK, ROOT
from relayproc import free_port, python_relay

LOCUSTFILE = ROOT / "loadtest" / "chatusers.py"
FAULT_RELAY = ROOT / "tests" / "fault_relay.py"

USERS = 20
# 20 users at ~10 messages/s each: ~200 messages/s, ~3,800 deliveries/s.
TRAFFIC = ["--chat-wait", "0.1", "--chat-churn", "0.05", "--chat-message-size", "100"]
DELIVERY_FAULTS = {"lost message", "duplicate message", "reordered message", "bad frame",
                   "wrong port", "echoed message", "unexpected disconnect"}


class LocustRun:
    """The outcome of one headless Locust run."""

    def __init__(self, returncode, output, csv_prefix):
        self.returncode = returncode
        self.output = output
        self.stats = self._read(f"{csv_prefix}_stats.csv")
        self.failures = self._read(f"{csv_prefix}_failures.csv")

    @staticmethod
    def _read(path):
        with open(path, newline="") as file:
            return list(csv.DictReader(file))

    def requests(self, name):
        """(request count, failure count) of one CHAT row of the stats table."""
        for row in self.stats:
            if row["Type"] == "CHAT" and row["Name"] == name:
                return int(row["Request Count"]), int(row["Failure Count"])
        return 0, 0

    @property
    def total_failures(self):
        return sum(int(row["Failure Count"]) for row in self.stats if row["Name"] == "Aggregated")

    @property
    def failure_names(self):
        return {row["Name"] for row in self.failures}

    def summary(self):
        """The counters of the 'Chat delivery check' block, as {label: int}."""
        block = self.output[self.output.index("Chat delivery check"):]
        return {label.strip(): int(value)
                for label, value in re.findall(r"^  ([a-z ]+?)\s+(\d+)$", block, re.MULTILINE)}

    def __repr__(self):  # what a failing assertion shows
        return f"<LocustRun exit {self.returncode}>\n{self.output[-6000:]}"


def run_locust(address, tmp_path, *extra, users=USERS, rate=None, run_time="3s", timeout=40):
    """Run the load test headless against `address`; always reap the whole
    process group (--processes forks workers), even if the test fails."""
    csv_prefix = tmp_path / "run"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "-u", str(users), "-r", str(rate or users), "-t", run_time,
               "--host", f"tcp://{address[0]}:{address[1]}", "--csv", str(csv_prefix),
               "--only-summary", "--web-host", LOOPBACK, *TRAFFIC, *extra]
    log_path = tmp_path / "locust.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers too, if any are left
            proc.wait()
    return LocustRun(returncode, log_path.read_text(), csv_prefix)


@contextlib.contextmanager
def fault_relay(fault, every=200):
    """tests/fault_relay.py on a free loopback port; yields its address."""
    relay = python_relay(FAULT_RELAY, "--fault", fault, "--every", str(every), merge_stderr=True)
    try:
        yield relay.address
    finally:
        relay.kill()


def assert_clean(run):
    assert run.returncode == 0, run
    assert "RESULT: PASS" in run.output, run
    assert run.failures == [], run
    assert run.total_failures == 0, run
    broadcasts, broadcast_failures = run.requests("broadcast")
    assert broadcasts > 1000 and broadcast_failures == 0, run
    summary = run.summary()
    assert summary["delivered"] == summary["expected deliveries"] == broadcasts, run
    assert summary["lost"] == summary["duplicates"] == summary["reordered"] == 0, run
    assert summary["messages sent"] == run.requests("send")[0] > 0, run


def test_clean_run_against_the_real_server(server_process, tmp_path):
    server = server_process("--quiet")
    run = run_locust(server.address, tmp_path)
    assert_clean(run)
    connects, connect_failures = run.requests("connect")
    exits, exit_failures = run.requests("exit")
    assert connect_failures == exit_failures == 0, run
    # Churn happened: users left (exit, closed by the server) and came back.
    assert connects > USERS and exits > USERS, run
    assert server.proc.poll() is None, "the server died under the load test"


@pytest.mark.parametrize("fault, failure_name", [
    ("drop", "lost message"),
    ("duplicate", "duplicate message"),
    ("reorder", "reordered message"),
])
def test_injected_faults_fail_the_run_and_are_named(fault, failure_name, tmp_path):
    with fault_relay(fault, every=200) as address:
        run = run_locust(address, tmp_path, run_time="2s")
    assert run.returncode == 1, run
    # The fault is named, and it is the only kind of failure: nothing else
    # (no other fault, no disconnect) was reported by mistake.
    assert run.failure_names == {failure_name}, run
    assert run.requests(failure_name)[1] > 0, run
    assert "RESULT: FAIL" in run.output, run
    assert run.requests("broadcast")[0] > 0, run


def test_latency_target_fails_the_run(tmp_path):
    # fault_relay with no fault: a correct relay, so no delivery failures; but
    # no relay answers within a microsecond, so the p99 target fails the run.
    with fault_relay("none") as address:
        run = run_locust(address, tmp_path, "--chat-latency-target", "0.001", run_time="2s")
    assert run.returncode == 1, run
    assert run.failures == [], run
    assert "above the 0.001 ms target" in run.output, run


def test_two_processes_against_the_real_server(server_process, tmp_path):
    server = server_process("--quiet")
    master_port = str(free_port())
    run = run_locust(server.address, tmp_path, "--processes", "2",
                     "--master-bind-host", LOOPBACK, "--master-bind-port", master_port,
                     "--master-port", master_port)
    assert "2 workers connected" in run.output, run
    assert_clean(run)


def test_two_processes_report_losses_to_the_master(tmp_path):
    # Senders and receivers are spread over two worker processes: losses found
    # in either worker reach the master's summary and its exit code.
    master_port = str(free_port())
    with fault_relay("drop", every=200) as address:
        run = run_locust(address, tmp_path, "--processes", "2",
                         "--master-bind-host", LOOPBACK, "--master-bind-port", master_port,
                         "--master-port", master_port, run_time="2s")
    assert run.returncode == 1, run
    assert run.failure_names == {"lost message"}, run
    assert run.summary()["lost"] == run.requests("lost message")[1] > 0, run


def test_chat_hosts_spreads_users_over_the_nodes(server_process, tmp_path):
    # Two entries for the same relay (a real multi-node test needs the
    # cluster's shared room): the users are spread round-robin over both
    # entries, and every delivery is still checked, across them.
    server = server_process("--quiet")
    port = server.address[1]
    nodes = [f"127.0.0.1:{port}", f"localhost:{port}"]
    run = run_locust(server.address, tmp_path, "--chat-hosts", ",".join(nodes))
    assert_clean(run)
    line = re.search(r"^  connections by node\s+(.*)$", run.output, re.MULTILINE)
    assert line, run
    counts = dict((node, int(n)) for node, n in re.findall(r"(\S+) (\d+)", line[1]))
    assert sorted(counts) == sorted(nodes), run
    # Each user keeps its node; 20 users alternate, so the first connections
    # split evenly and churn reconnects add to both.
    assert min(counts.values()) >= USERS // 2, run
    assert sum(counts.values()) == run.requests("connect")[0], run
    # Messages crossed between the two entries, both ways.
    across = re.search(r"^  deliveries across nodes\s+(.*)$", run.output, re.MULTILINE)
    routes = dict((route, int(n)) for route, n in re.findall(r"(\S+ -> \S+) (\d+)", across[1]))
    assert sorted(routes) == [f"{nodes[0]} -> {nodes[1]}", f"{nodes[1]} -> {nodes[0]}"], run
    assert min(routes.values()) > 0, run


def test_chat_hosts_fails_nodes_that_do_not_share_one_room(server_process, tmp_path):
    # Two relays that are not connected to each other: every receiver hears
    # only its own node, so each sender's sequence looks whole - and the run
    # must still fail, because nothing crossed from node to node.
    first, second = server_process("--quiet"), server_process("--quiet")
    nodes = [f"{LOOPBACK}:{first.address[1]}", f"{LOOPBACK}:{second.address[1]}"]
    run = run_locust(first.address, tmp_path, "--chat-hosts", ",".join(nodes), run_time="2s")
    assert run.returncode == 1, run
    assert run.failures == [], run  # no delivery fault: each room on its own is fine
    a, b = sorted(nodes)
    assert (f"RESULT: FAIL - no delivery across nodes {a} -> {b}, {b} -> {a} "
            "(do they share one room?)") in run.output, run


def test_bad_chat_hosts_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                           "-u", "1", "-t", "1s", "--chat-hosts", "127.0.0.1:1,,127.0.0.1:2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2, proc
    assert "--chat-hosts has an empty entry" in proc.stderr, proc
    assert "Traceback" not in proc.stderr, proc


def test_reset_stats_option_resets_the_tally_with_locusts_table(server_process, tmp_path):
    # --reset-stats: Locust resets its table once all users are running (here
    # after a 2 s ramp, with deliveries already counted); the tally follows,
    # so the summary still equals the broadcast and send rows exactly.
    server = server_process("--quiet")
    run = run_locust(server.address, tmp_path, "--reset-stats", rate=USERS // 2, run_time="4s")
    assert "Resetting stats" in run.output, run
    assert_clean(run)


def test_run_time_counts_from_the_start_even_after_a_slow_startup(server_process, tmp_path):
    # On a loaded machine startup can block for seconds; gevent's loop clock
    # stands still meanwhile, and Locust's -t timer (spawn_later) would fire
    # at once. A locustfile that imports chatusers and then blocks 2 s
    # stands in for that startup.
    slow = tmp_path / "slow_locustfile.py"
    slow.write_text(f"import sys, time\nsys.path.insert(0, {str(LOCUSTFILE.parent)!r})\n"
                    "from chatusers import *  # noqa\n"
                    "started = time.perf_counter()\n"
                    "while time.perf_counter() - started < 2:\n    pass\n")
    server = server_process("--quiet")
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(slow), "--headless", "-u", "5",
                           "-r", "5", "-t", "2s", "--host", f"tcp://{LOOPBACK}:{server.address[1]}",
                           "--only-summary"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=40)
    stamps = [re.match(r"\[(\S+ \S+),(\d+)\]", line) for line in proc.stdout.splitlines()
              if "Run time limit set" in line or "--run-time limit reached" in line]
    assert len(stamps) == 2, proc.stdout
    armed, reached = (time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
                      for m in stamps)
    assert reached - armed >= 1.9, proc.stdout
    assert proc.returncode == 0 and "RESULT: PASS" in proc.stdout, proc.stdout
