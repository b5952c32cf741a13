"""Tests for the metrics/ kit: the scrape config, rules and dashboard, checked by
promtool and by a real Prometheus server scraping a real chat server.

Why: issue 4 asks that an operator can point a stock Prometheus at the server
with metrics/prometheus.yml and get correct values and sensible alerts. The
only convincing proof is to do exactly that: start `prometheus` (the Debian
package) on loopback, let it scrape, and ask it over its HTTP API.

`prometheus` and `promtool` must be on PATH: the test command installs them, so
a missing binary FAILS these tests instead of skipping them (a skipped test
would hide a broken CI setup).
"""

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from a2.mychatserver import DISCONNECT_REASONS, frame
from conftest import ROOT, Peer, wait_until
from metrics.exporter import METRIC_NAMES

METRICS_DIR = ROOT / "metrics"
CONFIG = METRICS_DIR / "prometheus.yml"
RULES = METRICS_DIR / "rules.yml"
DASHBOARD = METRICS_DIR / "dashboard.json"
README = METRICS_DIR / "README.md"

ALERTS = ["ChatServerDown", "ChatServerTargetMissing", "ChatSlowConsumerDrops",
          "ChatRelayLatencyHigh", "ChatClientsAtMaximum"]
RECORDING_RULES = ["instance:chat_messages_received:rate1m", "instance:chat_messages_relayed:rate1m",
                   "instance:chat_fanout_ratio:rate1m", "instance:chat_relay_latency_seconds:p50_5m",
                   "instance:chat_relay_latency_seconds:p99_5m"]
METRICS_LINE = re.compile(r"^Metrics on http://([\d.]+):(\d+)/metrics$")


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH; install it with `apt-get install -y prometheus`")
    return path


def run(*command, timeout=30):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def rule_names(kind):
    """Names of the `alert:` or `record:` rules in rules.yml, in file order (no YAML
    parser in requirements.txt; the real Prometheus test checks the same list)."""
    return re.findall(rf"^\s*- {kind}: (\S+)\s*$", RULES.read_text(), re.MULTILINE)


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


# --- static checks --------------------------------------------------------------------

def test_promtool_check_config():
    result = run(tool("promtool"), "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_check_rules():
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDING_RULES)} rules found" in result.stdout
    assert rule_names("alert") == ALERTS
    assert rule_names("record") == RECORDING_RULES


# Each alert fires exactly when it should, and not before its `for:`; annotations
# are asserted in full because they are what the person paged reads.
RULE_TESTS = """\
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - name: server down
    interval: 1m
    input_series:
      - series: 'up{{job="chat", instance="127.0.0.1:9100"}}'
        values: '1 0x10'
    alert_rule_test:
      - {{eval_time: 1m, alertname: ChatServerDown, exp_alerts: []}}  # pending: for 1m
      - eval_time: 3m
        alertname: ChatServerDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: chat, instance: "127.0.0.1:9100"}}
            exp_annotations:
              summary: "Chat server 127.0.0.1:9100 is down"
              description: "Prometheus has not been able to scrape 127.0.0.1:9100/metrics for 1 minute."
      - {{eval_time: 3m, alertname: ChatServerTargetMissing, exp_alerts: []}}

  - name: target missing
    interval: 1m
    input_series:
      - series: 'up{{job="something-else", instance="127.0.0.1:9100"}}'
        values: '1x10'
    alert_rule_test:
      - {{eval_time: 4m, alertname: ChatServerTargetMissing, exp_alerts: []}}  # pending: for 5m
      - eval_time: 6m
        alertname: ChatServerTargetMissing
        exp_alerts:
          - exp_labels: {{severity: critical, job: chat}}
            exp_annotations:
              summary: "No chat server is being scraped"
              description: 'There is no up{{job="chat"}} series: check the scrape config''s chat job and its targets.'

  - name: slow consumer dropped
    interval: 1m
    input_series:
      - series: 'chat_disconnects_total{{job="chat", instance="i", reason="slow_consumer"}}'
        values: '0 0 1x10'
      - series: 'chat_disconnects_total{{job="chat", instance="i", reason="exit"}}'
        values: '0+5x12'  # clients leaving normally never alert
    alert_rule_test:
      - {{eval_time: 1m, alertname: ChatSlowConsumerDrops, exp_alerts: []}}
      - eval_time: 3m
        alertname: ChatSlowConsumerDrops
        exp_alerts:
          - exp_labels: {{severity: warning, job: chat, instance: i, reason: slow_consumer}}
            exp_annotations:
              summary: "Chat server i dropped slow consumers"
              description: "Clients were disconnected in the last 5 minutes for having more than --outbound-budget bytes waiting to be sent."
      - {{eval_time: 9m, alertname: ChatSlowConsumerDrops, exp_alerts: []}}  # no drop in the last 5m

  - name: relay latency
    interval: 1m
    input_series:
      # instance slow: every message took 100-250ms, so p99 is about 0.25s.
      - series: 'chat_relay_latency_seconds_bucket{{job="chat", instance="slow", le="0.1"}}'
        values: '0x15'
      - series: 'chat_relay_latency_seconds_bucket{{job="chat", instance="slow", le="0.25"}}'
        values: '0+60x15'
      - series: 'chat_relay_latency_seconds_bucket{{job="chat", instance="slow", le="+Inf"}}'
        values: '0+60x15'
      # instance fast: every message within 1ms.
      - series: 'chat_relay_latency_seconds_bucket{{job="chat", instance="fast", le="0.001"}}'
        values: '0+60x15'
      - series: 'chat_relay_latency_seconds_bucket{{job="chat", instance="fast", le="+Inf"}}'
        values: '0+60x15'
    alert_rule_test:
      - {{eval_time: 4m, alertname: ChatRelayLatencyHigh, exp_alerts: []}}  # pending: for 5m
      - eval_time: 10m
        alertname: ChatRelayLatencyHigh
        exp_alerts:
          - exp_labels: {{severity: warning, job: chat, instance: slow}}
            exp_annotations:
              summary: "Chat relay p99 latency on slow is above 100ms"
              description: "99% of messages should be queued for all recipients within 100ms of arriving; for 5 minutes they were not."

  - name: clients at maximum
    interval: 1m
    input_series:
      - series: 'chat_clients{{job="chat", instance="i"}}'
        values: '5 10 10 10 9'
      - series: 'chat_max_clients{{job="chat", instance="i"}}'
        values: '10x4'
    alert_rule_test:
      - {{eval_time: 1m, alertname: ChatClientsAtMaximum, exp_alerts: []}}  # pending: for 1m
      - eval_time: 3m
        alertname: ChatClientsAtMaximum
        exp_alerts:
          - exp_labels: {{severity: warning, job: chat, instance: i}}
            exp_annotations:
              summary: "Chat server i is at its client limit"
              description: "chat_clients has reached --max-clients for 1 minute; new connections are refused."
      - {{eval_time: 4m, alertname: ChatClientsAtMaximum, exp_alerts: []}}  # back below

  - name: recording rules
    interval: 1m
    input_series:
      - series: 'chat_messages_received_total{{job="chat", instance="i"}}'
        values: '0+60x10'
      - series: 'chat_messages_relayed_total{{job="chat", instance="i"}}'
        values: '0+180x10'
    promql_expr_test:
      - expr: instance:chat_messages_received:rate1m
        eval_time: 5m
        exp_samples:
          - labels: 'instance:chat_messages_received:rate1m{{job="chat", instance="i"}}'
            value: 1
      - expr: instance:chat_fanout_ratio:rate1m
        eval_time: 5m
        exp_samples:
          - labels: 'instance:chat_fanout_ratio:rate1m{{job="chat", instance="i"}}'
            value: 3
"""


def test_alert_and_recording_rules_behave(tmp_path):
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=RULES))
    result = run(tool("promtool"), "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def dashboard_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_importable_and_covers_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chat-relay" and dashboard["title"] == "Chat relay"
    assert isinstance(dashboard["schemaVersion"], int)
    # The Prometheus data source is a variable, so the file imports (UI or
    # provisioning) into any Grafana without editing.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    titles = [p["title"] for p in panels]
    assert titles == ["Clients", "Messages per second", "Fan-out ratio", "Relay latency p50 / p99",
                      "Disconnects by reason", "Bytes per second", "Outbound backlog",
                      "Connections accepted per second"]
    # Every chat_ series a panel queries is one the exporter exposes.
    exposed = set(METRIC_NAMES) | {"chat_relay_latency_seconds_bucket"}
    used = {name for _, expr in dashboard_queries() for name in re.findall(r"\bchat_\w+", expr)}
    assert used <= exposed, used - exposed
    assert exposed - used == {"chat_relay_latency_seconds"}  # only through its _bucket series


def test_readme_documents_every_metric_and_alert():
    readme = README.read_text()
    for name in list(METRIC_NAMES) + ALERTS:
        assert re.search(rf"`{name}[`{{]", readme), name  # `name` or `name{labels}`


# --- a real Prometheus ------------------------------------------------------------------

class Prometheus:
    """A `prometheus` process on a free loopback port, with a query helper."""

    def __init__(self, config, data_dir, log_path):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path, **params):
        """GET /api/v1/<path>; the `data` of a successful answer, None while starting."""
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except (ConnectionError, urllib.error.URLError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 400:
                raise AssertionError(f"{params}: {exc.read().decode()}") from None  # bad query
            return None  # not listening or not ready yet
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr):
        data = self.api("query", query=expr)
        return None if data is None else data["result"]

    def log(self):
        return self.log_path.read_text()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def scrape_config_for(metrics_address, tmp_path):
    """metrics/prometheus.yml with the target pointed at the test server and 1s
    intervals; rules.yml copied next to it (rule_files is relative)."""
    text = CONFIG.read_text()
    for old, new in (('"127.0.0.1:9100"', f'"{metrics_address}"'),
                     ("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s")):
        assert text.count(old) == 1, f"{old!r} must appear exactly once in {CONFIG}"
        text = text.replace(old, new)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    shutil.copy(RULES, tmp_path / "rules.yml")
    return config


def test_real_prometheus_scrapes_exact_values_and_nothing_fires(server_process, tmp_path):
    server = server_process("--metrics-port", "0", "--quiet")
    match = next(filter(None, map(METRICS_LINE.match, server.lines)))
    metrics_address = f"{match.group(1)}:{match.group(2)}"

    # The conversation: three clients, two messages, one exit. Wait until the
    # server has registered all three, or `a` might talk before `c` is listening.
    a, b, c = (Peer(server.address) for _ in range(3))
    wait_until(lambda: _scraped_clients(metrics_address) == 3, message="3 clients registered")
    a.send("hello\n")
    b.expect(frame(a.port, "hello"))
    c.expect(frame(a.port, "hello"))
    b.send("hi\n")
    a.expect(frame(b.port, "hi"))
    c.expect(frame(b.port, "hi"))
    c.send("exit\n")
    c.expect_closed()

    prometheus = Prometheus(scrape_config_for(metrics_address, tmp_path), tmp_path / "data",
                            tmp_path / "prometheus.log")
    try:
        expected = {
            ("up", ""): 1.0,
            ("chat_connections_total", ""): 3.0,
            ("chat_clients", ""): 2.0,
            ("chat_max_clients", ""): 10000.0,
            ("chat_messages_received_total", ""): 2.0,
            ("chat_messages_relayed_total", ""): 4.0,
            ("chat_received_bytes_total", ""): float(len(b"hello\nhi\nexit\n")),
            ("chat_sent_bytes_total", ""): float(2 * len(frame(a.port, "hello")) + 2 * len(frame(b.port, "hi"))),
            ("chat_outbound_backlog_bytes", ""): 0.0,
            ("chat_relay_latency_seconds_count", ""): 2.0,
            **{("chat_disconnects_total", reason): float(reason == "exit")
               for reason in DISCONNECT_REASONS},
        }
        selector = ('{job="chat", __name__=~"up|chat_[a-z_]+_total|chat_clients|chat_max_clients'
                    '|chat_outbound_backlog_bytes|chat_relay_latency_seconds_count"}')
        last = {}

        def values():
            nonlocal last
            result = prometheus.query(selector)
            if result is None:
                return False
            for series in result:
                assert series["metric"]["instance"] == metrics_address
            last = {(s["metric"]["__name__"], s["metric"].get("reason", "")): float(s["value"][1])
                    for s in result}
            return last == expected

        try:
            wait_until(values, timeout=20, message="Prometheus to scrape the expected values")
        except AssertionError:
            assert last == expected, prometheus.log()
            raise

        # Every rule has been evaluated without error, and the alerts are all there.
        def rules_evaluated():
            data = prometheus.api("rules")
            rules = [rule for group in data["groups"] for rule in group["rules"]]
            if any(rule["health"] != "ok" for rule in rules):
                return None
            return rules

        rules = wait_until(rules_evaluated, timeout=10, message="all rules evaluated, health ok")
        assert [r["name"] for r in rules if r["type"] == "alerting"] == ALERTS
        assert [r["name"] for r in rules if r["type"] == "recording"] == RECORDING_RULES
        assert all(rule.get("lastError", "") == "" for rule in rules), rules

        # Healthy: nothing fires. ChatServerTargetMissing may be pending from an
        # evaluation that ran before the first scrape (absent(up) was true then);
        # it must clear at the next evaluation, leaving no alert even pending.
        assert prometheus.query('ALERTS{alertstate="firing"}') == []
        active = []

        def no_active_alerts():
            nonlocal active
            active = [alert for alert in prometheus.api("alerts")["alerts"] if alert["state"] != "inactive"]
            return active == []

        try:
            wait_until(no_active_alerts, timeout=5, message="no pending or firing alerts")
        except AssertionError:
            assert active == []
            raise
        assert prometheus.query('ALERTS{alertstate="firing"}') == []

        # Every dashboard query is valid PromQL that Prometheus accepts.
        for title, expr in dashboard_queries():
            grafana_free = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            assert prometheus.query(grafana_free) is not None, title
    finally:
        prometheus.stop()
        for peer in (a, b, c):
            peer.close()


def _scraped_clients(metrics_address):
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "chat_clients")
