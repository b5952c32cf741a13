"""Locust over three real nodes, with a redis-server SIGKILL and restart mid-run.

`locust -f loadtest/chatusers.py --chat-hosts A,B,C` spreads its users
round-robin over the nodes; its tokens carry sender and sequence, so the
delivery check (lost, duplicated, reordered, mis-framed, mis-attributed,
echoed, unexpected disconnects) works across nodes. The run must PASS
while Redis is killed and restarted on its AOF under it. Locust runs as a
subprocess (its gevent patching must not reach this process)."""

import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest
import redis

from cluster.local import LOOPBACK, RedisServer, start_nodes
from conftest import ROOT, wait_until

LOCUSTFILE = ROOT / "loadtest" / "chatusers.py"

pytestmark = pytest.mark.timeout(60)


def test_locust_over_three_nodes_passes_through_a_redis_restart(tmp_path):
    with RedisServer(appendonly=True) as redis_server:
        nodes = start_nodes(redis_server.url(), 3, args=["--quiet"])
        try:
            for node in nodes:
                wait_until(lambda: all(node.count(f"hearing node {other.node_id}")
                                       for other in nodes if other is not node),
                           timeout=10, message="nodes hear each other")
            hosts = ",".join(f"{host}:{port}" for host, port in (node.address for node in nodes))
            command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                       "-u", "30", "-r", "30", "-t", "6s", "--host", f"tcp://{hosts.split(',')[0]}",
                       "--chat-hosts", hosts, "--only-summary", "--web-host", LOOPBACK,
                       "--chat-wait", "0.1", "--chat-churn", "0.05", "--chat-message-size", "100"]
            log_path = tmp_path / "locust.log"
            direct = redis.Redis(host=LOOPBACK, port=redis_server.port)
            with open(log_path, "w") as log:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    # mid-run: once users on every node chat across the backbone
                    wait_until(lambda: all(node.count("New connection") >= 5 for node in nodes),
                               timeout=20, message="users on every node")
                    wait_until(lambda: direct.xlen("chat:room") > 100, timeout=20,
                               message="traffic through Redis")
                    redis_server.kill(signal.SIGKILL)
                    redis_server.start()
                    returncode = proc.wait(40)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            output = log_path.read_text()
            assert returncode == 0 and "RESULT: PASS" in output, output[-4000:]
            block = output[output.index("Chat delivery check"):]
            summary = {label.strip(): int(value) for label, value
                       in re.findall(r"^  ([a-z ]+?)\s+(\d+)$", block, re.MULTILINE)}
            print(block)  # shown with -s, and on failure
            assert summary["delivered"] == summary["expected deliveries"] > 1000, block
            assert summary["lost"] == summary["duplicates"] == summary["reordered"] == 0, block
            assert all(node.count("Backbone: reconnected to Redis") == 1 for node in nodes)
            assert all(node.count("backbone_gap") == 0 for node in nodes)
        finally:
            for node in nodes:
                node.stop()
