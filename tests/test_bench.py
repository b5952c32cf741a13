"""Smoke test of the benchmark (loadtest/bench.py --smoke): the machinery runs
end to end against the real relay, the baseline and the reference relay, and
writes a JSON report with every figure. No timing thresholds here: speed is
proven by the benchmark itself (loadtest/BENCHMARK.md), not by unit tests."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "loadtest" / "bench.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(json_path),
                           "--png", str(png_path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(json_path.read_text()), done.stdout, png_path


def test_help_names_the_modes():
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0
    for option in ("--quick", "--smoke", "--full", "--rates", "--driver-procs", "--json", "--png"):
        assert option in done.stdout


def test_report_has_every_scenario(report):
    result, stdout, png = report
    assert set(result) >= {"meta", "calibration", "sweep", "capacity", "scale", "slow_reader",
                           "metrics_cost", "targets"}
    assert set(result["sweep"]) == {"project", "baseline", "project_metrics_off"}
    assert result["meta"]["machine"]["cpus"] >= 1
    assert "offered/s" in stdout and "capacity" in stdout
    assert png.stat().st_size > 0


def test_sweep_steps_count_attributed_deliveries(report):
    result = report[0]
    for kind in ("project", "baseline"):
        for step in result["sweep"][kind]:
            assert step["attributed_deliveries"] > 0
            assert step["expected_deliveries"] == step["offered_messages"] * (step["clients"] - 1)
            assert 0.0 <= step["loss"] <= 1.0
            assert step["latency_ms"]["p99"] is not None
            assert step["relay_cpu_s"] >= 0 and step["driver_cpu_s"] > 0
            assert step["relay_peak_rss_kib"] > 0


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
    assert {"project", "baseline", "project_metrics_off", "ratio"} <= set(capacity)
    if capacity["baseline"]:
        assert capacity["ratio"] == round(capacity["project"] / capacity["baseline"], 1)


def test_scale_and_slow_reader_are_reported(report):
    result = report[0]
    scale = {s["relay"]: s for s in result["scale"]}
    assert scale["project"]["ok"], scale["project"]
    assert scale["project"]["rss_per_client_kib"] > 0
    assert scale["project"]["broadcast_to_all_ms"] >= 0
    slow = result["slow_reader"]["project"]
    assert slow["p99_without_ms"] is not None and slow["p99_with_ms"] is not None
    assert slow["loss_with"] == 0.0  # the others lose nothing to a slow reader
    assert result["metrics_cost"]["cpu_us_per_delivery_on"] > 0
