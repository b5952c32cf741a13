#!/usr/bin/env python3
"""fault_relay.py - a deliberately faulty chat relay, to prove the load test can fail.

Run:  python tests/fault_relay.py --port 0 --fault drop --every 200

Why this exists
    A load test that has only ever passed proves nothing: it might not look.
    This relay speaks the same wire as a2/mychatserver.py (newline-terminated
    messages in, f"{port}: {message}\\n" to every other client out, `exit`
    closes the connection) and gets it right except for one injected fault
    on every Nth delivery (one message to one recipient):

        drop       that delivery is never sent
        duplicate  it is sent twice
        reorder    it is held back and sent after the same sender's next
                   message to that recipient
        none       nothing: a correct relay, a baseline for the fixture itself

    tests/test_loadtest.py runs Locust against it and expects a non-zero exit
    naming the fault. Like the real server, it prints
    "Server listening on 127.0.0.1:PORT" first; SIGINT/SIGTERM stop it.

Deliberately simple: standard library only, a thread per client, and each
delivery written straight to the recipient's socket under that recipient's
lock, so every sender's messages reach each recipient in order (apart from
the injected fault). It is a test fixture for tens of clients, not a server.
"""

import argparse
import itertools
import signal
import socket
import sys
import threading

FAULTS = ("drop", "duplicate", "reorder", "none")


class Client:
    def __init__(self, sock, port):
        self.sock = sock
        self.port = port
        self.send_lock = threading.Lock()  # one writer at a time: frames never interleave

    def send(self, data):
        with self.send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # it is leaving; its own reader thread cleans up


class FaultRelay:
    def __init__(self, host, port, fault, every):
        self.listener = socket.create_server((host, port), backlog=128)
        self.address = self.listener.getsockname()[:2]
        self.fault = fault
        self.every = every
        self.lock = threading.Lock()  # guards clients, deliveries and held
        self.clients = []
        self.deliveries = itertools.count(1)
        # reorder: (sender port, recipient) -> the frame held back for that pair
        self.held = {}

    def serve_forever(self):
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError:
                return  # listener closed: shutting down
            client = Client(sock, address[1])
            with self.lock:
                self.clients.append(client)
            threading.Thread(target=self.read_loop, args=(client,), daemon=True).start()

    def read_loop(self, client):
        pending = b""
        try:
            while True:
                data = client.sock.recv(1024)
                if not data:
                    break
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    message = line.decode("utf-8", "replace").rstrip("\r")
                    if message.strip().lower() == "exit":
                        return
                    if message.strip():
                        self.relay(client, f"{client.port}: {message}\n".encode())
        except OSError:
            pass
        finally:
            self.remove(client)

    def relay(self, sender, frame):
        with self.lock:
            recipients = [c for c in self.clients if c is not sender]
        for recipient in recipients:
            for data in self.plan(sender, recipient, frame):
                recipient.send(data)

    def plan(self, sender, recipient, frame):
        """What to write to `recipient` for this one delivery (the fault goes here)."""
        key = (sender.port, recipient)
        with self.lock:
            held = self.held.pop(key, None)
            faulty = self.fault != "none" and next(self.deliveries) % self.every == 0
            if faulty and self.fault == "reorder" and held is None:
                self.held[key] = frame  # goes out after this sender's next message
                return []
        if held is not None:
            return [frame, held]  # the held one arrives after its successor
        if faulty and self.fault == "drop":
            return []
        if faulty and self.fault == "duplicate":
            return [frame, frame]
        return [frame]

    def remove(self, client):
        with self.lock:
            if client in self.clients:
                self.clients.remove(client)
            # A leaving sender's held frames are simply late now, not reordered.
            flush = [(key[1], frame) for key, frame in self.held.items() if key[0] == client.port]
            for key in [key for key in self.held if key[0] == client.port or key[1] is client]:
                del self.held[key]
        for recipient, frame in flush:
            recipient.send(frame)
        with client.send_lock:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.sock.close()

    def shutdown(self):
        self.listener.close()
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description="A chat relay that injects one delivery fault "
                                                 "every N deliveries (a load-test fixture).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--every", type=_positive_int, default=200, metavar="N",
                        help="inject the fault into every Nth delivery (default: %(default)s)")
    args = parser.parse_args(argv)
    relay = FaultRelay(args.host, args.port, args.fault, args.every)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print("Server listening on %s:%d" % relay.address, flush=True)
    try:
        relay.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        relay.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
