"""A chat server written the way most classmates wrote theirs (measured in
shared/spec/peer-behaviour.md): one thread per client, each recv(1024) chunk is
one message, relayed raw as f"{port}: {chunk}" with no newline, and only a
chunk that is exactly "exit" ends the session. Used to prove our client works
with a server that is not ours."""

import threading

from conftest import hang_up
from reliability_helpers import ScriptedServer


class ClassmateServer(ScriptedServer):
    def __init__(self, close_on_exit=True, greeting=None):
        self.close_on_exit = close_on_exit  # 11 of 28 never close a leaving client
        self.greeting = greeting  # bytes sent to each client on connect (hostile tests)
        self.clients = []
        self.chunks = []  # (port, bytes) for every recv(1024), in order
        self.exited = []  # ports that sent exactly "exit"
        self.lock = threading.Lock()
        self.connected = threading.Condition(self.lock)
        super().__init__(self._handle)

    def _handle(self, conn):
        port = conn.getpeername()[1]
        with self.lock:
            self.clients.append(conn)
            self.connected.notify_all()
        if self.greeting:
            conn.sendall(self.greeting)
        while True:
            try:
                chunk = conn.recv(1024)
            except OSError:
                break
            if not chunk:
                break
            with self.lock:
                self.chunks.append((port, chunk))
            if chunk.decode(errors="replace") == "exit":
                with self.lock:
                    self.exited.append(port)
                    if conn in self.clients:
                        self.clients.remove(conn)
                if self.close_on_exit:
                    conn.close()
                    return
                continue
            with self.lock:
                others = [c for c in self.clients if c is not conn]
            for other in others:
                try:
                    other.sendall(f"{port}: ".encode() + chunk)
                except OSError:
                    pass
        with self.lock:
            if conn in self.clients:
                self.clients.remove(conn)
        conn.close()

    def wait_for_clients(self, n, timeout=5):
        with self.lock:
            assert self.connected.wait_for(lambda: len(self.clients) >= n, timeout), "clients"

    def disconnect_everyone(self):
        with self.lock:
            clients, self.clients = list(self.clients), []
        for conn in clients:
            hang_up(conn)
