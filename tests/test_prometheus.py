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
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from a2.mychatserver import DEFAULT_MEMORY_BUDGET, DISCONNECT_REASONS, REFUSAL_REASONS, VERSION, ChatServer, frame
from conftest import ROOT, Peer, wait_until
from metrics.exporter import BACKBONE_METRIC_NAMES, METRIC_NAMES, start_metrics_server
from relayproc import free_port

METRICS_DIR = ROOT / "metrics"
CONFIG = METRICS_DIR / "prometheus.yml"
RULES = METRICS_DIR / "rules.yml"
RULE_TESTS = METRICS_DIR / "rules_test.yml"
DASHBOARD = METRICS_DIR / "dashboard.json"
README = METRICS_DIR / "README.md"

ALERTS = ["ChatServerDown", "ChatServerTargetMissing", "ChatSlowConsumerDrops",
          "ChatRelayLatencyHigh", "ChatClientsAtMaximum", "ChatFileDescriptorsNearLimit",
          "ChatServerRestarted", "ChatAcceptErrors", "ChatLogLinesDropped",
          "ChatConnectionStorm", "ChatMemoryBudgetEvictions", "ChatClientsThrottled",
          "ChatBackboneDown", "ChatBackboneGap", "ChatBackboneOutboxHigh", "ChatBackboneDelayHigh",
          "ChatBackboneRejectedEntries"]
BACKBONE_ALERTS = ALERTS[-5:]
RECORDING_RULES = ["instance:chat_messages_received:rate1m", "instance:chat_messages_relayed:rate1m",
                   "instance:chat_fanout_ratio:rate1m", "instance:chat_relay_latency_seconds:p50_5m",
                   "instance:chat_relay_latency_seconds:p99_5m", "instance:process_open_fds:ratio",
                   "instance:chat_backbone_messages_out:rate1m", "instance:chat_backbone_messages_in:rate1m",
                   "instance:chat_backbone_delay_seconds:p99_5m"]
METRICS_LINE = re.compile(r"^Metrics on http://([\d.]+):(\d+)/metrics$")


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH; install it with `apt-get install -y prometheus`")
    return path


def run(*command, timeout=30, cwd=None):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=cwd)


def rule_names(kind):
    """Names of the `alert:` or `record:` rules in rules.yml, in file order (no YAML
    parser in requirements.txt; the real Prometheus test checks the same list)."""
    return re.findall(rf"^\s*- {kind}: (\S+)\s*$", RULES.read_text(), re.MULTILINE)


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


def test_rule_unit_tests_pass_as_an_operator_runs_them():
    """metrics/rules_test.yml, with the exact command its header and the README give."""
    result = run(tool("promtool"), "test", "rules", "metrics/rules_test.yml", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "Unit Testing:  metrics/rules_test.yml\n  SUCCESS\n\n", result.stdout


def test_every_alert_is_unit_tested_firing_and_has_a_runbook_section():
    tests = RULE_TESTS.read_text()
    readme = README.read_text()
    # GitHub's anchors for the README's headings (lowercase, spaces to dashes).
    anchors = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
               for heading in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)}
    rules = RULES.read_text()
    for alert in ALERTS:
        anchor = alert.lower()
        # The rule carries the link, a unit test expects it on a firing alert,
        # and the README has the section it points at.
        assert rules.count(f'runbook_url: "metrics/README.md#{anchor}"') == 1, alert
        assert tests.count(f'runbook_url: "metrics/README.md#{anchor}"') >= 1, alert
        assert anchor in anchors, f"metrics/README.md has no section for {alert}"


def dashboard_queries():
    """(panel title, expr, is a backbone panel) for every query of every panel (rows have none)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"], "chat_backbone_" in target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


# Panels that are empty on a healthy single server, and must be exactly that.
EMPTY_WHEN_HEALTHY = {"Firing alerts"}


def _grafana_units():
    from grafana_foundation_sdk.models import units
    return {value for name, value in vars(units).items() if not name.startswith("_") and isinstance(value, str)}


def _lost_in_round_trip(ours, back, path="$"):
    """Every key and value of `ours` that Grafana's model (`back`) did not keep."""
    if isinstance(ours, dict):
        if not isinstance(back, dict):
            return [f"{path}: not an object in Grafana's model"]
        lost = []
        for key, value in ours.items():
            lost += ([f"{path}.{key}: unknown to Grafana's schema"] if key not in back
                     else _lost_in_round_trip(value, back[key], f"{path}.{key}"))
        return lost
    if isinstance(ours, list):
        if not isinstance(back, list) or len(back) != len(ours):
            return [f"{path}: list changed"]
        return [item for i, (a, b) in enumerate(zip(ours, back)) for item in _lost_in_round_trip(a, b, f"{path}[{i}]")]
    return [] if ours == back else [f"{path}: {ours!r} became {back!r}"]


def test_dashboard_round_trips_through_grafanas_own_dashboard_model():
    """grafana-foundation-sdk is Grafana's generated model of the dashboard JSON
    (its schema as Python classes, one per panel plugin and data source). Our file
    is decoded with it and encoded back: any key Grafana's schema does not know,
    on the dashboard, a panel, its options, field config or a target, is lost on
    the way and fails here. Every panel type must be a plugin the SDK knows and
    every target must decode as a Prometheus query (not an unknown one)."""
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import prometheus
    from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

    register_default_plugins()
    ours = json.loads(DASHBOARD.read_text())
    model = Dashboard.from_json(ours)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    assert _lost_in_round_trip(ours, back) == []
    for panel in model.panels:
        if isinstance(panel, RowPanel):
            continue
        assert runtime.panelcfg_config(panel.type_val) is not None, panel.type_val
        for query in panel.targets:
            assert isinstance(query, prometheus.Dataquery), (panel.title, type(query))


def test_dashboard_is_importable_and_covers_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chat-relay" and dashboard["title"] == "Chat relay"
    assert isinstance(dashboard["schemaVersion"], int)
    # The Prometheus data source is a variable, so the file imports (UI or
    # provisioning) into any Grafana without editing.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "instance"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert variables["instance"]["query"]["query"] == 'label_values(chat_clients{job="chat"}, instance)'
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    units = _grafana_units()
    cells = set()
    rows = []
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            assert grid == {"h": 1, "w": 24, "x": 0, "y": grid["y"]} and panel["panels"] == []
            assert "targets" not in panel and "datasource" not in panel
            rows.append(panel["title"])
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "heatmap"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Per instance: every query follows the instance variable.
            assert 'instance=~"$instance"' in target["expr"] or "ALERTS" in target["expr"], panel["title"]
        # Units that read right: a Grafana unit or a custom "suffix: ...", never the default "short".
        unit = panel["fieldConfig"]["defaults"].get("unit")
        if panel["type"] != "heatmap":
            assert unit is not None and unit != "short", panel["title"]
            assert unit in units or unit.startswith("suffix: "), (panel["title"], unit)
    assert rows == ["Health", "Traffic", "Disconnects and errors, per instance", "Process",
                    "Backbone, per instance (only with --backbone)", "Strangers"]
    by_title = {p["title"]: p for p in panels}
    assert by_title["Messages per second"]["fieldConfig"]["defaults"]["unit"] == "suffix: msg/s"
    assert by_title["Relay latency heatmap"]["targets"][0]["format"] == "heatmap"
    assert by_title["Relay latency heatmap"]["options"]["calculate"] is False  # Prometheus' own buckets
    assert {"CPU", "Resident memory", "Open descriptors vs limit", "Target up", "Firing alerts",
            "Disconnects by reason", "Slow-consumer drops"} <= set(by_title)
    # Issue 19's strangers: refusals by reason, throttling, outboxes vs the memory budget, evictions.
    assert {"Refused connections by reason", "Throttled clients", "Outbox vs memory budget",
            "Memory-budget evictions", "Flood-control pauses and summarised log lines"} <= set(by_title)

    queries = dashboard_queries()
    # Every chat_ series a panel queries is one the exporter exposes.
    exposed = set(METRIC_NAMES) | set(BACKBONE_METRIC_NAMES) | {
        "chat_relay_latency_seconds_bucket", "chat_backbone_delay_seconds_bucket"}
    used = {name for _, expr, _ in queries for name in re.findall(r"(?<![:\w])chat_\w+", expr)}
    assert used <= exposed, used - exposed
    # Panels use the recording rules rules.yml defines (all of them but one), and only those.
    recorded = {name for _, expr, _ in queries for name in re.findall(r"\binstance:[\w:]+", expr)}
    assert recorded <= set(RECORDING_RULES), recorded - set(RECORDING_RULES)
    assert set(RECORDING_RULES) - recorded == {"instance:chat_messages_relayed:rate1m"} - recorded
    # The ALERTS series and process_* are on the dashboard too.
    exprs = " ".join(expr for _, expr, _ in queries)
    for name in ("ALERTS", "up{", "process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert name in exprs, name


def test_readme_documents_every_metric_and_alert():
    readme = README.read_text()
    for name in list(METRIC_NAMES) + list(BACKBONE_METRIC_NAMES) + ALERTS:
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


def scrape_config_for(metrics_address, tmp_path, *more_targets):
    """metrics/prometheus.yml with the target pointed at the test server(s) and 1s
    intervals; rules.yml copied next to it (rule_files is relative)."""
    text = CONFIG.read_text()
    targets = ", ".join(f'"{address}"' for address in (metrics_address, *more_targets))
    for old, new in (('"127.0.0.1:9100"', targets),
                     ("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s")):
        assert text.count(old) == 1, f"{old!r} must appear exactly once in {CONFIG}"
        text = text.replace(old, new)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    shutil.copy(RULES, tmp_path / "rules.yml")
    return config


class StandInBackbone:
    """A healthy backbone's stats(), growing at every call, exactly in the shape
    metrics/README.md defines (the real one is cluster/'s, not part of this
    test): lets the dashboard's backbone row be queried against real data."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

    def __init__(self):
        self._calls = 0
        self._lock = threading.Lock()

    def stats(self):
        with self._lock:
            self._calls += 1
            n = self._calls
        counts = [0] * (len(self.BUCKETS) + 1)
        counts[2] = 10 * n  # every message within 2.5 ms
        return {"connected": True, "entries_out_total": 2 * n, "messages_out_total": 10 * n,
                "entries_in_total": 2 * n, "messages_in_total": 10 * n, "reconnects_total": 0,
                "publish_errors_total": 0, "outbox_bytes": 0, "outbox_budget_bytes": 1 << 20,
                "dropped_messages_total": 0, "duplicates_total": 0, "gaps_total": 0, "peers": 2,
                "losses_total": 0, "rejected_total": {"control": 0},
                "delay_buckets": self.BUCKETS, "delay_counts": counts, "delay_sum": 0.02 * n}

    def publish(self, port, messages):
        pass

    def stop(self):
        pass


@pytest.fixture
def node_with_backbone():
    """A real ChatServer with a StandInBackbone attached through the server's
    backbone hook (as --backbone attaches cluster/'s), and its exporter."""
    node = ChatServer("127.0.0.1", 0, quiet=True)
    node.attach_backbone(StandInBackbone())
    thread = threading.Thread(target=node.serve_forever, daemon=True)
    thread.start()
    exporter = start_metrics_server(node, port=0)
    try:
        yield f"{exporter.host}:{exporter.port}"
    finally:
        exporter.stop()
        node.shutdown()
        thread.join(5)


def test_real_prometheus_scrapes_exact_values_and_nothing_fires(server_process, node_with_backbone, tmp_path):
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

    # Prometheus scrapes two targets: the server process (exact values below)
    # and a node with a (stand-in) backbone, for the dashboard's backbone row.
    prometheus = Prometheus(scrape_config_for(metrics_address, tmp_path, node_with_backbone),
                            tmp_path / "data", tmp_path / "prometheus.log")
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
            ("chat_build_info", ""): 1.0,
            ("chat_max_client_backlog_bytes", ""): 0.0,
            **{("chat_accept_errors_total", reason): 0.0
               for reason in ("emfile", "enfile", "enobufs", "enomem", "other")},
            ("chat_flow_control_pauses_total", ""): 0.0,
            ("chat_flow_control_pause_seconds_total", ""): 0.0,
            ("chat_log_lines_dropped_total", ""): 0.0,
            **{("chat_refused_connections_total", reason): 0.0 for reason in REFUSAL_REASONS},
            ("chat_throttled_clients", ""): 0.0,
            ("chat_throttle_pauses_total", ""): 0.0,
            ("chat_throttled_seconds_total", ""): 0.0,
            ("chat_memory_budget_bytes", ""): float(DEFAULT_MEMORY_BUDGET),
            ("chat_log_lines_summarised_total", ""): 0.0,
        }
        selector = (f'{{job="chat", instance="{metrics_address}", __name__=~"up|chat_[a-z_]+_total|chat_clients'
                    '|chat_max_clients|chat_outbound_backlog_bytes|chat_relay_latency_seconds_count'
                    '|chat_build_info|chat_max_client_backlog_bytes|chat_throttled_clients|chat_memory_budget_bytes"}')
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
            versions = [s["metric"].get("version") for s in result if s["metric"]["__name__"] == "chat_build_info"]
            assert versions in ([], [VERSION])
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

        # Every dashboard query returns data from these live servers (with live
        # traffic: a and b keep talking), once the recording rules have run and
        # rate() has two samples: the backbone row from the node with a
        # backbone, every other panel from the server process too. Only
        # "Firing alerts" must return exactly nothing: all is well.
        assert prometheus.query(f'chat_backbone_connected{{instance="{metrics_address}"}}') == []
        talking = threading.Event()
        talker = threading.Thread(target=_keep_talking, args=(a, b, talking), daemon=True)
        talker.start()
        try:
            for title, expr, backbone in dashboard_queries():
                grafana_free = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
                if title in EMPTY_WHEN_HEALTHY:
                    assert prometheus.query(grafana_free) == [], title
                    continue
                # Data, not NaN, for the instance that has it (the node with a
                # backbone has no chat traffic: its fan-out ratio is NaN), or
                # for the aggregate (no instance label: heatmap, alert count).
                wanted = node_with_backbone if backbone else metrics_address
                got = []

                def has_data():
                    nonlocal got
                    got = prometheus.query(grafana_free)
                    mine = [s for s in got or [] if s["metric"].get("instance", wanted) == wanted]
                    return bool(mine) and all(s["value"][1] != "NaN" for s in mine)

                try:
                    wait_until(has_data, timeout=15, message=f"data for panel {title!r}: {expr}")
                except AssertionError:
                    assert got, (title, expr)
                    raise
        finally:
            talking.set()
            talker.join(10)
        assert prometheus.query('ALERTS{alertstate="firing"}') == []
    finally:
        prometheus.stop()
        for peer in (a, b, c):
            peer.close()


def _keep_talking(a, b, stop):
    """a and b exchange a message every 0.2 s until `stop` (bounded: 300 rounds)."""
    for n in range(300):
        if stop.wait(0.2):
            return
        a.send(f"tick {n}\n")
        b.expect(frame(a.port, f"tick {n}"))


def _scraped_clients(metrics_address):
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "chat_clients")
