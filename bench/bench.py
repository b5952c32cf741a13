#!/usr/bin/env python3
"""bench.py - the chat relay benchmark: throughput, latency, scale and overload, side by
side with the previous design and the class-demo baseline, in one run, on loopback.

    python bench/bench.py --quick        # a couple of minutes
    python bench/bench.py                # full: see bench/BENCHMARK.md for the time
    python bench/bench.py --smoke        # seconds (the test suite's setting)

It starts every relay itself, each step on a fresh process: the relays under
test are bench/relays.py's registry -- "project" (a2/mychatserver.py with
--metrics-port), "previous" (the same file at an older commit,
--previous-commit, extracted with git into a temporary directory together
with that commit's metrics/ package), "baseline" (bench/baseline_relay.py,
the class demo) and, for calibration, "reference" (bench/reference_relay.py).
It drives them with worker processes (bench/driver.py: epoll, bulk
parsing). Per step:

* attributed deliveries/s: relays that arrived as exactly one message with
  its own sender's "PORT: " prefix (glued or cut messages do not count);
* loss: 1 - attributed / (offered messages x (clients - 1)); messages the
  driver could not even write (the relay stopped reading) are lost too;
* latency p50/p99/max from the intended send time to receipt (one clock,
  CLOCK_MONOTONIC), sampled on the first message of every read, weighted by
  the read's message count;
* the relay's CPU seconds (and so CPU per delivery), peak RSS and threads
  (/proc, through relayproc.py), slow-consumer drops (its /metrics, else its
  stderr), the driver's own CPU.

Scenarios, one function each (run_*): calibration (the top rate against a
relay the driver cannot overload), the offered-load sweep of every relay and
the capacity (highest rate with zero loss and p99 <= 50 ms, every lower rate
passing too), the metrics endpoint on vs off, scale (N clients connected:
threads, RSS per client, one broadcast reaching all), overload (1.5 x the
project's capacity: is anything lost, is any reading client dropped, what
happens to latency), a slow reader, mass departure (thousands leave at once:
how long a newcomer's first message waits) and SIGTERM with thousands
connected (how long the relay takes to exit); and, only when asked for
(--only yardstick: it needs C instruments from outside the repository), the
C yardstick (bench/yardstick.py: the project and the class demo against a C
relay, all driven by a C driver). Output: a table on stdout, a JSON
file and a PNG plot in out/ (git-ignored) or --out DIR; the committed
bench/results/ files change only when --out points there.
See bench/BENCHMARK.md.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # run from anywhere: python bench/bench.py

import driver  # noqa: E402 - after the path fix (the worker processes import it too)
import relays  # noqa: E402
import yardstick  # noqa: E402

CAPACITY_P99_MS = 50.0
OVERLOAD_FACTOR = 1.5      # the overload step offers this times the project's capacity
THREADS_BEYOND_CLIENTS = 8  # "one thread per client plus a small constant" (issue 11)
RSS_PER_CLIENT_KIB = 20.0   # issue 11's promise at 10,000 clients
DEFAULT_OUT = ROOT / "out"   # git-ignored (/out*/): a run never touches bench/results/ unless asked
ORDER = relays.COMPARED      # the relays --relays may name, in the order of every table and the plot
METRICS_RELAYS = {name for name, relay in relays.registry().items() if relay.metrics}

MODES = {
    # rates: offered msg/s for the sweep; everything else per scenario.
    "smoke": {"rates": [500, 2000], "duration": 0.5, "clients": 20, "senders": 4, "calibration": "top",
              "metrics_off_rates": "top", "scale": [200], "scale_baseline": True,
              "overload_duration": 1.0, "overload_previous": False,
              "slow_rate": 500, "slow_baseline": False, "slow_duration": 1.0, "drain": 0.5,
              "ab_rate": 2000, "repeats": 1,
              "departure_clients": 50, "sigterm_clients": 50, "departure_runs": 1, "late": [0.0]},
    "quick": {"rates": [1000, 5000, 10000, 20000], "duration": 2.0, "clients": 100, "senders": 10,
              "calibration": "ends", "metrics_off_rates": "top", "scale": [1000], "scale_baseline": True,
              "overload_duration": 3.0, "overload_previous": False,
              "slow_rate": 5000, "slow_baseline": False, "slow_duration": 3.0, "drain": 2.0,
              "ab_rate": 10000, "repeats": 1,
              "departure_clients": 1000, "sigterm_clients": 1000, "departure_runs": 3, "late": [0.0]},
    "full": {"rates": [500, 1000, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 25000, 30000],
             "duration": 5.0, "clients": 100, "senders": 10, "calibration": "ends", "metrics_off_rates": "all",
             "scale": [1000, 5000, 10000], "scale_baseline": True,
             "overload_duration": 10.0, "overload_previous": True,
             "slow_rate": 5000, "slow_baseline": True, "slow_duration": 6.0, "drain": 3.0,
             # the baseline's kernel send buffer autotunes to 4 MiB: its slow
             # reader takes ~10 s at this rate to fill it and stall the room
             "slow_duration_baseline": 15.0,
             "ab_rate": 10000, "repeats": 3,
             "departure_clients": 4000, "sigterm_clients": 10000, "departure_runs": 3, "late": [0.0]},
}
DEPARTURE_TARGET_S = 0.5   # issue 11: 4,000 leave at once, a newcomer's first message within this
SIGTERM_TARGET_S = 2.0     # issue 11: SIGTERM with 10,000 clients connected, exit 0 within this
MAX_CLIENTS_PER_STEP = 20_000  # a bounded benchmark (and this machine's descriptor limit)


# --- the relay under test, as a process: relays.py -----------------------------------

class Scraper(threading.Thread):
    """Scrapes /metrics once a second during a load phase, as Prometheus would
    (its default is every 15 s: this is 15 times harsher)."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.scrapes, self.errors = url, 0, 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.errors += 1


# --- the driver: worker processes --------------------------------------------------

class Pool:
    """driver.py worker processes, commanded over pipes."""

    def __init__(self, workers):
        context = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = context.Pipe()
            proc = context.Process(target=driver.worker_main, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def __len__(self):
        return len(self.conns)

    def call(self, commands, timeout=120):
        """Send one (command, args) per worker, in parallel; return their results."""
        for conn, command in zip(self.conns, commands):
            conn.send(command)
        results = []
        for conn in self.conns[:len(commands)]:
            if not conn.poll(timeout):
                raise TimeoutError("a driver worker did not answer")
            status, result = conn.recv()
            if status != "ok":
                raise RuntimeError(f"driver worker failed: {result}")
            results.append(result)
        return results

    def close(self):
        for conn in self.conns:
            conn.send(("quit", None))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def split(n, parts):
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def connect(pool, relay, counts, slow=None):
    slow = slow or [0] * len(counts)
    results = pool.call([("connect", (relay.address, n, k)) for n, k in zip(counts, slow)])
    return max(r["seconds"] for r in results), [r["ports"] for r in results]


def wait_ready(pool, timeout=60.0, per_probe=1.0):
    """Probe until one broadcast from worker 0's first client reaches every
    other client: then the relay has registered and serves all of them.
    Each probe waits longer than the last (0.1 s doubling up to per_probe), so
    a quick relay is not charged a long probe timeout. Returns (send ns, last
    receipt ns) of the probe that reached everyone."""
    deadline = time.monotonic() + timeout
    k, wait = 0, min(0.1, per_probe)
    while time.monotonic() < deadline:
        k += 1
        results = pool.call([("probe", (k, i == 0, wait)) for i in range(len(pool))],
                            timeout=wait + 60)
        if all(r[0] for r in results):
            return results[0][1], max(r[2] for r in results)
        wait = min(wait * 2, per_probe)
    raise TimeoutError(f"the relay did not serve every client within {timeout}s")


def percentiles(lat_bytes, weight_bytes):
    lat, weights = array("q"), array("q")
    for chunk in lat_bytes:
        lat.frombytes(chunk)
    for chunk in weight_bytes:
        weights.frombytes(chunk)
    if not lat:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    pairs = sorted(zip(lat, weights))
    total = sum(weights)
    out = {"samples": len(lat)}
    for name, q in (("p50", 0.50), ("p99", 0.99)):
        threshold, running = q * total, 0
        for value, weight in pairs:
            running += weight
            if running >= threshold:
                out[name] = max(0, value) / 1000
                break
    out["max"] = max(0, pairs[-1][0]) / 1000
    return out


# --- scenarios -------------------------------------------------------------------

def load_step(pool, under_test, rate, clients, senders, duration, drain, metrics=True, slow=0, over_time=False):
    """One load phase on a fresh relay (`under_test`: a relays.Relay):
    `clients` clients (plus `slow` slow readers), `senders` of them sending
    `rate` msg/s in all. over_time: also latency by second of the run
    (latency_by_second)."""
    kind = under_test.name
    relay = under_test.start(metrics=metrics)
    scraper = None
    try:
        counts = split(clients, len(pool))
        extra = [slow if i == 0 else 0 for i in range(len(pool))]
        connect(pool, relay, [c + e for c, e in zip(counts, extra)], extra)
        wait_ready(pool)
        # Sender g is client g // workers of worker g % workers: spread evenly.
        sender_sets = [[g // len(pool) for g in range(senders) if g % len(pool) == w] for w in range(len(pool))]
        slow_sets = [list(range(counts[w], counts[w] + extra[w])) for w in range(len(pool))]
        if relay.metrics_url:
            scraper = Scraper(relay.metrics_url)
            scraper.start()
        cpu0 = relay.cpu_seconds()
        machine0 = cpu_totals()[0]
        t0 = time.monotonic_ns() + 200_000_000
        phase_sets = [[g / senders for g in range(senders) if g % len(pool) == w] for w in range(len(pool))]
        results = pool.call([("run", {"t0_ns": t0, "duration": duration, "rate": rate / senders,
                                      "senders": sender_sets[w], "phases": phase_sets[w],
                                      "drain": drain, "slow": slow_sets[w]})
                             for w in range(len(pool))], timeout=duration + drain + 60)
        wall = (time.monotonic_ns() - t0) / 1e9
        cpu = relay.cpu_seconds() - cpu0
        machine_cpu = cpu_totals()[0] - machine0
        peak_rss = relay.status("VmHWM")
        threads = relay.status("Threads")
        dropped, dropped_source = relay.slow_consumer_drops()
    finally:
        if scraper:
            scraper.stopping.set()
        try:
            pool.call([("close", None)] * len(pool))
        finally:
            relay.stop()
    offered = sum(r["offered"] for r in results)
    expected = offered * (clients - 1)
    good = sum(r["good"] for r in results)
    latency = percentiles([r["lat_us"] for r in results], [r["lat_w"] for r in results])
    last_data_s = (max(r["last_data_ns"] for r in results) - t0) / 1e9
    loss = max(0, expected - good)
    driver_cpu = sum(r["cpu_s"] for r in results)
    step = {
        "relay": kind, "metrics": bool(relay.metrics_url), "offered_rate": rate, "clients": clients,
        "senders": senders, "slow_readers": slow, "duration_s": duration, "wall_s": round(wall, 3),
        "offered_messages": offered, "sent_messages": sum(r["sent"] for r in results),
        "unsent_messages": sum(r["unsent"] for r in results),
        "expected_deliveries": expected, "attributed_deliveries": good,
        # per second of the window the deliveries arrived in (the send phase,
        # or longer if the relay was still delivering after it)
        "attributed_per_s": round(good / max(duration, last_data_s), 1),
        # how long after the send phase ended deliveries still arrived: a
        # relay behind its offered load works off its backlog then
        "delivering_after_send_s": round(max(0.0, last_data_s - duration), 3),
        "lost_deliveries": loss, "loss": round(loss / expected, 6) if expected else 0.0,
        "unattributed_lines": sum(r["bad_lines"] for r in results),
        "latency_ms": latency,
        "relay_cpu_s": round(cpu, 2), "relay_cores": round(cpu / wall, 2),
        "relay_cpu_us_per_delivery": round(cpu / good * 1e6, 3) if good else None,
        "relay_peak_rss_kib": peak_rss, "relay_threads": threads,
        "driver_cpu_s": round(driver_cpu, 2), "driver_cores": round(driver_cpu / wall, 2),
        # everything else this machine ran meanwhile (the kernel's softirq work
        # for loopback counts here too): high values mean a shared, noisy machine
        "other_cores": round(max(0.0, machine_cpu - cpu - driver_cpu) / wall, 2),
        "driver_reads": sum(r["reads"] for r in results),
        "clients_closed_by_relay": sum(r["closed"] for r in results),
        "slow_readers_dropped": sum(r["slow_dropped"] for r in results),
        "relay_slow_consumer_drops": dropped, "slow_consumer_drops_from": dropped_source,
        "scrapes": scraper.scrapes if scraper else 0,
    }
    step["passed"] = (loss == 0 and latency["p99"] is not None and latency["p99"] <= CAPACITY_P99_MS)
    if over_time:
        step["latency_by_second"] = latency_by_second(results, t0, duration)
    return step


def latency_by_second(results, t0_ns, duration):
    """p50/p99 of the samples by the second of the run their message was due
    to be sent in: shows whether latency stays flat or grows with the backlog."""
    lat, weights, sent = array("q"), array("q"), array("q")
    for r in results:
        lat.frombytes(r["lat_us"])
        weights.frombytes(r["lat_w"])
        sent.frombytes(r["lat_sent_us"])
    seconds = max(1, int(duration + 0.999))
    buckets = [(array("q"), array("q")) for _ in range(seconds)]
    t0_us = t0_ns // 1000
    for value, weight, stamp in zip(lat, weights, sent):
        bucket = buckets[min(seconds - 1, max(0, (stamp - t0_us) // 1_000_000))]
        bucket[0].append(value)
        bucket[1].append(weight)
    out = []
    for second, (bucket_lat, bucket_weights) in enumerate(buckets):
        p = percentiles([bucket_lat.tobytes()], [bucket_weights.tobytes()])
        out.append({"second": second, "p50_ms": p["p50"], "p99_ms": p["p99"], "samples": p["samples"]})
    return out


def capacity(steps):
    """Highest offered rate with zero loss and p99 <= 50 ms, all lower rates passing too."""
    best = 0
    for step in sorted(steps, key=lambda s: s["offered_rate"]):
        if not step["passed"]:
            break
        best = step["offered_rate"]
    return best


def scale_step(pool, under_test, n, broadcasts=3):
    kind = under_test.name
    relay = under_test.start(metrics=True)
    try:
        rss0 = relay.status("VmRSS")
        threads0 = relay.status("Threads")
        start = time.monotonic()
        connect_s, _ = connect(pool, relay, split(n, len(pool)))
        wait_ready(pool, timeout=120, per_probe=5.0)
        ready_s = time.monotonic() - start
        time.sleep(0.5)  # let the accept burst's garbage settle before measuring
        rss1 = relay.status("VmRSS")
        threads1 = relay.status("Threads")
        times = []
        for _ in range(broadcasts):
            sent, last = wait_ready(pool, timeout=60, per_probe=10.0)
            times.append((last - sent) / 1e6)
        return {
            "relay": kind, "clients": n, "connect_s": round(connect_s, 3), "ready_s": round(ready_s, 3),
            "rss_before_kib": rss0, "rss_connected_kib": rss1,
            "rss_per_client_kib": round((rss1 - rss0) / n, 1),
            "threads_before": threads0, "threads": threads1,
            "threads_per_client": round((threads1 - threads0) / n, 2),
            "threads_beyond_clients": threads1 - n,  # the "small constant" of one thread per client
            "broadcast_to_all_ms": sorted(times)[len(times) // 2], "broadcast_ms_all": [round(t, 2) for t in times],
            "ok": True,
        }
    except Exception as exc:  # noqa: BLE001 - report what this machine could not do, honestly
        return {"relay": kind, "clients": n, "ok": False, "error": str(exc)}
    finally:
        try:
            pool.call([("close", None)] * len(pool))
        finally:
            relay.stop()


def departure_step(pool, under_test, n, late):
    """Seconds from a newcomer's first message to an observer's receipt, when
    `n` clients have just left at once and the newcomer comes `late` seconds
    after: a relay that lets thousands of departing threads hold the GIL (or
    a lock) keeps the newcomer waiting."""
    relay = under_test.start()
    observer = newcomer = None
    try:
        observer = socket.create_connection(relay.address, timeout=30)  # in the room before the herd
        connect(pool, relay, split(n, len(pool)))
        wait_ready(pool, timeout=120, per_probe=5.0)
        pool.call([("close", None)] * len(pool))  # every worker closes its clients at once
        time.sleep(late)  # the scenario's parameter: when the newcomer comes
        newcomer = socket.create_connection(relay.address, timeout=30)
        started = time.monotonic()
        newcomer.sendall(b"first!\n")
        received = b""
        while not received.endswith(b"first!\n"):
            chunk = observer.recv(65536)
            if not chunk:
                raise RuntimeError("the relay closed the observer")
            received += chunk
        return time.monotonic() - started
    finally:
        for sock in (observer, newcomer):
            if sock is not None:
                sock.close()
        try:
            pool.call([("close", None)] * len(pool))
        finally:
            relay.stop()


def sigterm_step(pool, under_test, n):
    """(seconds from SIGTERM to the relay's exit, its exit status) with `n`
    clients connected and served."""
    relay = under_test.start()
    try:
        connect(pool, relay, split(n, len(pool)))
        wait_ready(pool, timeout=120, per_probe=5.0)
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        status = relay.proc.wait(30)
        return time.monotonic() - started, status
    finally:
        try:
            pool.call([("close", None)] * len(pool))
        finally:
            relay.stop()


# --- output ------------------------------------------------------------------------

def fmt(value, spec="{:.1f}"):
    return "-" if value is None else spec.format(value)


HEADER = (f"{'relay':<22}{'offered/s':>10}{'attributed/s':>14}{'loss':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'relay cpu':>10}{'drv cpu':>9}{'other':>7}{'rss MiB':>9}  ok")


def step_row(s):
    name = s["relay"] + ("" if s["relay"] not in METRICS_RELAYS
                         else (" (metrics)" if s["metrics"] else " (no metrics)"))
    if s["slow_readers"]:
        name += " +slow"
    lat = s["latency_ms"]
    return (f"{name:<22}{s['offered_rate']:>10,}{s['attributed_per_s']:>14,.0f}{s['loss']:>9.2%}"
            f"{fmt(lat['p50']):>9}{fmt(lat['p99']):>9}{fmt(lat['max']):>9}"
            f"{s['relay_cores']:>10.2f}{s['driver_cores']:>9.2f}{s.get('other_cores', 0):>7.2f}"
            f"{s['relay_peak_rss_kib'] / 1024:>9.1f}"
            f"  {'yes' if s['passed'] else 'NO'}")


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "loadavg_at_start": os.getloadavg(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def cpu_totals():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - values[3] - values[4]) / tick, sum(values) / tick


def machine_busy(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` before the run, from /proc/stat:
    a benchmark on a machine that is already busy measures the other load."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


STYLES = {  # sweep key -> (label, colour, line style); also the plot's order
    "project": ("project: relay core v2 (metrics on)", "tab:blue", "o-"),
    "project_metrics_off": ("project (metrics off)", "tab:cyan", "s--"),
    "previous": ("previous design (metrics on)", "tab:green", "D-"),
    "baseline": ("class-demo baseline", "tab:red", "^-"),
}


def rate_label(rate):
    return f"{rate / 1000:g}k" if rate >= 1000 else str(rate)


def figure(result):
    """The plot as a matplotlib Figure: throughput, p99 latency and loss
    against offered load (log axis), each relay's capacity a labelled line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator
    fig, (throughput, latency, loss) = plt.subplots(1, 3, figsize=(17, 5))
    clients, rates = None, set()
    for key, (label, color, style) in STYLES.items():
        steps = sorted(result["sweep"].get(key) or [], key=lambda s: s["offered_rate"])
        if not steps:
            continue
        clients = steps[0]["clients"]
        x = [s["offered_rate"] for s in steps]
        rates.update(x)
        throughput.plot(x, [s["attributed_per_s"] for s in steps], style, color=color, label=label, gid=key)
        latency.plot(x, [s["latency_ms"]["p99"] or float("nan") for s in steps], style, color=color, label=label,
                     gid=key)
        loss.plot(x, [s["loss"] * 100 for s in steps], style, color=color, label=label, gid=key)
    rates = sorted(rates)
    if clients and rates:
        throughput.plot(rates, [r * (clients - 1) for r in rates], ":", color="gray",
                        label="offered x (clients - 1)")
    # Capacity lines, one per relay; relays with the same capacity share one label.
    by_cap = {}
    for key in ORDER:
        if result["capacity"].get(key):
            by_cap.setdefault(result["capacity"][key], []).append(key)
    for cap, keys in by_cap.items():
        color = STYLES[keys[0]][1] if len(keys) == 1 else "dimgray"
        for ax in (throughput, latency, loss):
            ax.axvline(cap, color=color, alpha=0.3, linewidth=3)
        for ax in (throughput, loss):
            ax.text(cap, 0.97, f"{' = '.join(keys)} capacity {cap:,}/s ", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="right", fontsize=7, color=color)
    throughput.set(ylabel="attributed deliveries/s", title=f"Throughput, {clients} clients")
    throughput.yaxis.set_major_formatter(FuncFormatter(
        lambda v, _: f"{v / 1e6:.1f}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e3 else f"{v:g}"))
    latency.axhline(CAPACITY_P99_MS, color="gray", linestyle=":", label=f"{CAPACITY_P99_MS:.0f} ms (capacity limit)")
    latency.set(ylabel="p99 latency (ms, log)", yscale="log", title="p99 latency, send to receipt")
    for axis_format in (latency.yaxis.set_major_formatter, latency.yaxis.set_minor_formatter):
        axis_format(FuncFormatter(lambda v, _: f"{v:g}"))
    worst = max([s["loss"] * 100 for steps in result["sweep"].values() for s in steps] or [0])
    loss.set(ylabel="lost deliveries (% of expected)", ylim=(-1, max(5.0, worst * 1.1)),
             title="Loss (glued, cut or never delivered)")
    for ax in (throughput, latency, loss):
        ax.set(xscale="log", xlabel="offered load (messages/s, log)")
        if rates:
            ax.set_xticks(rates)
            ax.set_xticklabels([rate_label(r) for r in rates], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
    # One legend for the three panels, below them (inside, it hid the lines and labels).
    handles = {}
    for ax in (throughput, latency, loss):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"chat relay benchmark ({meta['mode']}), {meta['machine']['cpus']} cores, "
                 f"{meta['date']}; capacity: zero loss and p99 <= {CAPACITY_P99_MS:.0f} ms", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot(result, path):
    """Draw the plot into `path`; return what it shows (describe())."""
    import matplotlib.pyplot as plt
    fig = figure(result)
    try:
        fig.savefig(path, dpi=110)
        return describe(fig)
    finally:
        plt.close(fig)


def describe(fig):
    """What a drawn plot shows, read back from the figure: each panel's title,
    labels and scales, each relay's line (its key, label and points) and the
    texts on it (the capacity labels). Written into the JSON beside the PNG,
    for a reader without the image and for the tests."""
    def number(value):
        return None if value != value else float(value)  # NaN (no sample) -> null

    panels = []
    for ax in fig.axes:
        lines = [{"key": line.get_gid(), "label": line.get_label(),
                  "x": [number(v) for v in line.get_xdata()], "y": [number(v) for v in line.get_ydata()]}
                 for line in ax.get_lines() if not line.get_label().startswith("_")]
        panels.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                       "xscale": ax.get_xscale(), "yscale": ax.get_yscale(), "lines": lines,
                       "texts": [text.get_text() for text in ax.texts]})
    return {"panels": panels}


def compare(result):
    """The relays side by side at the same offered rates: capacity, CPU per
    delivery, loss. CPU per delivery is compared only where both relays lost
    nothing (a relay that drops work does less of it per delivery)."""
    sweeps = {k: result["sweep"][k] for k in ORDER if result["sweep"].get(k)}
    if not sweeps:
        return None
    rates = sorted(set.intersection(*({s["offered_rate"] for s in steps} for steps in sweeps.values())))
    by_rate = []
    for rate in rates:
        row = {"rate": rate}
        for kind, steps in sweeps.items():
            step = next(s for s in steps if s["offered_rate"] == rate)
            row[kind] = {"cpu_us_per_delivery": step["relay_cpu_us_per_delivery"], "loss": step["loss"],
                         "p99_ms": step["latency_ms"]["p99"], "passed": step["passed"]}
        by_rate.append(row)
    out = {"rates": rates, "by_rate": by_rate,
           "capacity": {k: result["capacity"].get(k) for k in sweeps},
           "cpu_us_per_delivery_median": {
               k: median([r[k]["cpu_us_per_delivery"] for r in by_rate if r[k]["loss"] == 0]) for k in sweeps}}
    base = result["capacity"].get("baseline")
    if base:
        out["capacity_vs_baseline"] = {k: round(result["capacity"][k] / base, 1) for k in sweeps if k != "baseline"}
    if "project" in sweeps and "previous" in sweeps:
        both = [r for r in by_rate if r["project"]["loss"] == 0 and r["previous"]["loss"] == 0
                and r["project"]["cpu_us_per_delivery"] and r["previous"]["cpu_us_per_delivery"]]
        ratios = [r["project"]["cpu_us_per_delivery"] / r["previous"]["cpu_us_per_delivery"] for r in both]
        out["project_vs_previous"] = {
            "capacity": [result["capacity"]["project"], result["capacity"]["previous"]],
            "cpu_per_delivery_ratio_median": round(median(ratios), 3) if ratios else None,
            "rates_compared": [r["rate"] for r in both]}
    return out


def overload_summary(step, at_capacity, capacity_rate):
    """Did the relay keep its promise at OVERLOAD_FACTOR x its capacity:
    nothing lost, no reading client dropped; and what happened to latency."""
    drops = step["relay_slow_consumer_drops"]
    closed = step["clients_closed_by_relay"]
    by_second = step.get("latency_by_second") or []
    p99s = [b["p99_ms"] for b in by_second if b["p99_ms"] is not None]
    met = step["lost_deliveries"] == 0 and closed == 0 and drops == 0
    cap_p99 = at_capacity["latency_ms"]["p99"] if at_capacity else None
    return {
        "relay": step["relay"], "rate": step["offered_rate"], "capacity": capacity_rate,
        "lost_deliveries": step["lost_deliveries"], "loss": step["loss"],
        "reading_clients_closed": closed, "slow_consumer_drops": drops,
        "slow_consumer_drops_from": step["slow_consumer_drops_from"],
        "attributed_per_s": step["attributed_per_s"], "latency_ms": step["latency_ms"],
        "p99_at_capacity_ms": cap_p99, "p99_first_second_ms": p99s[0] if p99s else None,
        "p99_last_second_ms": p99s[-1] if p99s else None,
        "delivering_after_send_s": step["delivering_after_send_s"], "met": met,
        "summary": f"{step['relay']} at {step['offered_rate']:,} msg/s "
                   f"({step['offered_rate'] / capacity_rate:.2g} x capacity {capacity_rate:,}): "
                   f"{step['lost_deliveries']:,} deliveries lost, {closed} reading clients closed, "
                   f"{drops} slow-consumer drops ({step['slow_consumer_drops_from']}); p50 "
                   f"{fmt(step['latency_ms']['p50'])} / p99 {fmt(step['latency_ms']['p99'])} ms "
                   f"(at capacity p99 {fmt(cap_p99)} ms), p99 by second of sending "
                   f"{fmt(p99s[0] if p99s else None)} -> {fmt(p99s[-1] if p99s else None)} ms, "
                   f"still delivering {step['delivering_after_send_s']:.1f} s after sending stopped",
        "step": step}


def biggest_scale(result, kind):
    steps = [s for s in result["scale"] if s["relay"] == kind and s["ok"]]
    return max(steps, key=lambda s: s["clients"]) if steps else None


def targets(result):
    """The issues' targets, each with what was measured and whether it was met
    (None: this run could not say, e.g. --quick does not reach 10,000 clients)."""
    out = []
    caps = result["capacity"]
    cap, base = caps.get("project", 0), caps.get("baseline")
    at_least = caps.get("ratio_at_least")
    if base is not None:
        out.append({"target": "capacity >= 10x the baseline's (same run)",
                    "measured": f"{cap:,} vs {base:,} msg/s offered = "
                                + (f"{caps['ratio']}x" if base else f"more than {at_least}x "
                                   "(the baseline failed at every rate)"),
                    "met": bool(cap >= 10 * base if base else at_least and at_least >= 10)})
    versus = (result.get("comparison") or {}).get("project_vs_previous")
    if versus:
        new, old = versus["capacity"]
        out.append({"target": "capacity no lower than the previous design's (same run)",
                    "measured": f"{new:,} vs {old:,} msg/s", "met": new >= old})
        ratio = versus["cpu_per_delivery_ratio_median"]
        out.append({"target": "CPU per delivery no higher than the previous design's (same rates)",
                    "measured": f"project / previous = {fmt(ratio, '{:.3f}')}, median over the rates "
                                f"both lost nothing at ({', '.join(map(rate_label, versus['rates_compared']))})",
                    "met": ratio is not None and ratio <= 1.0})
    low = next((s for s in result["sweep"].get("project", []) if s["offered_rate"] == 1000), None)
    if low:
        out.append({"target": "1,000 msg/s: zero loss, p99 <= 10 ms",
                    "measured": f"loss {low['loss']:.2%}, p99 {fmt(low['latency_ms']['p99'])} ms",
                    "met": low["lost_deliveries"] == 0 and (low["latency_ms"]["p99"] or 1e9) <= 10})
    biggest = biggest_scale(result, "project")
    if biggest:
        n = biggest["clients"]
        at_10k = n >= 10000 or None  # met only counts at 10,000 clients
        out.append({"target": f"threads = clients + at most {THREADS_BEYOND_CLIENTS}",
                    "measured": f"{biggest['threads']:,} threads with {n:,} clients "
                                f"(+{biggest['threads_beyond_clients']})",
                    "met": at_10k and biggest["threads_beyond_clients"] <= THREADS_BEYOND_CLIENTS})
        out.append({"target": f"RSS per client <= {RSS_PER_CLIENT_KIB:g} KiB at 10,000 clients",
                    "measured": f"{biggest['rss_per_client_kib']} KiB/client with {n:,} clients",
                    "met": at_10k and biggest["rss_per_client_kib"] <= RSS_PER_CLIENT_KIB})
        same = next((s for s in result["scale"] if s["relay"] == "baseline" and s["ok"] and s["clients"] == n), None)
        out.append({"target": f"one broadcast reaches all {n - 1:,} others no slower than the baseline's",
                    "measured": f"{biggest['broadcast_to_all_ms']:.1f} ms vs "
                                + (f"{same['broadcast_to_all_ms']:.1f} ms (baseline)" if same else "- (no baseline)"),
                    "met": at_10k and bool(same) and biggest["broadcast_to_all_ms"] <= same["broadcast_to_all_ms"]})
    failed = [s for s in result["scale"] if s["relay"] == "project" and not s["ok"]]
    if failed:
        out.append({"target": f"{failed[0]['clients']:,} clients", "measured": failed[0].get("error"), "met": False})
    overload = (result.get("overload") or {}).get("project")
    if overload:
        out.append({"target": f"at {OVERLOAD_FACTOR:g}x capacity nothing lost and no reading client dropped",
                    "measured": overload["summary"], "met": overload["met"]})
    mc = result.get("metrics_cost")
    if mc:
        out.append({"target": "metrics on costs < 5% of capacity",
                    "measured": mc["summary"], "met": mc["met"]})
    sr = result.get("slow_reader", {}).get("project")
    if sr:
        out.append({"target": "a slow reader changes the others' p99 by < 10%",
                    "measured": sr["summary"], "met": sr["met"]})
    for d in result.get("departure") or []:
        if d["relay"] == "project" and d["late_s"] == 0:
            at_4000 = d["clients"] >= 4000 or None  # met only counts at the size
            out.append({"target": f"{d['clients']:,} clients leaving at once delay a newcomer's first "
                                  f"message < {DEPARTURE_TARGET_S:g} s",
                        "measured": (f"median {d['median_s']:.3f} s, max {d['max_s']:.3f} s of "
                                     f"{len(d['delays_s'])} run(s)" if d["ok"] else d["error"]),
                        "met": at_4000 and d["ok"] and d["max_s"] < DEPARTURE_TARGET_S})
    for s in result.get("sigterm") or []:
        if s["relay"] == "project":
            at_10k = s["clients"] >= 10000 or None
            out.append({"target": f"SIGTERM with {s['clients']:,} clients: exit 0 within {SIGTERM_TARGET_S:g} s",
                        "measured": (", ".join(f"{t:.2f} s (exit {e})" for t, e in zip(s["seconds"], s["exit_status"]))
                                     if s["ok"] else s["error"]),
                        "met": at_10k and s["ok"] and max(s["seconds"]) < SIGTERM_TARGET_S
                        and not any(s["exit_status"])})
    return out


# --- scenarios: one function each; run() calls those --only selects, in order ----

class Run:
    """One benchmark run: its settings, the driver pool and the result it builds."""

    def __init__(self, args, cfg, pool, under_test):
        self.args, self.cfg, self.pool = args, cfg, pool
        self.under_test = under_test  # relays.registry(): name -> relays.Relay
        self.relays = args.relay_list
        self.result = {
            "meta": {"mode": args.mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": machine(), "config": cfg, "driver_procs": args.driver_procs,
                     "relays": self.relays, "project_script": str(args.project_script),
                     "relays_under_test": {name: under_test[name].about for name in (*self.relays, "reference")},
                     "previous_commit": getattr(args, "previous_rev", None),
                     "capacity_rule": f"highest offered rate with zero loss and p99 <= {CAPACITY_P99_MS:.0f} ms, "
                                      "every lower rate passing too",
                     "latency_method": "intended send time to receipt, CLOCK_MONOTONIC; one sample per read "
                                       "(its first complete message) weighted by the read's message count"},
            "calibration": [], "sweep": {}, "capacity": {}, "comparison": None, "scale": [],
            "overload": {}, "slow_reader": {}, "metrics_cost": None, "departure": [], "sigterm": [],
        }

    def step(self, kind, rate, duration=None, drain=None, **options):
        cfg = self.cfg
        step = load_step(self.pool, self.under_test[kind], rate, cfg["clients"], cfg["senders"],
                         cfg["duration"] if duration is None else duration,
                         cfg["drain"] if drain is None else drain, **options)
        print(step_row(step), flush=True)
        return step


def run_calibration(run):
    cfg = run.cfg
    print("\n== calibration: the lowest and top rates against the reference relay "
          "(the driver's own limits)")
    print(HEADER, flush=True)
    ends = {max(cfg["rates"])} | ({min(cfg["rates"])} if cfg["calibration"] == "ends" else set())
    run.result["calibration"] = [run.step("reference", rate, metrics=False) for rate in sorted(ends)]


def run_sweep(run):
    """Every relay at every rate, then the project with metrics off; capacities."""
    cfg, result = run.cfg, run.result
    print(f"\n== offered-load sweep ({cfg['clients']} clients, {cfg['senders']} senders)")
    print(HEADER, flush=True)
    for kind in run.relays:
        result["sweep"][kind] = [run.step(kind, rate) for rate in cfg["rates"]]
    if "project" in run.relays:
        cap_on = capacity(result["sweep"]["project"])
        if cfg["metrics_off_rates"] == "all":
            off_rates = cfg["rates"]
        else:  # the rate at (or just above) capacity, where a cost would show
            above = [r for r in cfg["rates"] if r > cap_on]
            off_rates = [cap_on or min(cfg["rates"])] + (above[:1] if run.args.mode == "quick" else [])
        result["sweep"]["project_metrics_off"] = [run.step("project", rate, metrics=False) for rate in off_rates]
    for kind, steps in result["sweep"].items():
        result["capacity"][kind] = capacity(steps)
    cap, base = result["capacity"].get("project", 0), result["capacity"].get("baseline", 0)
    result["capacity"]["ratio"] = round(cap / base, 1) if base else None
    if base == 0 and "baseline" in run.relays:
        # Not even the lowest rate passed: the ratio is at least cap / lowest.
        lowest = min(cfg["rates"])
        result["capacity"]["ratio_at_least"] = round(cap / lowest, 1)
        result["capacity"]["note"] = (f"the baseline failed at every rate swept (lowest {lowest:,}/s): "
                                      f"the ratio is more than {cap / lowest:.1f}")
    top = max(cfg["rates"])
    result["capacity"]["at_least"] = sorted(k for k, cap in result["capacity"].items()
                                            if k in result["sweep"] and cap == top)
    result["comparison"] = compare(result)


def run_metrics_cost(run):
    """Interleaved pairs at one rate: metrics endpoint on, then off."""
    if "project" not in run.relays:
        return
    cfg = run.cfg
    print(f"\n== metrics endpoint on vs off, {cfg['ab_rate']:,} msg/s, {cfg['repeats']} interleaved pair(s)")
    print(HEADER, flush=True)
    pairs = [[run.step("project", cfg["ab_rate"], metrics=metrics) for metrics in (True, False)]
             for _ in range(cfg["repeats"])]
    run.result["metrics_cost"] = metrics_cost(run.result["sweep"], pairs)


def run_scale(run):
    cfg = run.cfg
    kinds = [k for k in run.relays if k != "baseline" or cfg["scale_baseline"]]
    print("\n== scale: clients connected to one relay process")
    print(f"{'relay':<10}{'clients':>8}{'connect s':>11}{'ready s':>9}{'RSS MiB':>9}"
          f"{'KiB/client':>12}{'threads':>9}{'+const':>7}{'broadcast ms':>14}")
    for n in cfg["scale"]:
        for kind in kinds:
            s = scale_step(run.pool, run.under_test[kind], n)
            run.result["scale"].append(s)
            if s["ok"]:
                print(f"{kind:<10}{n:>8,}{s['connect_s']:>11.2f}{s['ready_s']:>9.2f}"
                      f"{s['rss_connected_kib'] / 1024:>9.1f}{s['rss_per_client_kib']:>12.1f}"
                      f"{s['threads']:>9,}{s['threads_beyond_clients']:>+7}{s['broadcast_to_all_ms']:>14.1f}",
                      flush=True)
            else:
                print(f"{kind:<10}{n:>8,}  FAILED: {s['error']}", flush=True)


def run_departure(run):
    """Mass departure: `departure_clients` leave at once, then a newcomer speaks."""
    cfg, n = run.cfg, run.cfg["departure_clients"]
    print(f"\n== mass departure: {n:,} clients leave at once, then a newcomer's first message "
          f"reaches an observer ({cfg['departure_runs']} run(s) each)", flush=True)
    for kind in run.relays:
        for late in cfg["late"]:
            try:
                delays = [departure_step(run.pool, run.under_test[kind], n, late)
                          for _ in range(cfg["departure_runs"])]
            except Exception as exc:  # noqa: BLE001 - report what this machine could not do, honestly
                run.result["departure"].append({"relay": kind, "clients": n, "late_s": late, "ok": False,
                                                "error": str(exc)})
                print(f"{kind}: {n} leave, newcomer after {late:g} s: FAILED: {exc}", flush=True)
                continue
            run.result["departure"].append({
                "relay": kind, "clients": n, "late_s": late, "ok": True,
                "delays_s": [round(d, 4) for d in delays], "median_s": round(statistics.median(delays), 4),
                "max_s": round(max(delays), 4)})
            print(f"{kind}: {n} leave, newcomer after {late:g} s: "
                  + ", ".join(f"{d:.3f}" for d in delays)
                  + f" s (median {statistics.median(delays):.3f}, max {max(delays):.3f})", flush=True)


def run_sigterm(run):
    """Shutdown at scale: SIGTERM with `sigterm_clients` connected."""
    cfg, n = run.cfg, run.cfg["sigterm_clients"]
    print(f"\n== SIGTERM with {n:,} clients connected: time to exit ({cfg['departure_runs']} run(s) each)",
          flush=True)
    for kind in run.relays:
        try:
            stops = [sigterm_step(run.pool, run.under_test[kind], n) for _ in range(cfg["departure_runs"])]
        except Exception as exc:  # noqa: BLE001 - report what this machine could not do, honestly
            run.result["sigterm"].append({"relay": kind, "clients": n, "ok": False, "error": str(exc)})
            print(f"{kind}: SIGTERM with {n} clients: FAILED: {exc}", flush=True)
            continue
        run.result["sigterm"].append({"relay": kind, "clients": n, "ok": True,
                                      "seconds": [round(t, 3) for t, _ in stops],
                                      "exit_status": [status for _, status in stops]})
        print(f"{kind}: SIGTERM with {n} clients: "
              + ", ".join(f"{seconds:.2f} s (exit {status})" for seconds, status in stops), flush=True)


def run_overload(run):
    """OVERLOAD_FACTOR x the project's capacity for overload_duration seconds,
    then as long again to deliver the backlog (a relay that holds the excess
    back rather than dropping it needs that time)."""
    cfg, result = run.cfg, run.result
    if "project" not in run.relays:
        print("\n== overload: skipped (it is the project's promise: add project to --relays)", flush=True)
        return
    cap = result["capacity"].get("project") or 0
    note = None
    if run.args.overload_rate:
        rate = run.args.overload_rate
        if not cap:
            cap = round(rate / OVERLOAD_FACTOR)
            note = f"rate from --overload-rate, no sweep capacity: {cap:,} assumed"
    else:
        if not cap:  # nothing passed: overload the lowest rate swept instead, and say so
            cap = min(cfg["rates"])
            note = f"no sweep capacity: {OVERLOAD_FACTOR:g} x the lowest rate swept ({cap:,})"
        rate = int(round(OVERLOAD_FACTOR * cap))
    kinds = ["project"] + (["previous"] if cfg["overload_previous"] and "previous" in run.relays else [])
    duration = cfg["overload_duration"]
    print(f"\n== overload: {rate:,} msg/s ({rate / cap:.2g} x the project's capacity {cap:,}), "
          f"{duration:g} s" + (f" ({note})" if note else ""))
    print(HEADER, flush=True)
    calibrated = max([s["offered_rate"] for s in result["calibration"]] or [0])
    reference = None
    if "calibration" in run.args.only and rate > calibrated:
        # Above the calibrated rates: can the driver itself offer and count this much?
        reference = run.step("reference", rate, duration=duration, drain=cfg["drain"] + duration, metrics=False)
        result["overload_calibration"] = reference
    for kind in kinds:
        step = run.step(kind, rate, duration=duration, drain=cfg["drain"] + duration, over_time=True)
        at_cap = next((s for s in result["sweep"].get(kind) or [] if s["offered_rate"] == cap), None)
        summary = result["overload"][kind] = overload_summary(step, at_cap, cap)
        if note:
            summary["note"] = note
        if reference:
            summary["reference_loss_at_this_rate"] = reference["loss"]
            summary["summary"] += (f"; the reference relay at this rate lost {reference['loss']:.2%}"
                                   + ("" if reference["lost_deliveries"] == 0 else
                                      " (the driver is a limit here: the relay's figures are bounded by it)"))
        by_second = " ".join(fmt(b["p99_ms"], "{:.0f}") for b in step["latency_by_second"])
        print(f"   {kind} p99 by second of sending (ms): {by_second}; slow-consumer drops "
              f"{step['relay_slow_consumer_drops']} ({step['slow_consumer_drops_from']}), "
              f"reading clients closed {step['clients_closed_by_relay']}", flush=True)


def run_slow_reader(run):
    cfg = run.cfg
    kinds = [k for k in ("project", "baseline") if k in run.relays and (k == "project" or cfg["slow_baseline"])]
    if not kinds:
        return
    print(f"\n== slow reader: one extra client reading 1 KiB every 100 ms "
          f"({cfg['slow_rate']:,} msg/s offered)")
    print(HEADER, flush=True)
    for kind in kinds:
        without, with_slow = [], []
        for _ in range(cfg["repeats"] if kind == "project" else 1):
            for slow, steps in ((0, without), (1, with_slow)):
                duration = cfg.get(f"slow_duration_{kind}", cfg["slow_duration"])
                steps.append(run.step(kind, cfg["slow_rate"], duration=duration, slow=slow))
        run.result["slow_reader"][kind] = slow_summary(without, with_slow)


# (--only name, scenario) in the order they run; overload needs the sweep's capacity
SCENARIOS = [("calibration", run_calibration), ("sweep", run_sweep), ("sweep", run_metrics_cost),
             ("scale", run_scale), ("overload", run_overload), ("slow", run_slow_reader),
             ("departure", run_departure), ("sigterm", run_sigterm), ("yardstick", yardstick.run_yardstick)]
# A run without --only: every scenario but the yardstick, which needs the C
# instruments from outside the repository (--anchors) and its own minutes.
DEFAULT_SCENARIOS = sorted({name for name, _ in SCENARIOS} - {"yardstick"})


# --- main ------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark the chat relay against its previous design and the class-demo baseline on "
                    "loopback: attributed deliveries/s, loss, latency, capacity, CPU per delivery, scale, "
                    "overload, slow reader, metrics cost.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="a short run (a few minutes)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="seconds, tiny sizes: checks the machinery (the test suite)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="the full run (default; see bench/BENCHMARK.md for how long)")
    parser.add_argument("--rates", type=lambda t: [int(x) for x in t.split(",")],
                        help="comma-separated offered rates (msg/s) for the sweep, e.g. 1000,5000,20000")
    parser.add_argument("--duration", type=float, help="seconds of load per step")
    parser.add_argument("--clients", type=int, help="clients in the sweep (default 100)")
    parser.add_argument("--senders", type=int, help="senders among them (default 10)")
    parser.add_argument("--scale", type=lambda t: [int(x) for x in t.split(",")],
                        help="comma-separated client counts for the scale scenario")
    parser.add_argument("--overload-rate", type=int,
                        help=f"offered msg/s for the overload step (default: {OVERLOAD_FACTOR:g} x the "
                             "project's capacity from the sweep)")
    parser.add_argument("--departure-clients", type=int,
                        help="clients that leave at once in the departure scenario (default per mode: "
                             "50, 1000, 4000)")
    parser.add_argument("--sigterm-clients", type=int,
                        help="clients connected when the sigterm scenario sends SIGTERM (default per mode: "
                             "50, 1000, 10000)")
    parser.add_argument("--late", type=lambda t: [float(x) for x in t.split(",")],
                        help="comma-separated seconds between the departure and the newcomer (default 0)")
    parser.add_argument("--departure-runs", type=int,
                        help="runs of the departure and sigterm scenarios per relay (default per mode: 1, 3, 3)")
    parser.add_argument("--driver-procs", type=int, default=2,
                        help="driver worker processes (default: %(default)s)")
    parser.add_argument("--only", choices=sorted({name for name, _ in SCENARIOS}), action="append",
                        help="run only these scenarios (repeatable; default: all but yardstick, which "
                             "runs only when named)")
    yard = parser.add_argument_group(
        "the C yardstick (--only yardstick, bench/yardstick.py)",
        "naive (bench/baseline_relay.py), project (limits off) and a C relay, each step on a fresh "
        "relay, interleaved, all driven by chatbench (C); both C programs are compiled with cc -O2 into "
        "the run's temporary directory. Without them (or cc) the scenario prints one skip line and the "
        "run exits 0. Default about 6 minutes; with --smoke, seconds.")
    yard.add_argument("--anchors", type=Path, default=relays.DEFAULT_ANCHORS, metavar="DIR",
                      help="directory holding c_relay.c and chatbench.c, outside the repository "
                           "(default: <repository root>/../shared/bench-anchors)")
    yard.add_argument("--yard-seconds", type=float, metavar="S",
                      help="seconds of load per yardstick step; steps below 100 msg/s run twice as long "
                           "(default: 3; --smoke: 1)")
    yard.add_argument("--yard-rows", type=lambda t: [x for x in t.split(",") if x], metavar="ROW,...",
                      help=f"yardstick rows to run, of {', '.join(yardstick.ROWS)} (default: all; --smoke: "
                           "ladder, light, huge-room at 100 clients, overload)")
    yard.add_argument("--yard-ladder", type=lambda t: [int(x) for x in t.split(",")], metavar="RATES",
                      help="comma-separated total offered msg/s of the capacity ladder (default: "
                           + ",".join(map(str, yardstick.LADDER)) + ")")
    parser.add_argument("--relays", default="project,previous,baseline",
                        help="comma-separated relays to compare, of project, previous, baseline "
                             "(default: %(default)s)")
    parser.add_argument("--project-script", type=Path, default=relays.SERVER_SCRIPT,
                        help="the relay benchmarked as 'project' (default: a2/mychatserver.py)")
    parser.add_argument("--previous-commit", default=relays.PREVIOUS_COMMIT,
                        help="the commit whose a2/mychatserver.py (and metrics/) is benchmarked as "
                             "'previous', extracted with git into a temporary directory "
                             "(default: %(default)s, the last commit before relay core v2)")
    parser.add_argument("--out", type=Path,
                        help=f"directory for bench-MODE.json and bench-MODE.png (default: "
                             f"{DEFAULT_OUT.relative_to(ROOT)}/, git-ignored; the committed figures are "
                             "replaced only with --out bench/results)")
    parser.add_argument("--json", type=Path, help="JSON output file (overrides --out for the JSON)")
    parser.add_argument("--png", type=Path, help="plot output file (overrides --out for the plot)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (relays, scenarios, settings) and where the output would "
                             "go, then exit without starting anything")
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    args.relay_list = [k for k in args.relays.split(",") if k]
    unknown = [k for k in args.relay_list if k not in ORDER]
    if unknown or not args.relay_list:
        parser.error(f"--relays: unknown relay {', '.join(unknown) or '(none)'}; choose from {', '.join(ORDER)}")
    args.relay_list = [k for k in ORDER if k in args.relay_list]  # one order in every table
    args.only = args.only or DEFAULT_SCENARIOS
    unknown = [row for row in args.yard_rows or [] if row not in yardstick.ROWS]
    if unknown:
        parser.error(f"--yard-rows: unknown row {', '.join(unknown)}; choose from {', '.join(yardstick.ROWS)}")
    if args.yard_seconds is not None and not 0.2 <= args.yard_seconds <= 60:
        parser.error("--yard-seconds must be 0.2-60 (a bounded benchmark)")
    for option in ("departure_clients", "sigterm_clients"):
        value = getattr(args, option)
        if value is not None and not 1 <= value <= MAX_CLIENTS_PER_STEP:
            parser.error(f"--{option.replace('_', '-')} must be 1-{MAX_CLIENTS_PER_STEP} (a bounded benchmark)")
    if args.departure_runs is not None and not 1 <= args.departure_runs <= 50:
        parser.error("--departure-runs must be 1-50 (a bounded benchmark)")
    if "overload" in args.only and "sweep" not in args.only and not args.overload_rate:
        parser.error("--only overload needs the sweep's capacity: add --only sweep or give --overload-rate")
    return args


def output_paths(args):
    """Where the JSON and the PNG go: --json/--png, else --out, else out/ (git-ignored)."""
    out = args.out or DEFAULT_OUT
    return (args.json or out / f"bench-{args.mode}.json"), (args.png or out / f"bench-{args.mode}.png")


def configure(args):
    cfg = dict(MODES[args.mode])
    for key in ("rates", "duration", "clients", "senders", "scale", "departure_clients", "sigterm_clients",
                "late", "departure_runs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = configure(args)
    json_path, png_path = output_paths(args)
    under_test = relays.registry(args.project_script, args.previous_commit)
    if args.dry_run:
        print_plan(args, cfg, under_test, json_path, None if args.no_plot else png_path)
        return 0
    relays.raise_nofile()
    started = time.monotonic()
    driven = [name for name in args.only if name != "yardstick"]  # scenarios that need the Python driver
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        for name in (*args.relay_list, "reference") if driven else ():
            try:
                made = under_test[name].prepare(workdir)
            except RuntimeError as exc:
                print(f"bench.py: {exc}", file=sys.stderr)
                return 2
            if name == "previous":
                args.previous_rev = made
        busy = machine_busy()
        if busy > 0.15:
            print(f"WARNING: {busy:.0%} of this machine's CPU was busy before the run started; "
                  "the figures below measure that load too", flush=True)
        run = Run(args, cfg, Pool(args.driver_procs) if driven else None, under_test)
        run.workdir, run.yard_cfg = workdir, yardstick.settings(args)
        run.result["meta"]["cpu_busy_before_run"] = busy
        try:
            if driven:
                print(f"chat relay benchmark, mode {args.mode}: relays {', '.join(run.relays)}"
                      + (f" (previous = {args.previous_rev})" if "previous" in run.relays else "")
                      + f"; {cfg['clients']} clients, {cfg['senders']} senders, {cfg['duration']:g} s per step, "
                        f"{args.driver_procs} driver processes, loopback", flush=True)
            else:
                print(f"chat relay benchmark, mode {args.mode}: the C yardstick only", flush=True)
            for name, scenario in SCENARIOS:
                if name in args.only:
                    scenario(run)
        finally:
            if run.pool:
                run.pool.close()
    write_outputs(run, json_path, None if args.no_plot else png_path, started)
    return 0


def print_plan(args, cfg, under_test, json_path, png_path):
    print(f"chat relay benchmark, mode {args.mode} (dry run: nothing is started)")
    for name in (*args.relay_list, "reference"):
        print(f"relay {name}: {under_test[name].about}")
    print("scenarios: " + ", ".join(name for name in dict(SCENARIOS) if name in args.only))
    print("settings: " + json.dumps(cfg))
    if "yardstick" in args.only:
        print(f"yardstick: anchors {args.anchors}; settings " + json.dumps(yardstick.settings(args)))
    print(f"JSON: {json_path}" + (f"\nplot: {png_path}" if png_path else ""))


def write_outputs(run, json_path, png_path, started):
    result = run.result
    result["targets"] = targets(result)
    result["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    result["meta"]["loadavg_at_end"] = os.getloadavg()  # this machine may be shared: see both
    drawn = bool(result["sweep"]) and png_path is not None
    if drawn:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        result["meta"]["plot"] = plot(result, png_path)
        result["meta"]["png"] = str(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result)
    print(f"\nJSON: {json_path}" + (f"\nplot: {png_path}" if drawn else ""))


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def metrics_cost(sweeps, pairs):
    """The endpoint's cost: relay CPU per delivery with metrics on vs off, at
    the same rate in interleaved runs (a CPU-bound relay's capacity is the
    inverse of that), plus both sweeps' capacities (coarse: the rate grid)."""
    on, off = sweeps.get("project") or [], sweeps.get("project_metrics_off") or []
    cpu_on = median([p[0]["relay_cpu_us_per_delivery"] for p in pairs])
    cpu_off = median([p[1]["relay_cpu_us_per_delivery"] for p in pairs])
    change = cpu_on / cpu_off - 1 if cpu_on and cpu_off else None
    cap_on, cap_off = capacity(on), capacity(off)
    scrapes = sum(p[0]["scrapes"] for p in pairs)
    return {"rate": pairs[0][0]["offered_rate"] if pairs else None, "pairs": len(pairs),
            "cpu_us_per_delivery_on": cpu_on, "cpu_us_per_delivery_off": cpu_off,
            "cpu_per_delivery_change": round(change, 3) if change is not None else None,
            "scrapes_during_on_runs": scrapes,
            "capacity_metrics_on": cap_on, "capacity_metrics_off": cap_off,
            "met": change is not None and change < 0.05,
            "summary": f"relay CPU per delivery {fmt(cpu_on, '{:.3f}')} us (on, scraped every 1 s) vs "
                       f"{fmt(cpu_off, '{:.3f}')} us (off), median of {len(pairs)} interleaved pair(s): "
                       f"{fmt(change * 100 if change is not None else None, '{:+.1f}')}%; sweep capacity "
                       f"{cap_on:,} (on) vs {cap_off:,} (off) msg/s"}


def slow_summary(without, with_slow):
    """Others' p99 with and without a slow reader: medians over interleaved runs."""
    a = median([s["latency_ms"]["p99"] for s in without])
    b = median([s["latency_ms"]["p99"] for s in with_slow])
    change = (b - a) / a if a and b is not None else None
    loss_with = max(s["loss"] for s in with_slow)
    drops = sum(s["relay_slow_consumer_drops"] for s in with_slow)
    met = change is not None and abs(change) < 0.10 and loss_with == 0
    return {"p99_without_ms": a, "p99_with_ms": b, "p99_change": round(change, 3) if change is not None else None,
            "runs": len(with_slow), "loss_without": max(s["loss"] for s in without), "loss_with": loss_with,
            "slow_reader_dropped_by_relay": drops, "met": met,
            "summary": f"others' p99 {fmt(a)} -> {fmt(b)} ms "
                       f"({fmt(change * 100 if change is not None else None, '{:+.0f}')}%, median of "
                       f"{len(with_slow)} run(s) each), others' loss {loss_with:.2%}, "
                       f"slow reader dropped as a slow consumer in {drops} of {len(with_slow)} run(s)",
            "steps": without + with_slow}


def print_summary(result):
    caps = result["capacity"]
    if caps:
        swept = [k for k in ORDER if k in caps]
        at_least = caps.get("at_least") or []
        print("\ncapacity (zero loss, p99 <= 50 ms): "
              + ", ".join(f"{k} {'at least ' if k in at_least else ''}{caps[k]:,} msg/s" for k in swept)
              + (f", project with metrics off {caps['project_metrics_off']:,}" if "project_metrics_off" in caps else ""))
        comparison = result.get("comparison") or {}
        ratios = comparison.get("capacity_vs_baseline")
        if ratios:
            print("  vs the class-demo baseline: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
        elif caps.get("ratio_at_least"):
            print(f"  vs the class-demo baseline: project more than {caps['ratio_at_least']}x")
        if comparison.get("by_rate"):
            kinds = [k for k in ORDER if k in comparison["by_rate"][0]]
            print("relay CPU per delivery (us) at the same offered rates ('*': that step lost deliveries):")
            print(f"{'offered/s':>10}" + "".join(f"{k:>12}" for k in kinds))
            for row in comparison["by_rate"]:
                print(f"{row['rate']:>10,}" + "".join(
                    f"{fmt(row[k]['cpu_us_per_delivery'], '{:.3f}') + ('*' if row[k]['loss'] else ' '):>12}"
                    for k in kinds))
    for cal in result.get("calibration") or []:
        print(f"calibration: at {cal['offered_rate']:,} msg/s the reference relay lost {cal['loss']:.2%}, "
              f"p50 {fmt(cal['latency_ms']['p50'])} ms, p99 {fmt(cal['latency_ms']['p99'])} ms, "
              f"driver CPU {cal['driver_cores']:.2f} cores"
              + ("" if cal["passed"] else "  <-- the driver itself is a limit at this rate"))
    for kind, overload in (result.get("overload") or {}).items():
        if kind != "project":
            print(f"overload: {overload['summary']}")
    for t in result.get("targets", []):
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT MET"
        print(f"  [{verdict}] {t['target']}: {t['measured']}")


if __name__ == "__main__":
    sys.exit(main())
