"""One bad client costs only itself; departed clients leave nothing behind."""

import socket
import threading

import pytest

from conftest import Peer, reset_on_close, wait_until
from reliability_helpers import process_usage


# The server runs as its own process here: a reader sharing the server's GIL
# is slower than the relay can flood it, which would measure the test itself.

@pytest.mark.timeout(60)
def test_client_that_never_reads_cannot_stall_a_5mb_flood(server_process):
    server = server_process("--quiet", "--max-rate", "0")  # the flood at full speed
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(server.address)  # and never reads
    flooder, reader = Peer(server.address), Peer(server.address)
    wait_until(lambda: sum("New connection" in line for line in server.lines) == 3)

    line = "f" * 990
    count = 5 * 1024 * 1024 // (len(line) + 1)
    expected = (f"{flooder.port}: {line}\n" * count).encode()
    sender = threading.Thread(target=flooder.send, args=((line + "\n").encode() * count,))
    sender.start()
    received = reader.read_until(lambda got: len(got) >= len(expected), timeout=30)
    sender.join(10)
    assert received == expected
    server.wait_for_line(f"Connection from ('127.0.0.1', {stuck.getsockname()[1]}) closed (slow_consumer)")
    # Nobody else was touched, and the room still works promptly.
    reader.send("still fine\n")
    flooder.expect(f"{reader.port}: still fine\n")
    for peer in (stuck, flooder, reader):
        peer.close()
    assert server.stop()[0] == 0


def test_other_clients_keep_chatting_while_one_is_stuck(server_process):
    server = server_process("--quiet", "--outbound-budget", "32768")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(server.address)
    a, b = Peer(server.address), Peer(server.address)
    wait_until(lambda: sum("New connection" in line for line in server.lines) == 3)
    # Messages one at a time, each waited for: the stuck client's socket and
    # then its 32 KiB budget fill up while b sees every message at once.
    for i in range(600):
        a.send(f"{i:03d} " + "x" * 500 + "\n")
        b.expect(f"{a.port}: {i:03d} {'x' * 500}\n")
    server.wait_for_line(f"Connection from ('127.0.0.1', {stuck.getsockname()[1]}) closed (slow_consumer)")
    for peer in (stuck, a, b):
        peer.close()
    assert server.stop()[0] == 0


def threads_and_fds(pid):
    """The server process's own thread and open-descriptor counts."""
    return process_usage(pid)[:2]


@pytest.mark.timeout(60)
def test_threads_and_descriptors_return_to_baseline_after_200_clients(server_process):
    server = server_process("--quiet")
    pid = server.proc.pid
    baseline = threads_and_fds(pid)
    steady = Peer(server.address)
    for round_ in range(4):
        batch = [Peer(server.address) for _ in range(50)]
        for i, peer in enumerate(batch):
            peer.send(f"r{round_} p{i}\n")
        total = sum(len(f"{p.port}: r{round_} p{i}\n") for i, p in enumerate(batch))
        # Some peers may send before the others are registered, so steady is
        # the one reader sure to be there for every message.
        steady.read_until(lambda got: len(got) >= total)
        steady.received = bytearray()
        for i, peer in enumerate(batch):
            if i % 3 == 0:
                peer.send("exit")
                peer.expect_closed()  # what it was sent meanwhile is discarded
            elif i % 3 == 1:  # reset instead of a clean close
                reset_on_close(peer.sock)
            peer.close()
    wait_until(lambda: threads_and_fds(pid)[0] == baseline[0] + 1, timeout=10,
               message="only the steady client's reader left")
    steady.close()
    wait_until(lambda: threads_and_fds(pid) == baseline, timeout=10,
               message=f"threads/fds back to {baseline}, now {threads_and_fds(pid)}")
    status, lines, err = server.stop()
    assert status == 0
    departures = [line for line in lines if " closed (" in line]
    assert len(departures) == 201
    assert sum(line.endswith("closed (exit)") for line in departures) == 4 * 17  # i % 3 == 0
