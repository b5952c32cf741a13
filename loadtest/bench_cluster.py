#!/usr/bin/env python3
"""bench_cluster.py - one relay node vs three nodes over Redis, same clients, same load.

    python loadtest/bench_cluster.py                       # ~1 minute: three rates, both set-ups
    python loadtest/bench_cluster.py --rates 1000 --duration 2

Why it exists: issue 12 asks what the Redis backbone costs and carries. Each
step starts fresh processes: either one `a2/mychatserver.py --quiet` with
every client on it, or a redis-server (AOF) and three
`a2/mychatserver.py --quiet --backbone redis://...` nodes with the clients
split evenly over them (driver worker w talks to node w). The load is
loadtest/bench_driver.py's (open loop, every delivery checked for its
sender's prefix; latency from the intended send time, so it includes the
backbone: XADD, XREAD, the remote node's sender). Reported per step:
attributed deliveries/s, how many of them crossed nodes, loss, p50/p99,
and the CPU (cores) of redis-server, of each node and of the driver.
Figures: loadtest/BENCHMARK.md, section "Cluster".
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (loadtest/bench.py: the driver pool, probes, percentiles)
from cluster.local import Node, RedisServer  # noqa: E402

NODES = 3


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Setup:
    """The processes of one step: single node, or Redis + NODES nodes."""

    def __init__(self, kind):
        self.kind = kind
        self.redis = None
        if kind == "single":
            self.nodes = [Node(None, args=["--quiet", "--max-rate", "0"])]
        else:
            self.redis = RedisServer(appendonly=True).start()
            self.nodes = [Node(self.redis.url(), args=["--quiet", "--max-rate", "0"], wait=False) for _ in range(NODES)]
            for node in self.nodes:
                node.wait_listening()
            for node in self.nodes:  # every node reads the stream and hears the others
                deadline = time.monotonic() + 10
                while not all(node.count(f"hearing node {other.node_id}")
                              for other in self.nodes if other is not node):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the nodes did not hear each other")
                    time.sleep(0.05)

    def pids(self):
        named = {f"node{i}": node.proc.pid for i, node in enumerate(self.nodes)}
        if self.redis is not None:
            named["redis-server"] = self.redis.proc.pid
        return named

    def addresses(self, workers):
        return [self.nodes[w % len(self.nodes)].address for w in range(workers)]

    def stop(self):
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()


def step(pool, kind, rate, clients, senders, duration, drain):
    setup = Setup(kind)
    try:
        workers = len(pool)
        counts = bench.split(clients, workers)
        results = pool.call([("connect", (address, n, 0))
                             for address, n in zip(setup.addresses(workers), counts)])
        bench.wait_ready(pool)
        sender_sets = [[g // workers for g in range(senders) if g % workers == w] for w in range(workers)]
        phase_sets = [[g / senders for g in range(senders) if g % workers == w] for w in range(workers)]
        pids = setup.pids()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine0 = bench.cpu_totals()[0]
        t0 = time.monotonic_ns() + 200_000_000
        results = pool.call([("run", {"t0_ns": t0, "duration": duration, "rate": rate / senders,
                                      "senders": sender_sets[w], "phases": phase_sets[w],
                                      "drain": drain, "slow": []})
                             for w in range(workers)], timeout=duration + drain + 60)
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        machine_cpu = bench.cpu_totals()[0] - machine0
        gaps = sum(node.count("backbone_gap") for node in setup.nodes)
    finally:
        try:
            pool.call([("close", None)] * len(pool))
        finally:
            setup.stop()
    offered = sum(r["offered"] for r in results)
    good = sum(r["good"] for r in results)
    expected = offered * (clients - 1)
    # Deliveries that crossed nodes: each message of worker w's senders goes to
    # the clients of the other workers, which are on other nodes in the cluster.
    cross = (sum(r["offered"] * (clients - counts[w]) for w, r in enumerate(results))
             if kind == "cluster" else 0)
    # the seconds the deliveries arrived in: the send phase, or longer if the
    # relays were still delivering after it. CPU is divided by this window
    # (the drain that follows it is idle time).
    window = max(duration, (max(r["last_data_ns"] for r in results) - t0) / 1e9)
    cores = {name: round(seconds / window, 2) for name, seconds in cpu.items()}
    driver_cpu = sum(r["cpu_s"] for r in results)
    latency = bench.percentiles([r["lat_us"] for r in results], [r["lat_w"] for r in results])
    driver_cores = round(driver_cpu / window, 2)
    return {
        "setup": kind, "offered_rate": rate, "clients": clients, "senders": senders,
        "duration_s": duration, "offered_messages": offered, "expected_deliveries": expected,
        "attributed_deliveries": good, "attributed_per_s": round(good / window),
        "cross_node_per_s": round(cross / window) if good >= expected else None,
        "lost_deliveries": max(0, expected - good), "latency_ms": latency,
        "window_s": round(window, 3), "cpu_s": {name: round(v, 2) for name, v in cpu.items()},
        "cores": cores, "driver_cores": driver_cores,
        "relays_cpu_us_per_delivery": round(sum(v for k, v in cpu.items() if k != "redis-server")
                                            / good * 1e6, 3) if good else None,
        "other_cores": round(max(0.0, machine_cpu - sum(cpu.values()) - driver_cpu) / window, 2),
        "backbone_gap_lines": gaps,
    }


def row(s):
    lat = s["latency_ms"]
    cores = " ".join(f"{name}={value:.2f}" for name, value in s["cores"].items())
    cross = "-" if s["cross_node_per_s"] is None else f"{s['cross_node_per_s']:,}"
    return (f"{s['setup']:<8}{s['offered_rate']:>7,} msg/s  {s['attributed_per_s']:>10,}/s  "
            f"cross {cross:>9}/s  lost {s['lost_deliveries']:>7,}  "
            f"p50 {bench.fmt(lat['p50']):>6} p99 {bench.fmt(lat['p99']):>7} ms  "
            f"cores: {cores} driver={s['driver_cores']:.2f} other={s['other_cores']:.2f}  "
            f"{s['relays_cpu_us_per_delivery']} us/delivery")


def main(argv=None):
    parser = argparse.ArgumentParser(description="One relay node vs three nodes over Redis: "
                                     "same clients, same offered load (loopback).")
    parser.add_argument("--rates", type=lambda t: [int(x) for x in t.split(",")], default=[1000, 4000, 8000],
                        help="offered msg/s in all, comma-separated (default: 1000,4000,8000)")
    parser.add_argument("--clients", type=int, default=90, help="clients in all (default: 90)")
    parser.add_argument("--senders", type=int, default=9, help="senders among them (default: 9)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per step (default: 4)")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait for late deliveries")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "bench-cluster.json",
                        help="JSON output (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.clients < NODES * 2 or not 1 <= args.senders <= args.clients:
        parser.error("need at least 6 clients and 1..clients senders")
    pool = bench.Pool(NODES)  # one driver worker per node
    steps = []
    info = bench.machine()
    try:
        for rate in args.rates:
            for kind in ("single", "cluster"):
                result = step(pool, kind, rate, args.clients, args.senders, args.duration, args.drain)
                steps.append(result)
                print(row(result), flush=True)
    finally:
        pool.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "steps": steps}, indent=1) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
