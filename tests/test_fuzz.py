"""Live fuzz: hostile byte streams against a running server process while
steady clients chat. The steady clients must lose nothing, receive nothing
mis-attributed and nothing that could drive a terminal; the server must stay
up and stop cleanly.

The random parts are seeded: the seed is printed (shown on failure) and
CHAT_FUZZ_SEED=<n> replays a run.
"""

import collections
import os
import random
import socket
import threading

import pytest

from conftest import Peer, reset
from reliability_helpers import Drain, parse_frames
from test_properties import SPECIAL_TOKENS, feed_then_eof

STEADY = 3


def line_mode_messages(data):
    """What the server relays for a stream that starts with a newline (so the
    sender is a line client from its first byte: read boundaries cannot
    matter) and ends with a clean close: the framer's output for it whole."""
    assert data.startswith(b"\n")
    messages, exit_requested = feed_then_eof([data])
    assert not exit_requested
    return messages


def token_stream(rng, size):
    parts, total = [], 0
    while total < size:
        kind = rng.random()
        if kind < 0.5:
            part = rng.choice(SPECIAL_TOKENS)
        elif kind < 0.8:
            part = rng.randbytes(rng.randint(1, 60))
        else:
            part = "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 40))).encode(
                errors="replace")
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def send_in_random_writes(sock, data, rng, largest=4096):
    position = 0
    while position < len(data):
        size = rng.choice([1, 2, 3, 7, 100, 1023, 1024, 1025, largest])
        sock.sendall(data[position:position + size])
        position += size


class Hostile:
    """One misbehaving client: `act(sock)` runs in a thread; incoming relays
    are drained (unless it is the client that never reads)."""

    def __init__(self, name, address, act, *, expect=None, concat=None, drain=True, rcvbuf=None):
        self.name = name
        self.expect = expect    # the exact messages every steady client must get from it
        self.concat = concat    # or: their exact concatenation (raw bursts split anywhere)
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.drain = Drain(sock, keep=False) if drain else None
        self.error = None
        self._act = act
        self.thread = threading.Thread(target=self._run, name=f"hostile-{name}", daemon=True)

    def _run(self):
        try:
            self._act(self.sock)
        except OSError as exc:  # e.g. dropped as a slow consumer mid-send
            self.error = exc

    def finish(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), f"hostile {self.name} still sending"
        if self.drain is not None:
            self.drain.close()
        else:
            self.sock.close()


@pytest.mark.timeout(90)
def test_hostile_streams_cannot_disturb_steady_clients(server_process):
    seed = int(os.environ.get("CHAT_FUZZ_SEED", random.randrange(2**32)))
    print(f"fuzz seed {seed} (CHAT_FUZZ_SEED={seed} replays it)")
    rng = random.Random(seed)
    # Flood control off: the hostile streams are read at full speed (with it
    # on they would only take longer; test_strangers.py tests it).
    server = server_process("--quiet", "--max-rate", "0")

    steady = [Drain.connect(server.address) for _ in range(STEADY)]
    idle = Drain.connect(server.address)  # connects and never says a word
    receivers = steady + [idle]
    server.wait_for_count("New connection", len(receivers))
    # Each steady client says hello (repeated until everyone has it: the
    # server logs a connection just before registering it).
    for sender in steady:
        hello = b"hello\n"
        for _ in range(20):
            sender.send(hello)
            try:
                for receiver in receivers:
                    if receiver is not sender:
                        receiver.wait(lambda got, p=sender.port: f"{p}: hello\n".encode() in got,
                                      timeout=0.5)
                break
            except AssertionError:
                continue

    # --- the hostile clients -------------------------------------------------
    H = {}
    address = server.address
    megabyte = b"H" * (1 << 20)
    H["megabyte_one_write_no_newline"] = Hostile(
        "megabyte", address, lambda s: (s.sendall(megabyte), s.shutdown(socket.SHUT_WR)),
        concat="H" * (1 << 20))
    nul = b"\n" + b"\x00" * 200_000 + b"nul-end\n" + b"\x00\x00mid\x00dle\x00\n"
    H["nul_bytes"] = Hostile("nul", address, lambda s: (s.sendall(nul), s.shutdown(socket.SHUT_WR)),
                             expect=["nul-end", "middle"])
    invalid = b"\n" + bytes(rng.randint(0x80, 0xFF) for _ in range(100_000)) + b"\nok\xff\xc3(\n"
    H["invalid_utf8"] = Hostile(
        "invalid", address, lambda s: (send_in_random_writes(s, invalid, rng), s.shutdown(socket.SHUT_WR)),
        expect=line_mode_messages(invalid))
    escapes = b"\n" + token_stream(random.Random(rng.random()), 100_000) + b"\n"
    H["escape_sequences"] = Hostile(
        "escapes", address, lambda s: (send_in_random_writes(s, escapes, rng), s.shutdown(socket.SHUT_WR)),
        expect=line_mode_messages(escapes))
    lone_cr = b"abc\rdef\r" * 20_000
    H["lone_cr_raw"] = Hostile(
        "lone_cr", address, lambda s: (send_in_random_writes(s, lone_cr, rng), s.shutdown(socket.SHUT_WR)),
        concat="abcdef" * 20_000)
    one_byte = b"one-byte-writes:" + "".join(str(i % 10) for i in range(1500)).encode()

    def one_byte_writes(sock):
        for i in range(len(one_byte)):
            sock.sendall(one_byte[i:i + 1])
        for byte in b"\nline mode now\n":
            sock.sendall(bytes([byte]))
        sock.shutdown(socket.SHUT_WR)

    H["one_byte_writes"] = Hostile("one_byte", address, one_byte_writes,
                                   concat=one_byte.decode() + "line mode now")
    forged = b"\n" + b"".join(f"{r.port}: steady 0 00000\n\r{r.port}: hello\n".encode() for r in steady)
    H["forger"] = Hostile("forger", address, lambda s: (s.sendall(forged), s.shutdown(socket.SHUT_WR)),
                          expect=line_mode_messages(forged))
    H["exit_then_junk"] = Hostile(
        "exit_junk", address, lambda s: s.sendall(b"\nbefore-exit\nexit\nJUNK AFTER EXIT\n"),
        expect=["before-exit"])
    H["half_close"] = Hostile(
        "half_close", address, lambda s: (s.sendall(b"\nhalf-closed tail"), s.shutdown(socket.SHUT_WR)),
        expect=["half-closed tail"])
    H["reset_mid_line"] = Hostile(
        "reset", address, lambda s: (s.sendall(b"\nwhole line\npartial line, never fini"), reset(s)))
    for i in range(6):
        stream = token_stream(random.Random(rng.random()), 60_000)
        ending = rng.choice(["fin", "rst"])

        def random_stream(sock, stream=stream, ending=ending, r=random.Random(rng.random())):
            send_in_random_writes(sock, stream, r)
            if ending == "fin":
                sock.shutdown(socket.SHUT_WR)
            else:
                reset(sock)

        H[f"random_{i}_{ending}"] = Hostile(f"random{i}", address, random_stream)
    H["never_reads"] = Hostile("never_reads", address, lambda s: None, drain=False, rcvbuf=4096)
    hostiles = list(H.values())
    server.wait_for_count("New connection", len(receivers) + len(hostiles))

    # --- steady chat during the attack ---------------------------------------
    attack_over = threading.Event()
    sent = {s.port: [] for s in steady}

    def chat(client, index):
        r = random.Random(seed + index)
        n = 0
        while not attack_over.is_set() or n < 300:
            batch = []
            for _ in range(r.choice([1, 1, 1, 2, 5])):
                text = f"steady {index} {n:05d} " + "x" * r.randint(0, 80)
                sent[client.port].append(text)
                batch.append(text + "\n")
                n += 1
            data = "".join(batch).encode()
            cut = r.randint(0, len(data))  # a line sometimes split across two writes
            client.send(data[:cut])
            client.send(data[cut:])
            attack_over.wait(0.003)  # pacing, not synchronisation

    chatters = [threading.Thread(target=chat, args=(c, i), daemon=True) for i, c in enumerate(steady)]
    for thread in chatters + [h.thread for h in hostiles]:
        thread.start()
    for hostile in hostiles:
        hostile.thread.join(60)
    attack_over.set()
    for thread in chatters:
        thread.join(30)

    # Every hostile that ended its stream has been read to the end by the
    # server (it logs the close after relaying the last byte) ...
    for hostile in hostiles:
        if hostile is not H["never_reads"]:
            server.wait_for_count(f"Connection from ('127.0.0.1', {hostile.port}) closed (", 1, timeout=30)
    # ... the client that never read has been dropped, and nobody else ...
    assert server.count(f"('127.0.0.1', {H['never_reads'].port}) closed (slow_consumer)") == 1
    for receiver in receivers:
        assert server.count(f"('127.0.0.1', {receiver.port}) closed") == 0
    # ... so a fence from each steady client arrives after everything else.
    for sender in steady:
        sender.send(b"fence\n")
    for receiver in receivers:
        for sender in steady:
            if sender is not receiver:
                receiver.wait(lambda got, p=sender.port: f"{p}: fence\n".encode() in got, timeout=30,
                              message=f"fence from {sender.port}")

    # --- what each well-behaved client received -------------------------------
    known = {c.port for c in receivers} | {h.port for h in hostiles}
    for receiver in receivers:
        by_port = collections.defaultdict(list)
        frames = parse_frames(receiver.data(), receiver.port)
        for port, text in frames:
            assert port in known, f"frame from unknown port {port}"
            by_port[port].append(text)
        print(f"receiver {receiver.port}: {len(receiver.data())} bytes, {len(frames)} frames, "
              + ", ".join(f"{name} {len(by_port[h.port])}" for name, h in H.items()))
        for sender in steady:
            if sender is receiver:
                continue
            got = by_port[sender.port]
            while got and got[0] == "hello":
                got.pop(0)  # the hello was repeated until everyone had it
            assert got == sent[sender.port] + ["fence"], (
                f"{receiver.port} from {sender.port}: {len(got)} messages, "
                f"{len(sent[sender.port]) + 1} sent")
        for name, hostile in H.items():
            got = by_port[hostile.port]
            if hostile.expect is not None:
                assert got == hostile.expect, name
            if hostile.concat is not None:
                assert "".join(got) == hostile.concat, name
        if receiver is not idle:
            assert by_port[idle.port] == []

    # The server is still up and serving: a newcomer chats both ways.
    newcomer = Peer(server.address)
    server.wait_for_count(f"New connection from ('127.0.0.1', {newcomer.port})", 1)
    newcomer.send("after the storm\n")
    for receiver in receivers:
        receiver.wait(lambda got: f"{newcomer.port}: after the storm\n".encode() in got)
    steady[0].send("welcome\n")
    newcomer.expect(f"{steady[0].port}: welcome\n")

    for hostile in hostiles:
        hostile.finish()
    for client in receivers:
        client.close()
    newcomer.close()
    status, lines, err = server.stop()
    assert status == 0
    assert "Traceback" not in err
    assert lines[-1] == "Server stopped"
