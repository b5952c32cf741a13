#!/usr/bin/env python3
"""reference_relay.py - a relay the benchmark driver cannot overload (calibration).

Before trusting a figure, bench.py runs its highest offered load against this
relay: if the driver reports loss or a high p99 here, the limit is the
driver's own, not the relay's. It is correct for the benchmark's traffic
(newline-terminated lines -> f"{port}: {line}\\n" to every other client) and
does per *byte* work in C only:

    * one thread, epoll, non-blocking sockets;
    * a read takes up to 256 KiB; its complete lines get their prefixes with
      one bytes.replace (b"\\n" -> b"\\n" + prefix), not a loop per message;
    * each recipient gets that whole buffer in one send (no 1024-byte limit:
      this is not an assignment relay, it is a measuring instrument).

Run:  python bench/reference_relay.py [--port 0]   (prints "Server listening on HOST:PORT")
"""

import argparse
import select
import signal
import socket
import sys


def serve(listener):
    poller = select.epoll()
    listener.setblocking(False)
    poller.register(listener.fileno(), select.EPOLLIN)
    clients = {}   # fd -> [sock, prefix, carry, outbuf, polling for EPOLLOUT]
    order = []     # fds in arrival order
    while True:
        for fd, event in poller.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        sock, addr = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    clients[sock.fileno()] = [sock, f"{addr[1]}: ".encode(), b"", bytearray(), False]
                    order.append(sock.fileno())
                    poller.register(sock.fileno(), select.EPOLLIN)
                continue
            client = clients.get(fd)
            if client is None:
                continue
            if event & select.EPOLLOUT:
                flush(poller, fd, client)
            if not event & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                data = client[0].recv(256 * 1024)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                client[0].close()
                del clients[fd]
                order.remove(fd)
                continue
            data = client[2] + data
            end = data.rfind(b"\n") + 1
            client[2] = data[end:]
            if not end:
                continue
            prefix = client[1]
            out = prefix + data[:end - 1].replace(b"\n", b"\n" + prefix) + b"\n"
            for other_fd in order:
                if other_fd != fd:
                    other = clients[other_fd]
                    if other[3]:
                        other[3] += out
                    else:
                        other[3] = bytearray(out)
                        flush(poller, other_fd, other)


def flush(poller, fd, client):
    sock, outbuf = client[0], client[3]
    try:
        sent = sock.send(outbuf)
    except BlockingIOError:
        sent = 0
    except OSError:
        outbuf.clear()
        return
    del outbuf[:sent]
    if bool(outbuf) != client[4]:  # (un)register for writability only on a change
        client[4] = bool(outbuf)
        try:
            poller.modify(fd, select.EPOLLIN | (select.EPOLLOUT if outbuf else 0))
        except OSError:
            pass


def main(argv=None):
    parser = argparse.ArgumentParser(description="Reference relay for calibrating the benchmark driver.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    listener = socket.create_server((args.host, args.port), backlog=1024)
    host, port = listener.getsockname()[:2]
    print(f"Server listening on {host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    serve(listener)


if __name__ == "__main__":
    sys.exit(main())
