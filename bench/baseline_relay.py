#!/usr/bin/env python3
"""baseline_relay.py - the class-demo chat relay, the shape most classmates submit.

This is the benchmark's yardstick (bench/bench.py runs it side by side with
a2/mychatserver.py in the same run). It is deliberately NOT improved: it is
what shared/spec/peer-behaviour.md measured in 27 of 28 classmate servers.

    * one thread per client, started by the accept loop;
    * a shared list of client sockets guarded by one lock;
    * each recv(1024) chunk is one message: it is relayed raw, as
      f"{port}: ".encode() + chunk, to every other client by a loop of
      blocking send calls made WHILE HOLDING the list lock;
    * a chunk that is exactly "exit" removes the client.

So two messages that arrive together are relayed as one chunk with one
prefix, a message cut by a 1024-byte read gets two prefixes, and one client
that stops reading blocks every sender (they all wait for the lock).

Run:  python bench/baseline_relay.py [--host 127.0.0.1] [--port 0]
The first line printed is "Server listening on HOST:PORT" (as the project's).
"""

import argparse
import signal
import socket
import sys
import threading

clients = []                 # every connected client's socket
clients_lock = threading.Lock()


def handle_client(conn, port):
    """The per-client thread: read a chunk, relay it to everybody else."""
    while True:
        try:
            chunk = conn.recv(1024)
        except OSError:
            break
        if not chunk:
            break
        if chunk.decode(errors="replace") == "exit":
            break
        with clients_lock:
            for other in clients:
                if other is not conn:
                    try:
                        other.sendall(f"{port}: ".encode() + chunk)
                    except OSError:
                        pass
    with clients_lock:
        if conn in clients:
            clients.remove(conn)
    conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="The class-demo chat relay (benchmark baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12345)
    args = parser.parse_args(argv)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.host, args.port))
    server.listen(1024)  # the demo's listen(5) would only measure SYN retries at 10k clients
    host, port = server.getsockname()[:2]
    print(f"Server listening on {host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    while True:
        conn, addr = server.accept()
        with clients_lock:
            clients.append(conn)
        threading.Thread(target=handle_client, args=(conn, addr[1]), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
