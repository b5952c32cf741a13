#!/usr/bin/env python3
"""mychatclient.py - the chat client (CS158A, assignment 2).

Run:  python mychatclient.py [--host 127.0.0.1] [--port 12345]

Type a line and press Enter to send it; messages from the others appear as
they arrive, on their own lines, without disturbing what you are typing.
`exit`, Ctrl-D or Ctrl-C leaves the chat.

Three threads, each the only one to do its job, so that none of them can
hold up the others: the main thread reads what you type and queues it; a
sender thread is the only one to send on the socket; a receiver thread is the
only one to recv() and it prints. A busy room never blocks your typing, and a
server that stops reading blocks only the sender: you can still leave, and
Ctrl-C always ends the client within a second.

What goes on the wire, and why (measured on 28 classmates' servers):
    * each message as one write, "text\\n": our server and every classmate's
      server relay it, and a relay ending in a newline displays in every
      classmate's client; lines longer than one 1024-byte write are split
      between characters;
    * leaving sends a bare "exit" (no newline), the form 25 of 28 servers
      recognise, in its own write after a short pause, so a server that treats
      each recv() as one message reads it alone; then the client closes by
      itself, even if the server never does, and even if the server has
      stopped reading (what it has not taken then is dropped);
    * writes are spaced SEND_GAP apart (you will not notice when typing) so
      that fast piped input is not merged by servers that relay raw chunks.

Only the Python standard library is used.
"""

import _thread
import argparse
import codecs
import collections
import contextlib
import re
import select
import signal
import socket
import sys
import threading
import time

try:
    import readline  # line editing and history; redraws the line being typed
except ImportError:  # e.g. Windows without pyreadline
    readline = None
try:
    import termios
except ImportError:  # Windows
    termios = None

BUFSIZE = 1024  # the assignment's recv/send size: no write is longer than this
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
CONNECT_TIMEOUT = 10.0  # seconds; a server that does not answer is reported
SEND_GAP = 0.05   # seconds between writes, so raw-chunk servers read each alone
EXIT_GRACE = 0.5  # seconds to let the server close us after "exit"; after Ctrl-C, for all of leaving
STALL_LIMIT = 0.5  # seconds a write may wait, while leaving, before we stop waiting for the server
QUEUE_LIMIT = 200  # writes typed ahead of the sender (10 s of sending at SEND_GAP); more waits
EXIT_COMMAND = "exit"
MAX_UNFINISHED = 4096  # characters of a line without newline held before showing it anyway
# Once a server has ended a line with a newline, an unfinished line is
# probably cut by TCP, its rest on the way: wait this long for more before
# showing it as it is (servers that never send a newline: no wait).
REST_OF_LINE_WAIT = 0.2
WAKE_RETRY = 0.05  # seconds between SIGINTs to the main thread, see Interrupter

# Escape sequences, then every control character except TAB and newline:
# what a hostile server or client sends cannot drive this terminal.
# An unterminated string sequence stops at a newline: it must not swallow
# the messages that follow it in the same read.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"              # CSI
    r"|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?"  # OSC, ended by BEL or ST
    r"|\x1b[PX^_][^\x1b\n]*(?:\x1b\\)?"     # DCS, SOS, PM, APC strings
    r"|\x1b.?",                             # any other escape
    re.DOTALL,
)
# C0 but TAB and LF, DEL, C1; the line and paragraph separators U+2028/U+2029
# (a Unicode-aware reader of our output, like str.splitlines(), would start a
# new line there: "hi\u2028" + "12345: forged" would look like someone's
# message); the bidi controls, which can make text read in another order
# than it was sent (U+061C, U+200E/F, U+202A-E, U+2066-9). ZWJ (U+200D)
# stays: emoji sequences are built with it.
_CONTROL_CHARACTER = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def sanitize(text):
    """Remove terminal escape sequences and control characters (keep TAB, LF),
    line and paragraph separators and bidi controls."""
    return _CONTROL_CHARACTER.sub("", _ESCAPE_SEQUENCE.sub("", text))


def encode_message(text, limit=BUFSIZE):
    """The writes that send one typed line: "text\\n", each at most `limit`
    bytes, cut between characters if the line is longer than one write."""
    data = text.encode()
    writes = []
    while len(data) > limit - 1:
        cut = limit - 1
        while data[cut] & 0xC0 == 0x80:  # never cut inside a UTF-8 character
            cut -= 1
        writes.append(data[:cut] + b"\n")
        data = data[cut:]
    writes.append(data + b"\n")
    return writes


def is_exit(line):
    return line.strip().lower() == EXIT_COMMAND


class Display:
    """Prints incoming messages. On a terminal it first clears the line being
    typed, then redraws it after the messages, so typing is never clobbered."""

    def __init__(self, out=sys.stdout, interactive=False):
        self.out = out
        self.interactive = interactive and readline is not None
        self._lock = threading.Lock()

    def show(self, lines):
        with self._lock:
            if self.interactive:
                typed = readline.get_line_buffer()
                self.out.write("\r\x1b[K" + "\n".join(lines) + "\n" + typed)
            else:
                self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def say(self, line):
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()


class ChatClient:
    """A connection to a chat server: a sender thread that sends what is
    queued, paced, and a receiver thread that turns whatever arrives into
    display lines.

    Who does what: the main thread queues writes (send_line) and leaves
    (leave, close); the sender thread alone calls send on the socket; the
    receiver thread alone calls recv. The fields under `_changed` are shared
    by the main and sender threads; a wait for the sender never outlasts a
    leave request (Ctrl-C, or the server closing), see wake()."""

    def __init__(self, sock, display, leave_requested, on_server_closed):
        self.sock = sock
        self.display = display
        self.leave_requested = leave_requested  # an Event, set on Ctrl-C or when the server closed
        self.on_server_closed = on_server_closed
        self.leaving = False  # set by the main thread (under _changed); then nothing more is shown
        self.server_closed = threading.Event()  # the server ended the connection
        self._changed = threading.Condition()  # guards the six fields below
        self._writes = collections.deque()  # queued writes, at most QUEUE_LIMIT
        self._exit_requested = False  # once the queue is empty: "exit", SHUT_WR, stop
        self._closing = False  # stop now, send nothing more
        self._exit_sent = False
        self._sender_done = False
        self._write_started = None  # when the write under way began; None between writes
        self._receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)

    def start(self):
        self._receiver.start()
        self._sender.start()

    def send_line(self, text):
        """Main thread: queue the writes of one typed line. Waits while the
        queue is full; KeyboardInterrupt once a leave is requested."""
        for data in encode_message(text):
            with self._changed:
                self._wait(lambda: len(self._writes) < QUEUE_LIMIT or self._sender_done)
                if self._sender_done:
                    return  # the connection is gone; the receiver says so
                self._writes.append(data)
                self._changed.notify_all()

    def wake(self):
        """Any thread, once leave_requested is set: end the main thread's wait."""
        with self._changed:
            self._changed.notify_all()

    def _wait(self, ready, deadline=lambda: None, interruptible=True):
        """Main thread, holding _changed: wait until ready() (True) or the
        deadline (False). deadline() is read again at each wake-up: the
        sender notifies as each write starts and ends. If interruptible, a
        requested leave raises KeyboardInterrupt here: the check is made
        under the lock, and wake() notifies under it, so none is missed."""
        while not ready():
            if interruptible and self.leave_requested.is_set():
                raise KeyboardInterrupt
            limit = deadline()
            timeout = None if limit is None else limit - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            self._changed.wait(timeout)
        return True

    def _stall_deadline(self):
        """Holding _changed: when the write under way will have waited
        STALL_LIMIT (the server has stopped reading); None between writes."""
        return None if self._write_started is None else self._write_started + STALL_LIMIT

    def leave(self, at_once=False):
        """Main thread: send what is queued, then a bare "exit", then close,
        whether or not the server closes first. Bounded: it stops waiting
        once a write has waited STALL_LIMIT; what the server did not take is
        dropped. Ctrl-C interrupts it (KeyboardInterrupt).
        at_once (Ctrl-C): drop the queue, let the write under way finish and
        "exit" follow, and be done within EXIT_GRACE in all, uninterrupted."""
        started = time.monotonic()
        grace_ends = started + EXIT_GRACE
        with self._changed:
            self.leaving = True  # under the lock: _server_gone() reports a close or we leave, not both
            if at_once:
                self._writes.clear()
            self._exit_requested = True
            self._changed.notify_all()
            if at_once:
                self._wait(lambda: self._sender_done,
                           lambda: min(grace_ends, self._stall_deadline() or grace_ends),
                           interruptible=False)
            else:
                self._wait(lambda: self._sender_done, self._stall_deadline)
                grace_ends = time.monotonic() + EXIT_GRACE
            exit_sent = self._exit_sent
        if exit_sent:
            self._receiver.join(max(0.0, grace_ends - time.monotonic()))  # the server closes us
        self.close()

    def close(self):
        """Main thread: end both threads (shutdown wakes a recv() or a
        send() that waits) and close the socket."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        self._sender.join(EXIT_GRACE)
        self._receiver.join(EXIT_GRACE)
        self.sock.close()

    def _send_loop(self):
        last_write = 0.0
        try:
            while True:
                with self._changed:
                    while not self._writes and not self._exit_requested and not self._closing:
                        self._changed.wait()
                    if self._closing:
                        return
                    final = not self._writes
                    data = EXIT_COMMAND.encode() if final else self._writes.popleft()
                    self._changed.notify_all()  # room in the queue
                wait = last_write + SEND_GAP - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # pacing, see SEND_GAP
                with self._changed:
                    self._write_started = time.monotonic()
                    self._changed.notify_all()
                self.sock.sendall(data)  # waits while the server does not read
                last_write = time.monotonic()
                with self._changed:
                    self._write_started = None
                    self._exit_sent = final
                    self._changed.notify_all()
                if final:
                    self.sock.shutdown(socket.SHUT_WR)  # no more from us; the server sees EOF
                    return
        except OSError:
            self._server_gone()  # reset, or closed by close()
        finally:
            with self._changed:
                self._sender_done = True
                self._changed.notify_all()

    def _server_gone(self):
        """Sender or receiver: the connection ended, and we did not end it."""
        with self._changed:
            if self.leaving or self.server_closed.is_set():
                return
            self.server_closed.set()
        self.on_server_closed()

    def _receive_loop(self):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        rest_wait = 0.0  # REST_OF_LINE_WAIT once the server has sent a newline
        try:
            while True:
                data = self.sock.recv(BUFSIZE)
                if not data:
                    break
                text = partial + sanitize(decoder.decode(data))
                lines = text.split("\n")
                partial = lines.pop()
                if lines:
                    rest_wait = REST_OF_LINE_WAIT
                # Servers that send no newline end each relay with the write:
                # an unfinished line is complete once nothing more is waiting
                # (for a server that sends newlines: nothing within
                # REST_OF_LINE_WAIT), or once it is long (a line that never
                # ends still shows, in pieces, and costs bounded memory).
                if partial and (len(partial) >= MAX_UNFINISHED or not _readable_within(self.sock, rest_wait)):
                    lines.append(partial)
                    partial = ""
                lines = [line for line in lines if line.strip()]
                if lines and not self.leaving:
                    self.display.show(lines)
        except OSError:
            pass
        if partial.strip() and not self.leaving:
            self.display.show([partial])
        self._server_gone()


def _readable_within(sock, seconds):
    return bool(select.select([sock], [], [], seconds)[0])


def _seconds(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Chat client: type lines to send them to everyone else on the server; "
                    "'exit', Ctrl-D or Ctrl-C leaves.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="server port (default: %(default)s)")
    parser.add_argument("--connect-timeout", type=_seconds, default=CONNECT_TIMEOUT, metavar="SECONDS",
                        help="give up on a server that does not answer (default: %(default)s)")
    return parser.parse_args(argv)


class Interrupter:
    """Ends the input loop with KeyboardInterrupt, reliably, for Ctrl-C and for
    the receiver when the server closes: the client must not wait for Enter.

    Python runs a SIGINT handler only in the main thread, between bytecodes;
    in input(), readline waits in select(), which only a signal arriving
    during that select() interrupts. A SIGINT that lands while readline is
    busy with a keystroke (or in another thread) is not seen until the next
    key. So once a SIGINT has arrived (the wakeup fd says so) or the server
    has closed, SIGINT is sent to the main thread again and again until its
    handler has run (and see keep_typeahead(): a Ctrl-C that empties the
    terminal's input could leave readline waiting for a key, deaf to
    signals). The handler raises KeyboardInterrupt only inside
    interruptible() (connecting, reading a line), never while the client is
    already leaving. Elsewhere (waiting for the sender) the main thread
    checks leave_requested itself; on_leave_requested, called once the
    handler has run, wakes that wait."""

    def __init__(self):
        self.leave_requested = threading.Event()  # set by the handler, in the main thread
        self.on_leave_requested = lambda: None  # called by interrupt(), in the calling thread
        self._interruptible = False  # main thread only
        self._main = threading.main_thread().ident
        self._wakeup, wakeup_w = socket.socketpair()
        wakeup_w.setblocking(False)
        self._wakeup_w = wakeup_w  # kept open for the process's lifetime
        signal.set_wakeup_fd(wakeup_w.fileno(), warn_on_full_buffer=False)
        # Installed whatever was inherited: a shell starts background jobs with SIGINT ignored.
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch, name="sigint-watch", daemon=True).start()

    def _on_sigint(self, signum, frame):
        self.leave_requested.set()
        if self._interruptible:
            self._interruptible = False
            raise KeyboardInterrupt

    def _watch(self):
        while data := self._wakeup.recv(64):
            if signal.SIGINT in data:
                self.interrupt()

    def interrupt(self):
        """Any thread: make the main thread leave its input loop."""
        while not self.leave_requested.is_set():
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(self._main, signal.SIGINT)  # interrupts a blocked read
            else:  # Windows: seen once the main thread runs again
                _thread.interrupt_main()
            self.leave_requested.wait(WAKE_RETRY)
        self.on_leave_requested()

    @contextlib.contextmanager
    def interruptible(self):
        """Main thread: SIGINT raises KeyboardInterrupt in this block (at
        once, if one has come already)."""
        if self.leave_requested.is_set():
            raise KeyboardInterrupt
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


def read_line(interactive):
    """The next typed line, without its line ending; None at EOF (Ctrl-D)."""
    try:
        line = input() if interactive else sys.stdin.readline()
    except EOFError:
        return None
    if not interactive and not line:
        return None
    return line.rstrip("\r\n")


@contextlib.contextmanager
def keep_typeahead(stream):
    """While the client runs, Ctrl-C does not discard typed-ahead input (NOFLSH).

    Otherwise the terminal empties its input queue when Ctrl-C is pressed; if
    readline had just been told a key was waiting, it then waits for the next
    key inside its own read loop, which retries on every signal: Ctrl-C would
    not end the client until another key was pressed. The terminal's settings
    are restored on the way out."""
    if termios is None or not stream.isatty():  # Windows, or not a terminal
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    changed = list(saved)
    changed[3] |= termios.NOFLSH
    termios.tcsetattr(fd, termios.TCSANOW, changed)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def main(argv=None):
    args = parse_args(argv)
    sys.stdin.reconfigure(errors="replace")
    sys.stdout.reconfigure(errors="replace")
    interrupter = Interrupter()
    try:
        with interrupter.interruptible():
            sock = socket.create_connection((args.host, args.port), timeout=args.connect_timeout)
    except KeyboardInterrupt:  # Ctrl-C while a slow server is answering
        return 130
    except OSError as exc:
        print(f"Could not connect to {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)

    with keep_typeahead(sys.stdin):
        chat(sock, interrupter, interactive=sys.stdin.isatty())
    return 0


def chat(sock, interrupter, interactive):
    """Send typed lines and show the room's, until exit, Ctrl-D, Ctrl-C or the
    server closing; then leave."""
    display = Display(interactive=interactive)
    client = ChatClient(sock, display, interrupter.leave_requested, interrupter.interrupt)
    interrupter.on_leave_requested = client.wake
    print("Connected to chat server. Type 'exit' to leave.", flush=True)
    client.start()
    try:
        while True:
            with interrupter.interruptible():
                line = read_line(interactive)
            if line is None or is_exit(line):
                break
            if line.strip():
                client.send_line(line)
        client.leave()  # what was typed goes first, while the server takes it
    except KeyboardInterrupt:
        # Ctrl-C, or the receiver's wake-up when the server closed: the cursor
        # may be mid-line, after half-typed text. From here on SIGINT does
        # nothing: leaving at once is bounded; it finishes.
        if interactive:
            display.say("")
        if client.server_closed.is_set():
            client.close()
        else:
            client.leave(at_once=True)
    display.say("Disconnected from server")


if __name__ == "__main__":
    sys.exit(main())
