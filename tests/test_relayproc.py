"""relayproc.py: the one launcher of relay processes and reader of /proc that
the tests, the benchmark and the local cluster share. Its parse of the
listening line must hold for IPv6 as well, and a relay that never listens
must be a one-line error, not a hang."""

import os
import signal
import sys

import pytest

from conftest import SERVER_SCRIPT, Peer
from relayproc import RelayProcess, cpu_seconds, listening_address, proc_status, process_usage, python_relay


@pytest.mark.parametrize("line, address", [
    ("Server listening on 127.0.0.1:12345", ("127.0.0.1", 12345)),
    ("Server listening on 0.0.0.0:5000\n", ("0.0.0.0", 5000)),
    ("Server listening on ::1:5000", ("::1", 5000)),  # the port is after the LAST colon
    ("Server listening on [::1]:5000", ("::1", 5000)),
    ("Server listening on :::40000", ("::", 40000)),
    ("Server listening on localhost:1", ("localhost", 1)),
    ("[12:00:00] Server listening on 10.0.0.2:80", ("10.0.0.2", 80)),
    ("Metrics on http://127.0.0.1:9100/metrics", None),
    ("Server listening on 127.0.0.1", None),
    ("", None),
])
def test_listening_line_gives_host_and_port(line, address):
    assert listening_address(line) == address


def test_proc_readers_see_this_process():
    pid = os.getpid()
    threads, fds, rss = process_usage(pid)
    assert threads >= 1 and proc_status(pid, "Threads") >= 1  # other tests' threads come and go
    assert fds >= 3 and rss > 1024 and proc_status(pid, "VmRSS") > 1024
    assert proc_status(pid, "NoSuchField") == 0
    before = cpu_seconds(pid)
    sum(range(2_000_000))  # some CPU for the clock to see
    assert cpu_seconds(pid) >= before > 0


def test_a_relay_process_listens_logs_and_stops():
    with python_relay(SERVER_SCRIPT) as relay:
        host, port = relay.address
        assert host == "127.0.0.1" and port > 0
        peer = Peer(relay.address)
        relay.wait_for(lambda: relay.count("New connection"), what="the connection's log line")
        threads, fds, rss = relay.usage()
        assert threads >= 2 and fds >= 3 and rss > 0
        assert relay.cpu_seconds() > 0 and relay.status("VmHWM") >= rss
        assert relay.find(r"listening on (\S+)").group(1) == f"{host}:{port}"
        peer.close()
        assert relay.stop(signal.SIGTERM) == 0
        assert relay.lines[-1] == "Server stopped"
    assert not relay.running()


def test_a_relay_that_never_listens_is_one_error_with_its_output():
    with pytest.raises(RuntimeError, match=r"did not start listening: .*no such option|unrecognized"):
        python_relay(SERVER_SCRIPT, "--no-such-option")
    with pytest.raises(RuntimeError, match=r"did not start listening: \(no output\)"):
        RelayProcess([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
