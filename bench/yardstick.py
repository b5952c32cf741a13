"""yardstick.py - the "C yardstick" scenario of bench.py (issue 22): the project's
relay measured against what this machine can do, not only against the class demo.

    python bench/bench.py --only yardstick            # the full scenario, about 6 minutes
    python bench/bench.py --only yardstick --smoke    # seconds: checks the machinery

The instruments live OUTSIDE the repository (--anchors, default
../shared/bench-anchors beside the repository root) and are never copied
into it: c_relay.c (one epoll thread, no limits, no sanitising: the physical
limit of an assignment-shaped relay) and chatbench.c (a load driver in C). Both
are compiled with `cc -O2` into the run's temporary directory. Without them,
or without cc, the scenario prints one skip line and the run goes on.

Three relays, every step on a freshly started process, interleaved per step
(naive, project, c) so that drift of this shared machine hits all alike:

    naive    bench/baseline_relay.py, the class demo (a thread per client)
    project  a2/mychatserver.py with flood control and per-host limits off
    c        c_relay

All are driven by chatbench, so the driver is the same for all and costs
little. Per step: chatbench's deliveries/s, loss, unattributed deliveries
(glued or cut messages), latency p50/p99/max; the relay's CPU seconds
(user + system, /proc) during the send phase alone (connecting thousands of
clients is not charged to the deliveries: a sampler reads the relay's CPU
every 10 ms and the window is cut from chatbench's own connect time, settle
and delivery time), CPU us per delivery, peak RSS, clients the relay closed,
and for the project the clients it dropped as slow consumers or over its
memory budget (its "Dropping" log lines).

Rows (`--yard-rows`): ladder (capacity), light (CPU per delivery at 1k msg/s),
big-room (2,000 clients), huge-room (10,000 clients), overload (2 x the
project's capacity), limits (the project with its stranger limits at their
defaults vs off). A step fails when it loses or mis-attributes a delivery or
its p99 exceeds 50 ms.
"""

import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import relays

FAIL_P99_MS = 50.0
ROWS = ("ladder", "light", "big-room", "huge-room", "overload", "limits")
LIMITS_OFF = ["--max-rate", "0", "--max-per-host", "0", "--max-connect-rate", "0"]
LOW_RATE = 100  # msg/s; steps offering less run 2 x --yard-seconds
LADDER = [1000, 2000, 3000, 5000, 10000, 15000, 20000, 25000, 30000, 35000, 40000]

SETTINGS = {
    "full": {"seconds": 3.0, "drain": 3.0, "clients": 100, "senders": 10, "ladder": LADDER,
             "light_rate": 1000, "light_repeats": 3,
             "big_clients": 2000, "big_rates": [400, 800, 1600], "big_cpu_rates": [10, 50],
             "huge_clients": 10000, "huge_rates": [5, 25], "overload_factor": 2.0},
    "smoke": {"seconds": 1.0, "drain": 1.0, "clients": 20, "senders": 4, "ladder": [1000, 2000],
              "light_rate": 200, "light_repeats": 1,
              "big_clients": 60, "big_rates": [200], "big_cpu_rates": [],
              "huge_clients": 100, "huge_rates": [20], "overload_factor": 2.0},
}


def settings(args):
    """The mode's settings (smoke, else full), with --yard-seconds and --yard-ladder."""
    cfg = dict(SETTINGS["smoke" if args.mode == "smoke" else "full"])
    if args.yard_seconds:
        cfg["seconds"] = args.yard_seconds
    if args.yard_ladder:
        cfg["ladder"] = args.yard_ladder
    cfg["rows"] = args.yard_rows or list(ROWS)
    if args.mode == "smoke" and not args.yard_rows:
        cfg["rows"] = ["ladder", "light", "huge-room", "overload"]
    return cfg


def instruments(anchors, workdir):
    """(chatbench binary, the three relays by name), built from `anchors`;
    RuntimeError with a one-line reason if they cannot be."""
    anchors = Path(anchors)
    if not anchors.is_dir():
        raise RuntimeError(f"no C instruments at {anchors} (no such directory; --anchors DIR)")
    missing = [name for name in ("c_relay.c", "chatbench.c") if not (anchors / name).is_file()]
    if missing:
        raise RuntimeError(f"no C instruments at {anchors} ({', '.join(missing)} missing)")
    chatbench = relays.compile_c(anchors / "chatbench.c", workdir, "chatbench")
    c = relays.CRelay(anchors)
    c.prepare(workdir)
    return chatbench, c


class CpuSampler(threading.Thread):
    """The relay's CPU seconds every 10 ms, with the time: a window of a step
    (the send phase, known only once chatbench reports) is cut out later."""

    def __init__(self, relay):
        super().__init__(daemon=True)
        self.relay, self.samples = relay, []
        self.stopping = threading.Event()

    def run(self):
        while True:
            try:
                self.samples.append((time.monotonic(), self.relay.cpu_seconds()))
            except (OSError, IndexError, ValueError):
                return  # the relay has gone
            if self.stopping.wait(0.01):
                return

    def at(self, t):
        """CPU seconds at time t, interpolated between the samples around it."""
        before = [s for s in self.samples if s[0] <= t] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t] or self.samples[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)


class Yardstick:
    """One yardstick run: chatbench, the relays, the steps measured."""

    def __init__(self, run, chatbench, c_relay):
        self.run, self.cfg, self.chatbench = run, run.yard_cfg, chatbench
        under_test = run.under_test
        project = relays.Relay("project", "a2/mychatserver.py, flood control and per-host limits off",
                               Path(run.args.project_script),
                               args=["--quiet", "--max-clients", "20000", *LIMITS_OFF])
        limits_on = relays.Relay("project+limits", "a2/mychatserver.py, stranger limits at their defaults",
                                 Path(run.args.project_script), args=["--quiet", "--max-clients", "20000"])
        naive = under_test["baseline"]
        self.relays = {"naive": naive, "project": project, "project+limits": limits_on, "c": c_relay}
        self.steps = []

    def step(self, row, name, clients, rate, senders=None, seconds=None, drain=None):
        """One chatbench run against a fresh `name` relay; the step's figures."""
        cfg = self.cfg
        senders = senders or cfg["senders"]
        # Below LOW_RATE msg/s a step runs twice as long: the relay's CPU is
        # counted in 10 ms ticks, and a few messages a second make few of them.
        seconds = seconds or cfg["seconds"] * (2 if rate < LOW_RATE else 1)
        drain = cfg["drain"] if drain is None else drain
        settle = 0.5 + clients / 2000  # the relay must have admitted everyone before the first message
        relay = self.relays[name].start()
        sampler = CpuSampler(relay)
        sampler.start()
        try:
            command = [str(self.chatbench), "--port", str(relay.address[1]), "--clients", str(clients),
                       "--senders", str(senders), "--rate", f"{rate / senders:g}", "--seconds", f"{seconds:g}",
                       "--drain", f"{drain:g}", "--settle", f"{settle:g}"]
            launched = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=seconds + drain + settle + 120, preexec_fn=relays.raise_nofile)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"chatbench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
            report = json.loads(lines[-1])
            sampler.stopping.set()
            sampler.join(2)
            sending = launched + report["connect_s"] + settle
            cpu = sampler.at(sending + report["seconds"]) - sampler.at(sending)
            peak_rss = relay.status("VmHWM") if relay.running() else None
            dropped = {"slow_consumer": relay.count("(slow consumer)", relay.errors),
                       "memory_budget": relay.count("the most of any client", relay.errors)}
        finally:
            sampler.stopping.set()
            relay.stop()
        delivered = report["delivered"]
        p99 = report["lat_ms_p99"] if report["lat_ms_p99"] >= 0 else None
        step = {
            "row": row, "relay": name, "clients": clients, "senders": senders, "offered_rate": rate,
            "seconds": seconds, "sent": report["sent"], "expected": report["expected"], "delivered": delivered,
            "deliveries_per_s": report["deliveries_per_s"], "loss": report["loss"],
            "loss_fraction": round(report["loss"] / report["expected"], 6) if report["expected"] else 0.0,
            "unattributed": report["unattributed"], "closed_by_relay": report["closed_by_server"],
            "latency_ms": {"p50": _ms(report["lat_ms_p50"]), "p99": p99, "max": _ms(report["lat_ms_max"])},
            "relay_cpu_s": round(cpu, 3),
            "relay_cpu_us_per_delivery": round(cpu / delivered * 1e6, 3) if delivered else None,
            "relay_peak_rss_kib": peak_rss, "project_drops": dropped if name.startswith("project") else None,
            "driver_cpu_s": report["driver_cpu_s"], "chatbench": report,
        }
        step["passed"] = report["loss"] == 0 and report["unattributed"] == 0 and p99 is not None \
            and p99 <= FAIL_P99_MS
        self.steps.append(step)
        print(step_line(step), flush=True)
        return step

    # --- rows ----------------------------------------------------------------------

    def ladder(self):
        """100 clients, 10 senders, the offered rate stepped up; a relay leaves
        the ladder at its first failing step; capacity = its last clean step."""
        cfg = self.cfg
        heading(f"capacity ladder: {cfg['clients']} clients, {cfg['senders']} senders, "
                f"{cfg['seconds']:g} s a step; a relay stops at its first failing step")
        capacity, climbing = {}, ["naive", "project", "c"]
        for rate in cfg["ladder"]:
            for name in list(climbing):
                if self.step("ladder", name, cfg["clients"], rate)["passed"]:
                    capacity[name] = rate
                else:
                    climbing.remove(name)
            if not climbing:
                break
        capacity = {name: capacity.get(name, 0) for name in ("naive", "project", "c")}
        # A relay still climbing at the top step has a capacity of at least that.
        bound = {("project", "c"): None, ("project",): "at least", ("c",): "at most", (): "exactly"}[
            tuple(k for k in ("project", "c") if k in climbing)]
        out = {"capacity": capacity, "at_least": climbing, "project_vs_c_is": bound or "unknown (neither failed)",
               "project_vs_c": ratio(capacity["project"], capacity["c"]) if bound else None}
        print("capacity (last clean step): " + ", ".join(
            f"{k} {'>= ' if k in climbing else ''}{v:,} msg/s" for k, v in capacity.items())
            + (f"; project / c = {fmt(out['project_vs_c'], '{:.2f}x')} ({bound})" if bound
               else "; project / c: neither failed, no ratio (extend --yard-ladder)"), flush=True)
        return out

    def light(self):
        """1k msg/s in a 100-client room, repeated interleaved: medians."""
        cfg = self.cfg
        rate, repeats = cfg["light_rate"], cfg["light_repeats"]
        heading(f"light load: {cfg['clients']} clients at {rate:,} msg/s, {repeats} interleaved repeat(s)")
        steps = [self.step("light", name, cfg["clients"], rate)
                 for _ in range(repeats) for name in ("naive", "project", "c")]
        return self.medians(steps, ("naive", "project", "c"))

    def big_room(self):
        cfg = self.cfg
        n = cfg["big_clients"]
        heading(f"big room: {n:,} clients, {cfg['senders']} senders; throughput at "
                f"{', '.join(map(str, cfg['big_rates']))} msg/s, CPU per delivery at "
                f"{', '.join(map(str, cfg['big_cpu_rates'])) or '-'} msg/s")
        return self.rates_row("big-room", n, cfg["big_rates"] + cfg["big_cpu_rates"], ("naive", "project", "c"))

    def huge_room(self):
        cfg = self.cfg
        n = cfg["huge_clients"]
        names = ("project", "c") if n >= 5000 else ("naive", "project", "c")
        heading(f"huge room: {n:,} clients at {', '.join(map(str, cfg['huge_rates']))} msg/s"
                + ("; naive skipped: a thread per client and blocking sends under one lock "
                   "(bench.py --only scale measures it connected)" if "naive" not in names else ""))
        return self.rates_row("huge-room", n, cfg["huge_rates"], names)

    def overload(self, ladder):
        """2 x the project's capacity (else C's, else the lowest ladder step) for
        every relay, with time to deliver the backlog."""
        cfg = self.cfg
        base_name = "project" if ladder and ladder["capacity"]["project"] else "c" \
            if ladder and ladder["capacity"]["c"] else None
        base = ladder["capacity"][base_name] if base_name else min(cfg["ladder"])
        rate = int(cfg["overload_factor"] * base)
        heading(f"overload: {rate:,} msg/s = {cfg['overload_factor']:g} x "
                + (f"the {base_name} relay's capacity {base:,}" if base_name else f"the lowest ladder step {base:,}")
                + f", {cfg['clients']} clients")
        steps = [self.step("overload", name, cfg["clients"], rate, drain=cfg["drain"] + cfg["seconds"])
                 for name in ("naive", "project", "c")]
        out = {"rate": rate, "based_on": base_name or "lowest ladder step", "steps": {s["relay"]: brief(s) for s in steps}}
        project = next(s for s in steps if s["relay"] == "project")
        print(f"project at {rate:,} msg/s: {project['closed_by_relay']} of {cfg['clients']} clients closed "
              f"(slow consumer {project['project_drops']['slow_consumer']}, "
              f"memory budget {project['project_drops']['memory_budget']})", flush=True)
        return out

    def limits(self, ladder):
        """The project with its stranger limits at their defaults vs off, at
        light load and at its capacity. Per-host limits exempt loopback by
        default, so flood control is what shows: --max-rate 50 (burst 100)
        paces any sender above 50 msg/s."""
        cfg = self.cfg
        cap = ladder["capacity"]["project"] if ladder and ladder["capacity"]["project"] else 10000
        heading(f"stranger limits at their defaults vs off: project at {cfg['light_rate']:,} and {cap:,} msg/s "
                f"({cfg['senders']} senders: {cfg['light_rate'] / cfg['senders']:g} and "
                f"{cap / cfg['senders']:g} msg/s each)")
        out = {}
        for rate in (cfg["light_rate"], cap):
            pair = [self.step("limits", name, cfg["clients"], rate) for name in ("project", "project+limits")]
            out[str(rate)] = {s["relay"]: brief(s) for s in pair}
        print("limits on: flood control paces senders above 50 msg/s (--max-rate 50, --max-burst 100): "
              "their messages wait in TCP buffers, so latency grows; the relay drops none of them, and "
              "'loss' here is what it had not yet read when chatbench stopped waiting", flush=True)
        return out

    # --- helpers ---------------------------------------------------------------------

    def rates_row(self, row, clients, rates, names):
        out = {}
        for rate in rates:
            out[str(rate)] = {s["relay"]: brief(s) for s in (self.step(row, name, clients, rate) for name in names)}
            ratio_line(out[str(rate)], f"{rate:,} msg/s")
        return out

    def medians(self, steps, names):
        out = {}
        for name in names:
            mine = [s for s in steps if s["relay"] == name]
            out[name] = {"cpu_us_per_delivery": median([s["relay_cpu_us_per_delivery"] for s in mine]),
                         "p99_ms": median([s["latency_ms"]["p99"] for s in mine]),
                         "loss": max(s["loss"] for s in mine), "runs": len(mine)}
        ratio_line(out, "median")
        return out


def brief(step):
    return {"deliveries_per_s": step["deliveries_per_s"], "loss": step["loss"], "unattributed": step["unattributed"],
            "p99_ms": step["latency_ms"]["p99"], "cpu_us_per_delivery": step["relay_cpu_us_per_delivery"],
            "closed_by_relay": step["closed_by_relay"], "project_drops": step["project_drops"],
            "passed": step["passed"]}


def ratio_line(by_relay, what):
    """Adds project/c (and naive/c) CPU-per-delivery and p99 ratios; prints them."""
    c = by_relay.get("c") or {}
    for name in ("project", "naive"):
        mine = by_relay.get(name)
        if mine:
            mine["cpu_vs_c"] = ratio(mine["cpu_us_per_delivery"], c.get("cpu_us_per_delivery"))
            mine["p99_vs_c"] = ratio(mine["p99_ms"], c.get("p99_ms"))
    print(f"  {what}: CPU per delivery / c's: " + ", ".join(
        f"{name} {fmt(by_relay[name].get('cpu_vs_c'), '{:.2f}x')}" for name in ("project", "naive") if name in by_relay)
        + "; p99: " + ", ".join(f"{name} {fmt(v.get('p99_ms'))} ms" for name, v in by_relay.items()), flush=True)


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ms(value):
    return value if value >= 0 else None


def fmt(value, spec="{:.2f}"):
    return "-" if value is None else spec.format(value)


def heading(text):
    print(f"\n-- {text}", flush=True)
    print(HEADER, flush=True)


HEADER = (f"{'row':<10}{'relay':<15}{'clients':>8}{'offered/s':>10}{'deliv/s':>12}{'loss':>11}{'unattr':>11}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'cpu s':>7}{'us/deliv':>9}{'rss MiB':>8}{'closed':>7}"
          f"{'drops':>6}  ok")


def step_line(s):
    lat, drops = s["latency_ms"], s["project_drops"]
    return (f"{s['row']:<10}{s['relay']:<15}{s['clients']:>8,}{s['offered_rate']:>10,}{s['deliveries_per_s']:>12,.0f}"
            f"{s['loss']:>11,}{s['unattributed']:>11,}{fmt(lat['p50'], '{:.1f}'):>8}{fmt(lat['p99'], '{:.1f}'):>8}"
            f"{fmt(lat['max'], '{:.0f}'):>8}{s['relay_cpu_s']:>7.2f}{fmt(s['relay_cpu_us_per_delivery']):>9}"
            f"{fmt(s['relay_peak_rss_kib'] and s['relay_peak_rss_kib'] / 1024, '{:.1f}'):>8}"
            f"{s['closed_by_relay']:>7,}{(sum(drops.values()) if drops else '-'):>6}  "
            f"{'yes' if s['passed'] else 'NO'}")


def run_yardstick(run):
    """bench.py's --only yardstick: build the instruments, run the rows, store
    everything under result["yardstick"]. A missing instrument is one skip line."""
    args, cfg = run.args, run.yard_cfg
    command = shlex.join(["python", *sys.argv])
    print(f"\n== yardstick: the relays against a C relay, all driven by chatbench (C); anchors {args.anchors}")
    try:
        chatbench, c_relay = instruments(args.anchors, run.workdir)
    except RuntimeError as exc:
        print(f"yardstick: skipped: {exc}", flush=True)
        run.result["yardstick"] = {"skipped": str(exc), "command": command}
        return
    print(f"command: {command}", flush=True)
    yard = Yardstick(run, chatbench, c_relay)
    out = {"command": command, "anchors": str(args.anchors), "settings": cfg, "skipped": None,
           "fail_rule": f"loss > 0, unattributed > 0 or p99 > {FAIL_P99_MS:g} ms",
           "cpu_window": "relay user+system CPU from chatbench's first send to its last delivery"}
    started = time.monotonic()
    try:
        ladder = None
        for row in ROWS:
            if row not in cfg["rows"]:
                continue
            try:
                if row == "ladder":
                    out["ladder"] = ladder = yard.ladder()
                elif row == "overload":
                    out["overload"] = yard.overload(ladder)
                elif row == "limits":
                    out["limits"] = yard.limits(ladder)
                else:
                    out[row] = {"light": yard.light, "big-room": yard.big_room, "huge-room": yard.huge_room}[row]()
            except Exception as exc:  # noqa: BLE001 - report what this machine could not do, and go on
                out[row] = {"error": str(exc)}
                print(f"yardstick {row}: FAILED: {exc}", flush=True)
    finally:
        out["steps"] = yard.steps
        out["elapsed_s"] = round(time.monotonic() - started, 1)
        run.result["yardstick"] = out
    print(f"yardstick: {len(yard.steps)} steps in {out['elapsed_s']:.0f} s", flush=True)
