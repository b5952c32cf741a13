#!/usr/bin/env python3
"""bench.py - the chat relay benchmark: throughput, latency and scale, side by side
with the class-demo baseline, in one run, on loopback.

    python loadtest/bench.py --quick        # under a minute
    python loadtest/bench.py                # full: a few minutes
    python loadtest/bench.py --smoke        # seconds (the test suite's setting)

It starts every relay itself (a2/mychatserver.py with --metrics-port, the
baseline loadtest/baseline_server.py, and for calibration
loadtest/bench_refrelay.py), each step on a fresh process, and drives them
with worker processes (loadtest/bench_driver.py: epoll, bulk parsing). What
it reports, per step:

* attributed deliveries/s: relays that arrived as exactly one message with
  its own sender's "PORT: " prefix (glued or cut messages do not count);
* loss: 1 - attributed / (offered messages x (clients - 1)); messages the
  driver could not even write (the relay stopped reading) are lost too;
* latency p50/p99/max from the intended send time to receipt (one clock,
  CLOCK_MONOTONIC), sampled on the first message of every read, weighted by
  the read's message count;
* the relay's CPU seconds and peak RSS (/proc), the driver's own CPU.

Scenarios: calibration (the top rate against a relay the driver cannot
overload), the offered-load sweep and the capacity (highest rate with zero
loss and p99 <= 50 ms, every lower rate passing too), the same sweep with
the metrics endpoint off, scale (N clients connected: connect time, RSS per
client, one broadcast reaching all), and a slow reader. Output: a table on
stdout, a JSON file, a PNG plot. See loadtest/BENCHMARK.md.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_driver  # after the path fix (the worker processes import it too)

CAPACITY_P99_MS = 50.0
RELAYS = {
    "project": [str(ROOT / "a2" / "mychatserver.py"), "--port", "0", "--quiet"],
    "baseline": [str(HERE / "baseline_server.py"), "--port", "0"],
    "reference": [str(HERE / "bench_refrelay.py"), "--port", "0"],
}

MODES = {
    # rates: offered msg/s for the sweep; everything else per scenario.
    "smoke": {"rates": [500, 2000], "duration": 1.0, "clients": 20, "senders": 4, "calibration": "top",
              "metrics_off_rates": "top", "scale": [200], "scale_baseline": False,
              "slow_rate": 500, "slow_baseline": False, "slow_duration": 1.5, "drain": 2.0,
              "ab_rate": 2000, "repeats": 1},
    "quick": {"rates": [1000, 5000, 10000, 20000], "duration": 2.0, "clients": 100, "senders": 10,
              "calibration": "ends", "metrics_off_rates": "top", "scale": [1000], "scale_baseline": True,
              "slow_rate": 5000, "slow_baseline": False, "slow_duration": 3.0, "drain": 2.0,
              "ab_rate": 10000, "repeats": 1},
    "full": {"rates": [500, 1000, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 25000, 30000],
             "duration": 5.0, "clients": 100, "senders": 10, "calibration": "ends", "metrics_off_rates": "all",
             "scale": [1000, 5000, 10000], "scale_baseline": True,
             "slow_rate": 5000, "slow_baseline": True, "slow_duration": 6.0, "drain": 3.0,
             # the baseline's kernel send buffer autotunes to 4 MiB: its slow
             # reader takes ~10 s at this rate to fill it and stall the room
             "slow_duration_baseline": 15.0,
             "ab_rate": 10000, "repeats": 3},
}


# --- the relay under test, as a process --------------------------------------------

def _raise_nofile():
    """preexec_fn: the relay may hold 10,000+ sockets (soft limit -> hard)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Relay:
    """One relay process on a free loopback port; its CPU and memory from /proc."""

    def __init__(self, kind, metrics=False):
        self.kind = kind
        command = [sys.executable, *RELAYS[kind]]
        if metrics:
            command += ["--metrics-port", "0"]
        # Files, not pipes: the relay logs a line per connection (10,000 at
        # scale) and nobody has to drain them. Closed in stop().
        self._out = tempfile.NamedTemporaryFile(prefix=f"bench-{kind}-", suffix=".log")  # noqa: SIM115
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        # (bench.py's own limit is raised already and inherited; this says it
        # where the relay starts. Relays start while no scraper thread runs.)
        self.proc = subprocess.Popen(command, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile)  # noqa: PLW1509
        self.pid = self.proc.pid
        self.metrics_url = None
        deadline = time.monotonic() + 20
        while True:
            text = Path(self._out.name).read_text(errors="replace")
            listening = [line for line in text.splitlines() if line.startswith("Server listening on ")]
            metrics_line = [line for line in text.splitlines() if line.startswith("Metrics on ")]
            if listening and (metrics_line or not metrics):
                host, port = listening[0].rsplit(" ", 1)[1].rsplit(":", 1)
                self.address = (host, int(port))
                if metrics:
                    self.metrics_url = metrics_line[0].split(" ", 2)[2]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} relay did not start: {self.stderr()}")
            time.sleep(0.02)

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def stderr(self):
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


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
    """bench_driver worker processes, commanded over pipes."""

    def __init__(self, workers):
        context = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = context.Pipe()
            proc = context.Process(target=bench_driver.worker_main, args=(child,), daemon=True)
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

def load_step(pool, kind, rate, clients, senders, duration, drain, metrics=True, slow=0):
    """One load phase on a fresh relay: `clients` clients (plus `slow` slow
    readers), `senders` of them sending `rate` msg/s in all."""
    relay = Relay(kind, metrics=metrics and kind == "project")
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
        dropped = relay.stderr().count("(slow consumer)")
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
        "attributed_per_s": round(good / max(duration, (max(r["last_data_ns"] for r in results) - t0) / 1e9), 1),
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
        "relay_slow_consumer_drops": dropped,  # from the project relay's log
        "scrapes": scraper.scrapes if scraper else 0,
    }
    step["passed"] = (loss == 0 and latency["p99"] is not None and latency["p99"] <= CAPACITY_P99_MS)
    return step


def sweep(pool, kind, rates, cfg, metrics=True, log=print):
    steps = []
    for rate in rates:
        step = load_step(pool, kind, rate, cfg["clients"], cfg["senders"], cfg["duration"],
                         cfg["drain"], metrics=metrics)
        steps.append(step)
        log(step_row(step))
    return steps


def capacity(steps):
    """Highest offered rate with zero loss and p99 <= 50 ms, all lower rates passing too."""
    best = 0
    for step in sorted(steps, key=lambda s: s["offered_rate"]):
        if not step["passed"]:
            break
        best = step["offered_rate"]
    return best


def scale_step(pool, kind, n, broadcasts=3):
    relay = Relay(kind, metrics=kind == "project")
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
            "threads": threads1, "threads_per_client": round((threads1 - threads0) / n, 2),
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


# --- output ------------------------------------------------------------------------

def fmt(value, spec="{:.1f}"):
    return "-" if value is None else spec.format(value)


HEADER = (f"{'relay':<22}{'offered/s':>10}{'attributed/s':>14}{'loss':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'relay cpu':>10}{'drv cpu':>9}{'other':>7}{'rss MiB':>9}  ok")


def step_row(s):
    name = s["relay"] + ("" if s["relay"] != "project" else (" (metrics)" if s["metrics"] else " (no metrics)"))
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


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"project": ("project relay (metrics on)", "tab:blue", "o-"),
              "project_metrics_off": ("project relay (metrics off)", "tab:cyan", "s--"),
              "baseline": ("class-demo baseline", "tab:red", "^-")}
    clients = None
    for key, (label, color, style) in styles.items():
        steps = result["sweep"].get(key) or []
        if not steps:
            continue
        clients = steps[0]["clients"]
        x = [s["offered_rate"] for s in steps]
        left.plot(x, [s["attributed_per_s"] for s in steps], style, color=color, label=label)
        right.plot(x, [s["latency_ms"]["p99"] or float("nan") for s in steps], style, color=color, label=label)
    rates = [s["offered_rate"] for s in result["sweep"]["project"]]
    if clients:
        left.plot(rates, [r * (clients - 1) for r in rates], ":", color="gray", label="offered x (clients - 1)")
    for key, color in (("project", "tab:blue"), ("baseline", "tab:red")):
        cap = result["capacity"].get(key)
        if cap:
            left.axvline(cap, color=color, alpha=0.3, linewidth=4)
    left.set(xlabel="offered load (messages/s)", ylabel="attributed deliveries/s",
             title=f"Throughput, {clients} clients (bands: capacity)")
    left.ticklabel_format(style="plain")
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e6:.1f}M"))
    right.axhline(CAPACITY_P99_MS, color="gray", linestyle=":", label="50 ms (capacity limit)")
    right.set(xlabel="offered load (messages/s)", ylabel="p99 latency (ms, log)", yscale="log",
              title="p99 latency, send to receipt")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"chat relay benchmark ({meta['mode']}), {meta['machine']['cpus']} cores, "
                 f"{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(result):
    """The issue's targets, each with what was measured and whether it was met."""
    out = []
    cap, base = result["capacity"].get("project", 0), result["capacity"].get("baseline")
    at_least = result["capacity"].get("ratio_at_least")
    if base is not None:
        out.append({"target": "capacity >= 10x the baseline's (same run)",
                    "measured": f"{cap:,} vs {base:,} msg/s offered = "
                                + (f"{result['capacity']['ratio']}x" if base else f"more than {at_least}x "
                                   "(the baseline failed at every rate)"),
                    "met": bool(cap >= 10 * base if base else at_least and at_least >= 10)})
    low = next((s for s in result["sweep"].get("project", []) if s["offered_rate"] == 1000), None)
    if low:
        out.append({"target": "1,000 msg/s: zero loss, p99 <= 10 ms",
                    "measured": f"loss {low['loss']:.2%}, p99 {fmt(low['latency_ms']['p99'])} ms",
                    "met": low["lost_deliveries"] == 0 and (low["latency_ms"]["p99"] or 1e9) <= 10})
    top = [s for s in result["scale"] if s["relay"] == "project"]
    if top:
        biggest = max(top, key=lambda s: s["clients"] if s["ok"] else -1)
        if biggest["ok"]:
            out.append({"target": "10,000 clients on one process, a broadcast reaches all; RSS/client < 100 KiB",
                        "measured": f"{biggest['clients']:,} clients, broadcast {biggest['broadcast_to_all_ms']:.0f} ms, "
                                    f"{biggest['rss_per_client_kib']} KiB/client",
                        # None: this mode did not go up to 10,000 clients (--quick, --smoke)
                        "met": (biggest["clients"] >= 10000 and biggest["rss_per_client_kib"] < 100)
                        if biggest["clients"] >= 10000 else None})
        else:
            out.append({"target": "10,000 clients", "measured": biggest.get("error"), "met": False})
    mc = result.get("metrics_cost")
    if mc:
        out.append({"target": "metrics on costs < 5% of capacity",
                    "measured": mc["summary"], "met": mc["met"]})
    sr = result.get("slow_reader", {}).get("project")
    if sr:
        out.append({"target": "a slow reader changes the others' p99 by < 10%",
                    "measured": sr["summary"], "met": sr["met"]})
    return out


# --- main ------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark the chat relay against the class-demo baseline on loopback: "
                    "attributed deliveries/s, loss, latency, capacity, scale, slow reader, metrics cost.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="a short run (under a minute)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="a few seconds, tiny sizes: checks the machinery (the test suite)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="the full run, a few minutes (default)")
    parser.add_argument("--rates", type=lambda t: [int(x) for x in t.split(",")],
                        help="comma-separated offered rates (msg/s) for the sweep, e.g. 1000,5000,20000")
    parser.add_argument("--duration", type=float, help="seconds of load per step")
    parser.add_argument("--clients", type=int, help="clients in the sweep (default 100)")
    parser.add_argument("--senders", type=int, help="senders among them (default 10)")
    parser.add_argument("--scale", type=lambda t: [int(x) for x in t.split(",")],
                        help="comma-separated client counts for the scale scenario")
    parser.add_argument("--driver-procs", type=int, default=2,
                        help="driver worker processes (default: %(default)s)")
    parser.add_argument("--only", choices=["sweep", "scale", "slow", "calibration"], action="append",
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--relays", default="project,baseline",
                        help="relays to sweep (default: %(default)s)")
    parser.add_argument("--project-script", type=Path, default=RELAYS["project"][0],
                        help="the relay benchmarked as 'project' (default: a2/mychatserver.py), "
                             "e.g. an older version to compare")
    parser.add_argument("--json", type=Path, help="JSON output (default: loadtest/results/bench-MODE.json)")
    parser.add_argument("--png", type=Path, help="plot output (default: loadtest/results/bench-MODE.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(MODES[args.mode])
    RELAYS["project"][0] = str(args.project_script)
    for key in ("rates", "duration", "clients", "senders", "scale"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    only = set(args.only or ["sweep", "scale", "slow", "calibration"])
    relays = args.relays.split(",")
    out_dir = HERE / "results"
    json_path = args.json or out_dir / f"bench-{args.mode}.json"
    png_path = args.png or out_dir / f"bench-{args.mode}.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _raise_nofile()
    started = time.monotonic()
    result = {
        "meta": {"mode": args.mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "machine": machine(), "config": cfg, "driver_procs": args.driver_procs,
                 "project_script": str(args.project_script),
                 "capacity_rule": f"highest offered rate with zero loss and p99 <= {CAPACITY_P99_MS:.0f} ms, "
                                  "every lower rate passing too",
                 "latency_method": "intended send time to receipt, CLOCK_MONOTONIC; one sample per read "
                                   "(its first complete message) weighted by the read's message count"},
        "calibration": [], "sweep": {}, "capacity": {}, "scale": [], "slow_reader": {},
        "metrics_cost": None,
    }
    busy = machine_busy()
    result["meta"]["cpu_busy_before_run"] = busy
    if busy > 0.15:
        print(f"WARNING: {busy:.0%} of this machine's CPU was busy before the run started; "
              "the figures below measure that load too", flush=True)
    pool = Pool(args.driver_procs)
    try:
        print(f"chat relay benchmark, mode {args.mode}: {cfg['clients']} clients, {cfg['senders']} senders, "
              f"{cfg['duration']:g} s per step, {args.driver_procs} driver processes, loopback", flush=True)
        if "calibration" in only:
            print("\n== calibration: the lowest and top rates against the reference relay "
                  "(the driver's own limits)")
            print(HEADER)
            result["calibration"] = []
            ends = {max(cfg["rates"])} | ({min(cfg["rates"])} if cfg["calibration"] == "ends" else set())
            for rate in sorted(ends):
                step = load_step(pool, "reference", rate, cfg["clients"], cfg["senders"],
                                 cfg["duration"], cfg["drain"], metrics=False)
                result["calibration"].append(step)
                print(step_row(step), flush=True)
        if "sweep" in only:
            print(f"\n== offered-load sweep ({cfg['clients']} clients, {cfg['senders']} senders)")
            print(HEADER, flush=True)
            for kind in relays:
                result["sweep"][kind] = sweep(pool, kind, cfg["rates"], cfg,
                                              log=lambda row: print(row, flush=True))
            if "project" in relays:
                cap_on = capacity(result["sweep"]["project"])
                if cfg["metrics_off_rates"] == "all":
                    off_rates = cfg["rates"]
                else:  # quick: the rate at (or just above) capacity, where a cost would show
                    above = [r for r in cfg["rates"] if r > cap_on]
                    off_rates = [cap_on or min(cfg["rates"])] + (above[:1] if args.mode == "quick" else [])
                off = sweep(pool, "project", off_rates, cfg, metrics=False,
                            log=lambda row: print(row, flush=True))
                result["sweep"]["project_metrics_off"] = off
            for kind, steps in result["sweep"].items():
                result["capacity"][kind] = capacity(steps)
            cap, base = result["capacity"].get("project", 0), result["capacity"].get("baseline", 0)
            result["capacity"]["ratio"] = round(cap / base, 1) if base else None
            if base == 0 and "baseline" in relays:
                # Not even the lowest rate passed: the ratio is at least cap / lowest.
                lowest = min(cfg["rates"])
                result["capacity"]["ratio_at_least"] = round(cap / lowest, 1)
                result["capacity"]["note"] = (f"the baseline failed at every rate swept (lowest {lowest:,}/s): "
                                              f"the ratio is more than {cap / lowest:.1f}")
            if "project" in relays:
                print(f"\n== metrics endpoint on vs off, {cfg['ab_rate']:,} msg/s, {cfg['repeats']} interleaved pair(s)")
                print(HEADER, flush=True)
                pairs = []
                for _ in range(cfg["repeats"]):
                    pair = []
                    for metrics in (True, False):
                        step = load_step(pool, "project", cfg["ab_rate"], cfg["clients"], cfg["senders"],
                                         cfg["duration"], cfg["drain"], metrics=metrics)
                        pair.append(step)
                        print(step_row(step), flush=True)
                    pairs.append(pair)
                result["metrics_cost"] = metrics_cost(result["sweep"], pairs)
        if "scale" in only:
            print("\n== scale: clients connected to one relay process")
            print(f"{'relay':<10}{'clients':>8}{'connect s':>11}{'ready s':>9}{'RSS MiB':>9}"
                  f"{'KiB/client':>12}{'threads':>9}{'broadcast ms':>14}")
            for n in cfg["scale"]:
                for kind in ["project"] + (["baseline"] if cfg["scale_baseline"] else []):
                    s = scale_step(pool, kind, n)
                    result["scale"].append(s)
                    if s["ok"]:
                        print(f"{kind:<10}{n:>8,}{s['connect_s']:>11.2f}{s['ready_s']:>9.2f}"
                              f"{s['rss_connected_kib'] / 1024:>9.1f}{s['rss_per_client_kib']:>12.1f}"
                              f"{s['threads']:>9,}{s['broadcast_to_all_ms']:>14.1f}", flush=True)
                    else:
                        print(f"{kind:<10}{n:>8,}  FAILED: {s['error']}", flush=True)
        if "slow" in only:
            print(f"\n== slow reader: one extra client reading 1 KiB every 100 ms "
                  f"({cfg['slow_rate']:,} msg/s offered)")
            print(HEADER, flush=True)
            for kind in ["project"] + (["baseline"] if cfg["slow_baseline"] else []):
                without, with_slow = [], []
                for _ in range(cfg["repeats"] if kind == "project" else 1):
                    for slow, steps in ((0, without), (1, with_slow)):
                        duration = cfg.get(f"slow_duration_{kind}", cfg["slow_duration"])
                        step = load_step(pool, kind, cfg["slow_rate"], cfg["clients"], cfg["senders"],
                                         duration, cfg["drain"], slow=slow)
                        steps.append(step)
                        print(step_row(step), flush=True)
                result["slow_reader"][kind] = slow_summary(without, with_slow)
    finally:
        pool.close()
    result["targets"] = targets(result) if result["sweep"] else []
    result["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    result["meta"]["loadavg_at_end"] = os.getloadavg()  # this machine may be shared: see both
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if result["sweep"] and not args.no_plot:
        plot(result, png_path)
        result["meta"]["png"] = str(png_path)
    print_summary(result)
    print(f"\nJSON: {json_path}" + ("" if args.no_plot or not result["sweep"] else f"\nplot: {png_path}"))
    return 0


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
    if result["capacity"]:
        c = result["capacity"]
        ratio = f"{c['ratio']}x" if c.get("ratio") else (f"more than {c['ratio_at_least']}x"
                                                          if c.get("ratio_at_least") else "-")
        print(f"\ncapacity (zero loss, p99 <= 50 ms): project {c.get('project', 0):,} msg/s, "
              f"baseline {c.get('baseline', 0):,} msg/s, ratio {ratio}"
              + (f", project with metrics off {c['project_metrics_off']:,}" if "project_metrics_off" in c else ""))
    for cal in result.get("calibration") or []:
        print(f"calibration: at {cal['offered_rate']:,} msg/s the reference relay lost {cal['loss']:.2%}, "
              f"p50 {fmt(cal['latency_ms']['p50'])} ms, p99 {fmt(cal['latency_ms']['p99'])} ms, "
              f"driver CPU {cal['driver_cores']:.2f} cores"
              + ("" if cal["passed"] else "  <-- the driver itself is a limit at this rate"))
    for t in result.get("targets", []):
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT MET"
        print(f"  [{verdict}] {t['target']}: {t['measured']}")


if __name__ == "__main__":
    sys.exit(main())
