"""The load test's Delivery view, as a person sees it: Locust's real web UI in
a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), against the real relay and against tests/fault_relay.py.

Each test starts Locust (`locust -f loadtest/chatusers.py`, a subprocess: the
locustfile monkey-patches with gevent, see test_loadtest.py) with its web UI
on 127.0.0.1 and a free port, starts a test through the UI's HTTP API (POST
/swarm, as the UI's own form does), opens the UI, clicks the Delivery tab and
reads what the rendered table says. A few seconds of load each; every wait is
on a condition with a deadline.

Set CHAT_SCREENSHOT_DIR to keep the screenshots the tests take (the one in
loadtest/results/ was made that way).
"""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import LOOPBACK, ROOT, wait_until
from relayproc import free_port
from test_loadtest import LOCUSTFILE, fault_relay

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
USERS = 10
# 10 users at ~10 messages/s each: ~900 deliveries/s, some churn.
CHAT_FORM = {"chat_wait": "0.1", "chat_churn": "0.05", "chat_message_size": "100"}


def poll(predicate, timeout, message, interval=0.05):
    """wait_until for a browser or HTTP read: polled every 50 ms unless told."""
    return wait_until(predicate, timeout, message, interval=interval)


# --- the browser ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (starting one takes ~2 s)."""
    profile = tempfile.mkdtemp(prefix="chat-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(1200, 1400)
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# All rows of the rendered table, read in one go (React re-renders it with
# every stats refresh, so element handles would go stale between reads).
READ_TABLE = """
return Array.from(document.querySelectorAll('table tbody tr'))
            .map(tr => Array.from(tr.cells).map(td => td.innerText.trim()));
"""


def open_delivery_tab(driver, ui):
    """Open the web UI and click its Delivery tab, as a person would."""
    driver.get(ui.url("/"))
    tab = poll(lambda: driver.find_elements(By.XPATH, "//*[@role='tab'][normalize-space()='Delivery']"),
               15, lambda: f"the Delivery tab; the page shows:\n{driver.find_element(By.TAG_NAME, 'body').text}")
    tab[0].click()
    poll(lambda: "verdict" in shown(driver), 15, "the Delivery table")


def shown(driver):
    """{figure: value} as the Delivery table shows them."""
    return {row[0]: row[1] for row in driver.execute_script(READ_TABLE) if len(row) == 2}


def number(view, figure):
    return int(view[figure])


def screenshot(driver, tmp_path, name):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CHAT_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["CHAT_SCREENSHOT_DIR"]) / name)
    return path


# --- Locust with its web UI -------------------------------------------------------------

SUMMARY = re.compile(r"Chat delivery check\n(?P<body>(?:  .*\n)*?  RESULT: (?P<result>.*))")


def summaries(text):
    """Every 'Chat delivery check' block in Locust's output, as
    {label: int, ..., "loss ratio": str, "RESULT": str}."""
    found = []
    for match in SUMMARY.finditer(text):
        body = match["body"]
        figures = {label.strip(): int(value)
                   for label, value in re.findall(r"^  ([a-z ]+?)\s+(\d+)$", body, re.MULTILINE)}
        figures["loss ratio"] = re.search(r"^  loss ratio\s+(\S+)$", body, re.MULTILINE)[1]
        figures["RESULT"] = match["result"]
        found.append(figures)
    return found


class LocustWebUI:
    """`locust -f loadtest/chatusers.py` with its web UI on a free loopback port."""

    def __init__(self, relay, tmp_path, *extra):
        self.port = free_port()
        self.relay = f"tcp://{relay[0]}:{relay[1]}"
        self.log_path = tmp_path / "locust.log"
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--web-host", LOOPBACK,
                   "--web-port", str(self.port), "--host", self.relay, *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        poll(self._answers, 20, lambda: f"the web UI to answer; log:\n{self.output}")

    def _answers(self):
        assert self.proc.poll() is None, f"locust exited early:\n{self.output}"
        try:
            self.get("/stats/requests")
        except OSError:
            return False
        return True

    def url(self, path):
        return f"http://{LOOPBACK}:{self.port}{path}"

    def get(self, path):
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return response.read()

    def get_json(self, path):
        return json.loads(self.get(path))

    def post(self, path, form=None):
        data = urllib.parse.urlencode(form or {}).encode()
        with urllib.request.urlopen(self.url(path), data=data, timeout=30) as response:
            return response.read()

    def swarm(self, users=USERS, **form):
        answer = json.loads(self.post("/swarm", {"user_count": users, "spawn_rate": users,
                                                 "host": self.relay, **CHAT_FORM, **form}))
        assert answer["success"], answer
        # /swarm answers before the runner has started; the page a browser
        # loads shows the runner's state at that moment.
        poll(lambda: self.get_json("/stats/requests")["state"] == "running", 20, "the test to run")

    def stats_row(self, name):
        for row in self.get_json("/stats/requests")["stats"]:
            if row["name"] == name:
                return row
        return {"num_requests": 0, "num_failures": 0}

    def wait_for_stats_row(self, name, key, value, timeout=10):
        """Wait until Locust's own table says `value` for `key` in row `name`.
        (Locust caches /stats/requests for a couple of seconds, so right
        after a stop or reset it may still answer what it had before.)"""
        poll(lambda: self.stats_row(name)[key] == value, timeout,
             lambda: f"the {name!r} row's {key} to be {value}: {self.stats_row(name)}", interval=0.2)

    @property
    def output(self):
        return self.log_path.read_text()

    def wait_for_summaries(self, n, timeout=20):
        return poll(lambda: len(summaries(self.output)) >= n and summaries(self.output), timeout,
                    lambda: f"{n} summaries in Locust's log:\n{self.output[-3000:]}")

    def terminate(self, timeout=30):
        """SIGTERM, as a service manager stops it: Locust quits; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers too, if any
        self.proc.wait()

    def __repr__(self):
        return f"<LocustWebUI>\n{self.output[-5000:]}"


@contextlib.contextmanager
def locust_web_ui(relay, tmp_path, *extra):
    ui = LocustWebUI(relay, tmp_path, *extra)
    try:
        yield ui
    finally:
        ui.close()


def assert_view_matches_summary(view, summary):
    for figure in ("messages sent", "expected deliveries", "delivered", "lost", "duplicates",
                   "reordered", "bad frames", "wrong port", "unexpected disconnects"):
        assert number(view, figure) == summary[figure], (figure, view, summary)
    assert view["loss ratio"].startswith(summary["loss ratio"] + " "), (view, summary)


# --- the tests --------------------------------------------------------------------------

def test_clean_relay_shows_pass_live_and_stop_logs_the_summary(browser, server_process, tmp_path):
    server = server_process("--quiet")
    with locust_web_ui(server.address, tmp_path) as ui:
        ui.swarm()
        open_delivery_tab(browser, ui)
        # Live: the figures grow while the test runs, and say PASS.
        view = poll(lambda: (v := shown(browser)) and v["state"] == "test 1: running"
                    and number(v, "delivered") >= 300 and v, 20, lambda: shown(browser))
        assert view["verdict"] == "PASS" and view["lost"] == "0", view
        assert view["last faults"] == "none", view

        ui.post("/stop")  # the Stop button's request
        # Stop prints the summary at once: Locust is still running.
        [summary] = ui.wait_for_summaries(1)
        assert ui.proc.poll() is None
        assert summary["RESULT"].startswith("PASS - "), ui
        view = poll(lambda: (v := shown(browser)) and v["state"] == "test 1: stopped" and v, 15,
                    lambda: shown(browser))
        assert view["verdict"] == "PASS", view
        assert view["lost"] == "0" and view["loss ratio"].startswith("0% "), view
        assert_view_matches_summary(view, summary)
        assert summary["delivered"] == summary["expected deliveries"]
        ui.wait_for_stats_row("broadcast", "num_requests", summary["delivered"])
        returncode = ui.terminate()
    assert returncode == 0, ui


def test_fault_relay_shows_fail_live_with_the_faults(browser, tmp_path):
    with fault_relay("drop", every=200) as address, locust_web_ui(address, tmp_path) as ui:
        ui.swarm()
        open_delivery_tab(browser, ui)
        # While the test runs, a person sees it fail and which sender lost what.
        view = poll(lambda: (v := shown(browser)) and v["state"] == "test 1: running"
                    and number(v, "lost") >= 3 and v, 20, lambda: shown(browser))
        assert view["verdict"].startswith("FAIL - "), view
        assert re.fullmatch(r"\d+\.\d+% \(\d+ of \d+ expected\)", view["loss ratio"]), view
        faults = [value for figure, value in view.items() if figure.startswith("fault at ")]
        assert faults and all(value.startswith("lost message x") and "receiver " in value for value in faults), view
        assert any("sender" in value for value in faults), view
        screenshot(browser, tmp_path, "delivery-view-fault-relay.png")

        ui.post("/stop")
        [summary] = ui.wait_for_summaries(1)
        view = poll(lambda: (v := shown(browser)) and v["state"] == "test 1: stopped" and v, 15,
                    lambda: shown(browser))
        assert summary["lost"] > 0, ui
        assert summary["RESULT"].startswith(f"FAIL - {summary['lost']} lost"), ui
        assert view["verdict"] == summary["RESULT"], (view, summary)
        assert_view_matches_summary(view, summary)
        ui.wait_for_stats_row("lost message", "num_failures", summary["lost"])

        # The report the UI offers for download carries the same verdict.
        report = ui.get("/stats/report?download=1").decode()
        assert 'id="chat-delivery"' in report and f">{summary['RESULT']}</span>" in report
        csv_rows = list(csv.DictReader(ui.get("/delivery/csv").decode().splitlines()))
        assert [row["Verdict"] for row in csv_rows] == [summary["RESULT"]]
        returncode = ui.terminate()
    assert returncode == 1, ui  # the run had a failed test


def test_reset_button_resets_the_tally(browser, server_process, tmp_path):
    server = server_process("--quiet")
    with locust_web_ui(server.address, tmp_path) as ui:
        ui.swarm()
        open_delivery_tab(browser, ui)
        before = number(poll(lambda: (v := shown(browser)) and number(v, "delivered") >= 300 and v, 20,
                             lambda: shown(browser)), "delivered")
        browser.find_element(By.XPATH, "//button[normalize-space()='Reset']").click()
        # The tally restarted with Locust's statistics: the view drops back.
        poll(lambda: number(shown(browser), "delivered") < before, 10, lambda: shown(browser))
        ui.post("/stop")
        [summary] = ui.wait_for_summaries(1)
        # ...and it covers what Locust's table covers since the reset, exactly.
        ui.wait_for_stats_row("broadcast", "num_requests", summary["delivered"])
        ui.wait_for_stats_row("send", "num_requests", summary["messages sent"])
        assert summary["RESULT"].startswith("PASS"), ui


def test_two_processes_view_adds_up_the_workers(browser, server_process, tmp_path):
    server = server_process("--quiet")
    master_port = str(free_port())
    with locust_web_ui(server.address, tmp_path, "--processes", "2", "--master-bind-port", master_port,
                       "--master-port", master_port) as ui:
        poll(lambda: ui.get_json("/stats/requests").get("worker_count") == 2, 20, "2 workers")
        ui.swarm()
        open_delivery_tab(browser, ui)
        view = poll(lambda: (v := shown(browser)) and v.get("workers reporting") == "2"
                    and number(v, "delivered") > 0 and v, 20, lambda: shown(browser))
        assert view["verdict"] == "PASS", view
        ui.post("/stop")
        [summary] = ui.wait_for_summaries(1, timeout=30)
        view = poll(lambda: (v := shown(browser)) and v["state"] == "test 1: stopped" and v, 15,
                    lambda: shown(browser))
        assert_view_matches_summary(view, summary)
        # The counts from both workers add up to Locust's own aggregated rows.
        assert summary["delivered"] > 0, ui
        ui.wait_for_stats_row("broadcast", "num_requests", summary["delivered"])
        ui.wait_for_stats_row("send", "num_requests", summary["messages sent"])
        assert summary["RESULT"].startswith("PASS"), ui
        returncode = ui.terminate()
    assert returncode == 0, ui


def test_outputs_carry_the_verdict(browser, tmp_path):
    prefix = tmp_path / "run"
    with fault_relay("drop", every=200) as address:
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(USERS),
             "-r", str(USERS), "-t", "2s", "--host", f"tcp://{address[0]}:{address[1]}",
             "--csv", str(prefix), "--json-file", str(prefix), "--html", f"{prefix}.html",
             "--only-summary", "--web-host", LOOPBACK, "--chat-wait", "0.1", "--chat-churn", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            cwd=ROOT, timeout=40)
    assert proc.returncode == 1, proc.stdout
    [summary] = summaries(proc.stdout)
    lost = summary["lost"]
    assert lost > 0 and summary["RESULT"].startswith(f"FAIL - {lost} lost"), proc.stdout

    [row] = list(csv.DictReader(open(f"{prefix}_delivery.csv", newline="")))
    assert row["Verdict"] == summary["RESULT"] and row["State"] == "stopped", row
    assert int(row["Lost"]) == lost and int(row["Delivered"]) == summary["delivered"], row
    assert row["Loss Ratio"] == summary["loss ratio"], row

    entries = json.loads(Path(f"{prefix}.json").read_text())
    delivery = entries[-1]
    assert delivery["name"] == "chat delivery check", delivery
    assert delivery["delivery"]["verdict"] == summary["RESULT"], delivery
    assert delivery["delivery"]["counts"]["lost"] == lost, delivery
    assert any(entry.get("name") == "broadcast" for entry in entries[:-1])

    # The --html report, opened as a person would: the section is there to read.
    browser.get(Path(f"{prefix}.html").as_uri())
    section = poll(lambda: browser.find_elements(By.ID, "chat-delivery"), 10, "the delivery section")[0]
    assert summary["RESULT"] in section.text, section.text
    assert f"lost\n{lost}" in section.text or f"lost {lost}" in section.text, section.text
