"""The chat client as a test drives it: in a pseudo-terminal (as a person
uses it, with Ctrl-C and Ctrl-D) or with piped stdin and stdout (as a script
does). conftest's terminal_clients and piped_clients fixtures start them and
kill whatever a test leaves running."""

import fcntl
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time

from conftest import CLIENT_SCRIPT, wait_until

CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def screen_lines(raw):
    """What a terminal shows, roughly: escape sequences dropped, \\r\\n lines."""
    text = CSI.sub("", raw.decode(errors="replace"))
    return [line.split("\r")[-1] for line in text.split("\r\n")]


def assert_exits(client, status=0, within=1.0, timeout=5):
    """The client (either driver) exits with `status`, within `within` seconds
    from now: call it right after whatever should end it."""
    started = time.monotonic()
    assert client.wait_exit(timeout=timeout) == status
    assert time.monotonic() - started < within


class TerminalClient:
    """The client in a pseudo-terminal that is its controlling terminal, so
    typed Ctrl-C and Ctrl-D work exactly as for a person at a keyboard.
    With sigint_ignored=True it starts with SIGINT ignored, as a job started
    in the background by a non-interactive shell (or under nohup) does."""

    def __init__(self, address, sigint_ignored=False):
        master, slave = pty.openpty()
        self.master = master
        self.initial_modes = termios.tcgetattr(master)
        self.final_modes = None  # the terminal's settings once the client has exited

        def as_controlling_terminal():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if sigint_ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited across exec

        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT_SCRIPT), "--host", address[0], "--port", str(address[1])],
            stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True,
            preexec_fn=as_controlling_terminal,
            env={**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        self.output = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the client exited and the terminal closed
                return
            if not data:
                return
            with self._lock:
                self.output += data

    def type(self, keys):
        """Type at the keyboard once the client is reading it, as a person
        would after seeing the screen (readline turns the terminal's own echo
        off while it reads; keys typed earlier would be echoed twice)."""
        wait_until(lambda: not termios.tcgetattr(self.master)[3] & termios.ECHO,
                   message="client waiting for input")
        os.write(self.master, keys.encode())

    def text(self):
        with self._lock:
            return self.output.decode(errors="replace")

    def wait_for(self, text, timeout=5):
        wait_until(lambda: text in CSI.sub("", self.text()), timeout, message=f"client to show {text!r}")

    def wait_exit(self, timeout=5):
        status = self.proc.wait(timeout)
        self._reader.join(5)
        self.final_modes = termios.tcgetattr(self.master)
        self._close_terminal()
        return status

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._close_terminal()

    def _close_terminal(self):
        if self.master is not None:
            os.close(self.master)
            self.master = None


class PipedClient:
    """The client with stdin and stdout as pipes; stdin stays open (a script
    still typing) until the test closes it. Output is collected as it comes."""

    def __init__(self, address, *options):
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT_SCRIPT), "--host", address[0], "--port", str(address[1]), *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._collect, args=(stream, buffer), daemon=True)
                         for stream, buffer in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, buffer):
        while chunk := stream.read1(65536):
            with self._lock:
                buffer += chunk

    def output(self):
        with self._lock:
            return bytes(self.out)

    def wait_for(self, text, timeout=5):
        wait_until(lambda: text.encode() in self.output(), timeout, message=f"client output {text!r}")

    def type(self, line):
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout):
        """Exit status; fails (and kills the client) if it does not exit in time."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"client still running after {timeout}s; output ends "
                                 f"{self.output()[-200:]!r}")
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass  # stdin: the client is gone (broken pipe)
