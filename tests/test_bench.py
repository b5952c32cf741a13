"""Smoke test of the benchmark (bench/bench.py --smoke): the machinery runs
end to end against the real relay, the previous design (extracted from git),
the baseline and the reference relay, and writes a JSON report with every
figure and the plot where it was told to. No timing thresholds here: speed is
proven by the benchmark itself (bench/BENCHMARK.md), not by unit tests."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BENCH = ROOT / "bench" / "bench.py"  # run, never imported: tests do not import benchmark code
RESULTS = ROOT / "bench" / "results"


def committed_results():
    """Digest of every committed benchmark figure: a run must leave them alone."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir())}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = committed_results()
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--relays", "project,previous,baseline",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    # --out alone names both files
    return json.loads((out / "bench-smoke.json").read_text()), done.stdout, out / "bench-smoke.png", before


def run_bench(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)


def test_help_names_the_modes():
    done = run_bench("--help")
    assert done.returncode == 0
    for option in ("--quick", "--smoke", "--full", "--rates", "--driver-procs", "--json", "--png", "--out",
                   "--relays", "--previous-commit", "--overload-rate", "--only"):
        assert option in done.stdout


def test_report_has_every_scenario(report):
    result, stdout, png, _ = report
    assert set(result) >= {"meta", "calibration", "sweep", "capacity", "comparison", "scale", "overload",
                           "slow_reader", "metrics_cost", "departure", "sigterm", "targets"}
    assert set(result["sweep"]) == {"project", "previous", "baseline", "project_metrics_off"}
    assert result["meta"]["machine"]["cpus"] >= 1
    assert "offered/s" in stdout and "capacity" in stdout and "== overload" in stdout
    assert png.stat().st_size > 0
    assert result["meta"]["png"] == str(png)


def test_a_run_leaves_the_committed_results_alone(report):
    assert committed_results() == report[3]


def output_paths(*args):
    """Where a run with `args` would write its JSON and plot (--dry-run says)."""
    done = run_bench(*args, "--dry-run")
    assert done.returncode == 0, done.stderr
    said = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith(("JSON: ", "plot: ")))
    return Path(said["JSON"]), Path(said["plot"])


def test_default_output_is_the_git_ignored_out_directory():
    json_path, png_path = output_paths("--smoke")
    assert json_path == ROOT / "out" / "bench-smoke.json"
    assert png_path == ROOT / "out" / "bench-smoke.png"
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", str(json_path), str(png_path)],
                             capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == [str(json_path), str(png_path)]  # both ignored
    json_path, png_path = output_paths("--quick", "--out", "bench/results")
    assert (json_path.as_posix(), png_path.as_posix()) == ("bench/results/bench-quick.json",
                                                           "bench/results/bench-quick.png")


def test_sweep_steps_count_attributed_deliveries(report):
    result = report[0]
    for kind in ("project", "previous", "baseline"):
        assert [s["offered_rate"] for s in result["sweep"][kind]] == [500, 2000]
        for step in result["sweep"][kind]:
            assert step["relay"] == kind
            assert step["attributed_deliveries"] > 0
            assert step["expected_deliveries"] == step["offered_messages"] * (step["clients"] - 1)
            assert 0.0 <= step["loss"] <= 1.0
            assert step["latency_ms"]["p99"] is not None
            assert step["relay_cpu_s"] >= 0 and step["driver_cpu_s"] > 0
            assert step["relay_peak_rss_kib"] > 0
    for kind in ("project", "previous"):  # both scraped, both counted from /metrics
        assert all(s["metrics"] and s["slow_consumer_drops_from"] == "metrics" for s in result["sweep"][kind])


def test_project_relay_loses_nothing_at_the_low_rate(report):
    result = report[0]
    low = min(result["sweep"]["project"], key=lambda s: s["offered_rate"])
    assert low["lost_deliveries"] == 0
    assert low["unattributed_lines"] == 0
    assert low["clients_closed_by_relay"] == 0


def test_calibration_and_ratios_are_computed(report):
    result = report[0]
    assert result["calibration"] and all(s["relay"] == "reference" for s in result["calibration"])
    assert all(s["lost_deliveries"] == 0 for s in result["calibration"])
    capacity = result["capacity"]
    assert {"project", "previous", "baseline", "project_metrics_off", "ratio"} <= set(capacity)
    if capacity["baseline"]:
        assert capacity["ratio"] == round(capacity["project"] / capacity["baseline"], 1)
        assert result["comparison"]["capacity_vs_baseline"] == {
            k: round(capacity[k] / capacity["baseline"], 1) for k in ("project", "previous")}


def test_previous_design_is_compared_at_the_same_rates(report):
    result = report[0]
    assert result["meta"]["previous_commit"] == "a25aa6b"
    comparison = result["comparison"]
    assert comparison["rates"] == [500, 2000]
    for row in comparison["by_rate"]:
        step = {k: next(s for s in result["sweep"][k] if s["offered_rate"] == row["rate"])
                for k in ("project", "previous", "baseline")}
        for kind in ("project", "previous", "baseline"):
            assert row[kind]["cpu_us_per_delivery"] == step[kind]["relay_cpu_us_per_delivery"]
            assert row[kind]["loss"] == step[kind]["loss"]
    versus = comparison["project_vs_previous"]
    assert versus["capacity"] == [result["capacity"]["project"], result["capacity"]["previous"]]
    targets = {t["target"] for t in result["targets"]}
    assert "capacity no lower than the previous design's (same run)" in targets
    assert "CPU per delivery no higher than the previous design's (same rates)" in targets


def test_scale_counts_threads_beyond_one_per_client(report):
    result = report[0]
    scale = {s["relay"]: s for s in result["scale"]}
    assert set(scale) == {"project", "previous", "baseline"}
    assert all(s["ok"] and s["clients"] == 200 for s in scale.values()), scale
    for s in scale.values():
        assert s["threads_beyond_clients"] == s["threads"] - 200
        assert s["rss_per_client_kib"] > 0 and s["broadcast_to_all_ms"] >= 0
    # The extracted script really is the previous design: a reader and a
    # writer thread per client; the new one has one thread per client plus
    # a constant (accept loop, Sender, log writer, metrics).
    assert scale["previous"]["threads"] >= 2 * 200
    targets = " ".join(t["target"] for t in result["targets"])
    limit = int(re.search(r"threads = clients \+ at most (\d+)", targets).group(1))
    assert 0 < scale["project"]["threads_beyond_clients"] <= limit
    assert 0 < scale["baseline"]["threads_beyond_clients"] <= 2


def test_overload_step_runs_at_one_and_a_half_times_capacity(report):
    result = report[0]
    overload = result["overload"]["project"]
    capacity = result["capacity"]["project"] or min(result["sweep"]["project"], key=lambda s: s["offered_rate"])[
        "offered_rate"]
    assert overload["capacity"] == capacity
    assert overload["rate"] == round(1.5 * capacity)
    step = overload["step"]
    assert step["offered_rate"] == overload["rate"] and step["duration_s"] == 1.0
    assert len(step["latency_by_second"]) == 1 and step["latency_by_second"][0]["samples"] > 0
    assert overload["slow_consumer_drops_from"] == "metrics"
    # The promise itself, at smoke size: nothing lost, no reading client dropped.
    assert overload["lost_deliveries"] == 0 and overload["reading_clients_closed"] == 0
    assert overload["slow_consumer_drops"] == 0 and overload["met"] is True
    assert "previous" not in result["overload"]  # smoke: the project only
    # Above the calibrated rates the driver is calibrated again, at the overload rate.
    if overload["rate"] > max(s["offered_rate"] for s in result["calibration"]):
        reference = result["overload_calibration"]
        assert reference["relay"] == "reference" and reference["offered_rate"] == overload["rate"]
        assert overload["reference_loss_at_this_rate"] == reference["loss"]
    else:
        assert "overload_calibration" not in result


def test_slow_reader_and_metrics_cost_are_reported(report):
    result = report[0]
    slow = result["slow_reader"]["project"]
    assert slow["p99_without_ms"] is not None and slow["p99_with_ms"] is not None
    assert slow["loss_with"] == 0.0  # the others lose nothing to a slow reader
    assert result["metrics_cost"]["cpu_us_per_delivery_on"] > 0


def test_plot_has_a_loss_panel_and_labelled_capacities_on_a_log_axis(report):
    """The plot as drawn, read back from the figure into the JSON (meta.plot)."""
    result = report[0]
    throughput, latency, loss = result["meta"]["plot"]["panels"]
    assert [panel["xscale"] for panel in (throughput, latency, loss)] == ["log"] * 3
    assert "lost" in loss["ylabel"]
    lines = {line["key"]: line for line in loss["lines"] if line["key"]}
    baseline = lines["baseline"]
    assert baseline["x"] == [s["offered_rate"] for s in result["sweep"]["baseline"]]
    assert all(math.isclose(y, s["loss"] * 100) for y, s in zip(baseline["y"], result["sweep"]["baseline"]))
    assert "previous" in lines
    labels = " ".join(throughput["texts"])
    for kind in ("project", "previous", "baseline"):
        if result["capacity"][kind]:
            assert f"{kind}" in labels and f"capacity {result['capacity'][kind]:,}/s" in labels


def test_a_bad_previous_commit_is_one_line_and_no_traceback():
    done = run_bench("--smoke", "--only", "scale", "--previous-commit", "no-such-commit")
    assert done.returncode == 2
    assert done.stderr.startswith("bench.py: cannot extract a2/mychatserver.py at 'no-such-commit'")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_overload_alone_needs_a_rate():
    done = run_bench("--smoke", "--only", "overload")
    assert done.returncode == 2 and "--overload-rate" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("scenario, pattern", [
    ("departure", r"^project: 50 leave, newcomer after 0 s: \d+\.\d{3} s \(median \d+\.\d{3}, max \d+\.\d{3}\)$"),
    ("sigterm", r"^project: SIGTERM with 50 clients: \d+\.\d\d s \(exit 0\)$"),
])
def test_the_departure_and_sigterm_scenarios_run_end_to_end(report, scenario, pattern):
    result, stdout = report[0], report[1]
    assert re.search(pattern, stdout, re.MULTILINE), stdout
    measured = {entry["relay"]: entry for entry in result[scenario]}
    assert set(measured) == {"project", "previous", "baseline"}
    assert all(entry["ok"] and entry["clients"] == 50 for entry in measured.values()), measured


def test_the_departure_scenario_refuses_unbounded_runs():
    done = run_bench("--departure-clients", "100000")
    assert done.returncode == 2 and "--departure-clients must be 1-20000" in done.stderr
    assert "Traceback" not in done.stderr


# --- the C yardstick (--only yardstick): instruments from outside the repository ----

ANCHORS = ROOT.parent / "shared" / "bench-anchors"  # c_relay.c and chatbench.c, never copied in here


def test_help_names_the_yardstick_options():
    done = run_bench("--help")
    for option in ("yardstick", "--anchors", "--yard-seconds", "--yard-rows", "--yard-ladder"):
        assert option in done.stdout


def test_the_yardstick_without_its_instruments_is_one_skip_line(tmp_path):
    done = run_bench("--smoke", "--only", "yardstick", "--anchors", "/nonexistent", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    skips = [line for line in done.stdout.splitlines() if line.startswith("yardstick: skipped: ")]
    assert skips == ["yardstick: skipped: no C instruments at /nonexistent (no such directory; --anchors DIR)"]
    assert json.loads((tmp_path / "bench-smoke.json").read_text())["yardstick"]["skipped"]


def test_the_yardstick_is_not_in_the_default_run():
    done = run_bench("--smoke", "--dry-run")
    scenarios = next(line for line in done.stdout.splitlines() if line.startswith("scenarios: "))
    assert "yardstick" not in scenarios and "sweep" in scenarios


def test_a_smoke_yardstick_measures_naive_project_and_c(tmp_path):
    if not (ANCHORS / "c_relay.c").is_file() or not (ANCHORS / "chatbench.c").is_file():
        pytest.skip(f"no C instruments at {ANCHORS}")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--only", "yardstick", "--anchors", str(ANCHORS),
                           "--yard-rows", "ladder,light", "--yard-ladder", "1000", "--yard-seconds", "0.5",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    yard = json.loads((tmp_path / "bench-smoke.json").read_text())["yardstick"]
    assert yard["skipped"] is None and f"command: {yard['command']}" in done.stdout
    assert "--only yardstick" in yard["command"]
    for row in ("ladder", "light"):
        steps = {s["relay"]: s for s in yard["steps"] if s["row"] == row}
        assert set(steps) == {"naive", "project", "c"}, row
        for step in steps.values():
            assert step["delivered"] > 0 and step["deliveries_per_s"] > 0
            assert step["relay_cpu_s"] >= 0 and step["relay_peak_rss_kib"] > 0
            assert step["expected"] == step["sent"] * (step["clients"] - 1)
        assert steps["project"]["project_drops"] == {"slow_consumer": 0, "memory_budget": 0}
    assert set(yard["ladder"]["capacity"]) == {"naive", "project", "c"}
    assert set(yard["light"]) == {"naive", "project", "c"}
