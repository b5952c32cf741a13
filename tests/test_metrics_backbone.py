"""The backbone's metrics end to end: a real redis-server, two real nodes
(`a2/mychatserver.py --backbone ... --metrics-port 0`), real clients, and the
chat_backbone_* families read over HTTP from each node's /metrics.

Why: metrics/exporter.py translates cluster/'s backbone.stats() (the dict
defined in metrics/README.md); the translation is property-tested in
test_metrics_values.py, this proves the two packages agree on a live cluster.
"""

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.backbone import DELAY_BUCKETS
from cluster.local import RedisServer
from conftest import Peer, wait_until
from metrics.exporter import BACKBONE_METRIC_NAMES

METRICS_LINE = re.compile(r"^Metrics on http://([\d.]+):(\d+)/metrics$")
pytestmark = pytest.mark.timeout(40)


def samples(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def metrics_url(node):
    match = next(filter(None, map(METRICS_LINE.match, node.lines)))
    return f"http://{match.group(1)}:{match.group(2)}/metrics"


def test_two_nodes_expose_exact_backbone_metrics(server_process):
    with RedisServer(appendonly=False) as redis:
        nodes = [server_process("--quiet", "--metrics-port", "0", "--backbone", redis.url()) for _ in range(2)]
        urls = [metrics_url(node) for node in nodes]
        wait_until(lambda: all(samples(url).get("chat_backbone_connected") == 1.0 and
                               samples(url).get("chat_backbone_peers") == 1.0 for url in urls),
                   timeout=15, message="both nodes connected and aware of each other")

        alice, bob = Peer(nodes[0].address), Peer(nodes[1].address)
        wait_until(lambda: all(samples(url)["chat_clients"] == 1.0 for url in urls), message="one client each")
        alice.send("hello over redis\n")
        bob.expect(f"{alice.port}: hello over redis\n", timeout=10)

        def settled():
            a, b = samples(urls[0]), samples(urls[1])
            return (a, b) if (a["chat_backbone_messages_out_total"] == 1.0
                              and b["chat_backbone_messages_in_total"] == 1.0) else None

        a, b = wait_until(settled, timeout=10, message="the message counted out on A and in on B")
        for values in (a, b):
            exposed = {key.split("{")[0] for key in values if key.startswith("chat_backbone_")}
            expected = {name for name in BACKBONE_METRIC_NAMES if name != "chat_backbone_delay_seconds"}
            expected |= {"chat_backbone_delay_seconds_bucket", "chat_backbone_delay_seconds_count",
                         "chat_backbone_delay_seconds_sum"}
            assert exposed == expected
            for name in ("reconnects", "publish_errors", "dropped_messages", "duplicates", "gaps"):
                assert values[f"chat_backbone_{name}_total"] == 0.0, name
            assert values["chat_backbone_outbox_bytes"] == 0.0
            assert values["chat_backbone_outbox_budget_bytes"] > 0
            assert values['chat_disconnects_total{reason="backbone_gap"}'] == 0.0
            les = [key for key in values if key.startswith("chat_backbone_delay_seconds_bucket")]
            assert les == [f'chat_backbone_delay_seconds_bucket{{le="{le}"}}'
                           for le in [repr(float(b)) for b in DELAY_BUCKETS] + ["+Inf"]]
        assert a["chat_backbone_messages_in_total"] == 0.0 and b["chat_backbone_messages_out_total"] == 0.0
        assert b['chat_backbone_delay_seconds_bucket{le="+Inf"}'] == b["chat_backbone_delay_seconds_count"] == 1.0
        assert a["chat_backbone_delay_seconds_count"] == 0.0
        assert a["chat_backbone_entries_out_total"] >= 1.0  # the message's entry (and heartbeats)
        assert b["chat_backbone_entries_in_total"] >= 1.0

        redis.stop()  # the backbone goes down: the gauge says so (ChatBackboneDown's input)
        wait_until(lambda: all(samples(url)["chat_backbone_connected"] == 0.0 for url in urls),
                   timeout=15, message="both nodes report the backbone down")
        alice.close()
        bob.close()
