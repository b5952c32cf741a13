#!/usr/bin/env python3
"""One command, a local cluster: redis-server and N relay nodes on loopback.

    python cluster/demo.py                  # Redis on a free port, nodes on 12345, 12346, 12347
    python cluster/demo.py --nodes 2 --base-port 13000 --redis-port 6379

Then connect clients to any node (python a2/mychatclient.py --port 12346):
they all share one room. Ctrl-C (or SIGTERM) stops every node, then Redis,
and removes Redis's data. It exists so that a user sees the cluster work
before reading how (cluster/README.md); it owns its child processes and
nothing else. Needs Debian's redis-server and the project's .venv (./run-tests creates it).
"""

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from cluster.local import LOOPBACK, Node, RedisServer, stop_all  # noqa: E402

log = logging.getLogger("cluster.demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Start redis-server and N chat relay nodes sharing one room on 127.0.0.1; "
                    "Ctrl-C stops them all.")
    parser.add_argument("--nodes", type=int, default=3, metavar="N",
                        help="how many relay nodes (default: %(default)s)")
    parser.add_argument("--base-port", type=int, default=12345, metavar="PORT",
                        help="the first node's chat port; the others follow (default: %(default)s)")
    parser.add_argument("--redis-port", type=int, default=0, metavar="PORT",
                        help="redis-server's port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--no-aof", action="store_true",
                        help="run Redis without persistence (default: AOF, fsync every second)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every relayed message in the nodes' output (default: --quiet nodes)")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 32:
        parser.error("--nodes must be 1-32")
    if not 1 <= args.base_port <= 65535 - args.nodes + 1:
        parser.error("--base-port must leave room for every node's port")
    if not 0 <= args.redis_port <= 65535:
        parser.error("--redis-port must be 0-65535")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        redis_server = RedisServer(port=args.redis_port or None, appendonly=not args.no_aof)
        redis_server.start()
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"Cannot start redis-server: {exc}", file=sys.stderr)
        return 1
    log.info("Redis on %s:%d (pid %d, %s, data in %s)", LOOPBACK, redis_server.port,
             redis_server.proc.pid, "no persistence" if args.no_aof else "AOF", redis_server.directory)
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def echo_as(port):
        return lambda node, line: print(f"[node {port}] {line}", flush=True)

    nodes = []
    try:
        for port in range(args.base_port, args.base_port + args.nodes):
            nodes.append(Node(redis_server.url(), port=port, echo=echo_as(port),
                              args=() if args.verbose else ("--quiet",)))
    except RuntimeError as exc:
        print(f"Cannot start the nodes: {exc}", file=sys.stderr)
        stop_all(nodes, redis_server)
        return 1
    for node in nodes:
        log.info("node on %s:%d: pid %d", *node.address, node.proc.pid)
    ports = ", ".join(str(node.address[1]) for node in nodes)
    log.info("%d nodes sharing one room on %s ports %s. Connect with:", len(nodes), LOOPBACK, ports)
    log.info("    python a2/mychatclient.py --port %d", nodes[0].address[1])
    log.info("Ctrl-C stops them all.")
    while not stopping.wait(0.5):  # also notice a node or Redis that died
        dead = [node for node in nodes if node.proc.poll() is not None]
        if dead or redis_server.proc.poll() is not None:
            log.warning("A process exited (%s); stopping the rest",
                        ", ".join(f"node {n.address[1]}" for n in dead) or "redis-server")
            break
    log.info("Stopping %d nodes and Redis", len(nodes))
    stop_all(nodes, redis_server)
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
