"""chatusers.py - Locust users that chat over raw TCP and check every delivery.

Run:  locust -f loadtest/chatusers.py                     (web UI, relay 127.0.0.1:12345)
      locust -f loadtest/chatusers.py --headless -u 50 -r 10 -t 30s --host tcp://127.0.0.1:12345

Why this exists
    The relay's promise is "everything one client sends reaches every other
    connected client, once, in order, as PORT: message". Under load that is
    hard to see by eye, so each simulated user stamps its messages with a
    token (sender, sequence number, port, send time; see chatwire.py) and
    every receiver checks what arrives. A run either proves delivery or fails
    with Locust failures that name the fault (lost message, duplicate
    message, reordered message, bad frame, wrong port, unexpected disconnect)
    and a non-zero exit code, so a --headless run is a pass/fail CI check.

Shape (after locust/contrib/socketio.py and mqtt.py)
    ChatClient   one TCP connection: gevent socket, a receiver greenlet that
                 parses every line, and Locust request events for connect,
                 send, exit and each received broadcast (its latency).
    ChatUser     abstract User owning a ChatClient: connects in on_start,
                 leaves with `exit` in on_stop (idempotent).
    ChatRoomUser the concrete user: sends a message per task, and sometimes
                 leaves and comes back (churn).
    The pure logic - token, frame parsing, loss accounting, the summary - is
    in chatwire.py, which imports neither locust nor gevent.

Statistics across processes
    Each process counts into one RunTally. Workers send what they counted
    with every stats report (events.report_to_master); the master adds it up
    (events.worker_report) and, like a single process, prints the summary
    and sets the exit code when Locust quits (events.quitting).
"""

import itertools
import logging
import os
import random
import secrets
import sys
import time
from pathlib import Path

import gevent
from gevent import socket
from gevent.event import Event
from locust import User, events, task
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chatwire sits next to this file
import chatwire  # noqa: E402  (after the path fix-up above)
from chatwire import (  # noqa: E402
    DeliveryLedger, EchoedMessage, LostMessage, MalformedFrame, RunTally,
    UnexpectedDisconnect, WrongPort,
)

log = logging.getLogger("chatusers")

REQUEST_TYPE = "CHAT"  # the "Type" column of Locust's tables for every row we report

CONNECT_TIMEOUT = 5.0  # seconds for TCP connect; a relay slower than that is failing
SOCKET_TIMEOUT = 10.0  # seconds a single send may block (the relay stopped reading)
EXIT_TIMEOUT = 2.0     # seconds the relay has to close the connection after `exit`
RECV_SIZE = 65536
FAULT_DETAILS_LOGGED = 20  # per process: enough to diagnose, not a flood

# Defaults of the command-line options below. Floats stay floats, because the
# web UI converts what is typed into the type of the default.
DEFAULT_MESSAGE_SIZE = 64
DEFAULT_WAIT = 0.5
DEFAULT_CHURN = 0.02
DEFAULT_LATENCY_TARGET = 0.0

# Everything this process counted (workers forward it to the master).
tally = RunTally()
_faults_logged = 0


# --- options, through Locust's own parser (so the web UI shows them too) ------------

@events.init_command_line_parser.add_listener
def add_chat_options(parser):
    parser.add_argument("--chat-message-size", type=int, default=DEFAULT_MESSAGE_SIZE, metavar="CHARS",
                        help="characters per chat message, token included "
                             f"(at most {chatwire.MAX_MESSAGE_CHARS}, so the relay never splits one)")
    parser.add_argument("--chat-wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help="mean seconds between one user's messages (each wait is uniform "
                             "in 0.5x..1.5x of it); users / this = messages per second")
    parser.add_argument("--chat-churn", type=float, default=DEFAULT_CHURN, metavar="P",
                        help="probability, per task, that a user leaves (exit) and comes back")
    parser.add_argument("--chat-latency-target", type=float, default=DEFAULT_LATENCY_TARGET, metavar="MS",
                        help="fail the run if the broadcast p99 latency is above this many "
                             "milliseconds (0 = no target)")
    # This project runs on loopback: Locust's own listeners (web UI, the
    # master's worker port) follow suit unless told otherwise on the command line.
    parser.set_defaults(web_host="127.0.0.1", master_bind_host="127.0.0.1")


def chat_option(environment, name, default):
    """An option's value; `default` when Locust runs without a parsed command
    line (e.g. an Environment built in a script)."""
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


# --- identities ------------------------------------------------------------------------

_process_tag = None
_process_tag_pid = None
_connection_numbers = itertools.count(1)


def new_sender_id():
    """A name for one connection, unique across processes and machines: a
    random tag per process plus a counter. The tag is drawn lazily, in the
    process itself: --processes forks after importing this file, and the
    children must not share the parent's tag."""
    global _process_tag, _process_tag_pid
    if _process_tag_pid != os.getpid():
        _process_tag, _process_tag_pid = secrets.token_hex(4), os.getpid()
    return f"{_process_tag}.{next(_connection_numbers)}"


# --- one connection --------------------------------------------------------------------

class ChatClient:
    """One TCP connection to the relay, as one chat client.

    The user's greenlet calls open(), send_message() and leave(); a receiver
    greenlet is the only reader of the socket. Every outcome is a Locust
    request event (request_type CHAT): connect, send, exit, broadcast (one
    per message received, its response time the send-to-receipt latency),
    and a failure row per fault, named after it.
    """

    def __init__(self, environment, address):
        self.environment = environment
        self.address = address
        self.sender = new_sender_id()
        self.sock = None
        self.port = None
        self.seq = 0
        self.ledger = DeliveryLedger(tally)
        self.receiver = None
        self.closed = Event()  # set by the receiver when the connection has ended
        self.leaving = False   # we sent `exit` (or are tearing down): a close is expected
        self.finished = False

    # Locust events ---------------------------------------------------------------

    def fire(self, name, started=None, response_time=None, length=0, exception=None):
        if response_time is None:
            response_time = (time.perf_counter() - started) * 1000 if started is not None else 0
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE, name=name, response_time=response_time,
            response_length=length, exception=exception, context={"sender": self.sender},
        )

    def fault(self, exception, count=1):
        """Report `count` occurrences of a delivery fault as Locust failures."""
        global _faults_logged
        if _faults_logged < FAULT_DETAILS_LOGGED:
            _faults_logged += 1
            log.warning("%s: %s (receiver %s, port %s): %s", exception.request_name, exception,
                        self.sender, self.port, exception.detail)
            if _faults_logged == FAULT_DETAILS_LOGGED:
                log.warning("further delivery faults in this process are counted but not logged")
        for _ in range(count):
            self.fire(exception.request_name, exception=exception)

    # lifecycle ----------------------------------------------------------------------

    def open(self):
        """Connect and start receiving. Raises OSError (after reporting a
        `connect` failure) when the relay cannot be reached."""
        started = time.perf_counter()
        try:
            self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT)
            self.sock.settimeout(SOCKET_TIMEOUT)
            # Each message is one small write that should leave at once, not
            # wait for the previous one's ACK (Nagle): it would add up to the
            # peer's delayed-ACK time (~40 ms) to the measured latency.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.port = self.sock.getsockname()[1]  # what the relay will prefix us with
        except OSError as exc:
            self.fire("connect", started, exception=exc)
            self.close()
            raise
        self.fire("connect", started)
        self.receiver = gevent.spawn(self._receive)

    @property
    def connected(self):
        return self.sock is not None and not self.closed.is_set() and not self.leaving

    def send_message(self, size):
        """Send one stamped message. Returns False if the connection failed."""
        self.seq += 1
        message = chatwire.format_message(self.sender, self.seq, self.port, time.time(), size)
        data = message.encode() + b"\n"
        started = time.perf_counter()
        try:
            interrupted = self._send_whole(data)
        except OSError as exc:
            self.fire("send", started, length=len(data), exception=exc)
            return False
        tally.add("sent")
        self.fire("send", started, length=len(data))
        if interrupted is not None:
            raise interrupted  # the user is being stopped: go on with that now
        return True

    def _send_whole(self, data):
        """sendall() that a Locust kill cannot cut in half.

        Stopping a user raises GreenletExit wherever it waits. If that were
        in the middle of a line, the `exit` sent next would be glued to half
        a message, and every other user would receive a garbled token: a
        false "bad frame". So the line is finished first (bounded by the
        socket timeout), and the GreenletExit is returned for the caller to
        re-raise once it has counted the message."""
        view = memoryview(data)
        interrupted = None
        while view:
            try:
                view = view[self.sock.send(view):]
            except gevent.GreenletExit as exc:
                interrupted = exc
        return interrupted

    def leave(self):
        """Send `exit`, check the relay closes the connection, clean up.
        Idempotent; safe after a failed or partial open()."""
        if self.finished:
            return
        try:
            if self.sock is not None and not self.closed.is_set() and not self.leaving:
                self.leaving = True
                started = time.perf_counter()
                try:
                    interrupted = self._send_whole(b"exit\n")
                except OSError as exc:
                    self.fire("exit", started, exception=exc)
                else:
                    if interrupted is not None:
                        raise interrupted  # stopped mid-exit: close() below tidies up
                    if self.closed.wait(EXIT_TIMEOUT):
                        self.fire("exit", started)
                    else:
                        self.fire("exit", started, exception=TimeoutError(
                            f"the relay did not close the connection within {EXIT_TIMEOUT:g}s of 'exit'"))
        finally:
            self.close()

    def close(self):
        """Tear down without the exit handshake (idempotent). What this
        receiver still misses from any sender is now lost (see DeliveryLedger)."""
        if self.finished:
            return
        self.finished = True
        self.leaving = True  # from here on, the socket closing is our own doing
        if self.receiver is not None:
            self.receiver.kill(block=False)
        if self.sock is not None:
            self.sock.close()
        missing = self.ledger.describe_pending()
        lost = self.ledger.close()
        if lost:
            self.fault(LostMessage(f"{lost} message(s) still missing when the connection closed "
                                   f"(sender: seqs) {missing}"), count=lost)

    # receiving ------------------------------------------------------------------------

    def _receive(self):
        """The only reader of the socket: runs until the connection ends."""
        pending = b""
        error = None
        crashed = False
        try:
            while True:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    break
                lines, pending = chatwire.split_lines(pending, data)
                for line in lines:
                    self._on_line(line)
        except OSError as exc:
            error = exc
        except gevent.GreenletExit:
            pass  # close() kills us
        except Exception as exc:  # a bug here must not go unnoticed as "nothing arrived"
            crashed = True
            log.exception("receiver of %s failed", self.sender)
            self.fire("receiver error", exception=exc)
        finally:
            # A frame cut short is only a fault while we are not leaving: the
            # relay may close a leaving client in the middle of a send.
            if not self.leaving and not crashed:
                detail = f"{type(error).__name__}: {error}" if error else "connection closed"
                if pending:
                    detail += f", after a partial frame {chatwire.shorten(pending)!r}"
                tally.add("unexpected_disconnect")
                self.fault(UnexpectedDisconnect(detail))
            self.closed.set()

    def _on_line(self, line):
        received = time.time()
        if self.finished:
            return  # close() has settled the accounting already
        try:
            port, message = chatwire.parse_frame(line)
            token = chatwire.parse_message(message)
        except MalformedFrame as exc:
            tally.add("bad_frame")
            self.fault(exc)
            return
        if token.sender == self.sender:
            tally.add("echoed")
            self.fault(EchoedMessage(f"own message {token.seq}"))
            return
        # Mislabelled or not, it is a delivery: the ledger accounts for it.
        fault, newly_lost = self.ledger.observe(token.sender, token.seq)
        if port != token.port:
            tally.add("wrong_port")
            self.fault(WrongPort(f"message {token.seq} from sender {token.sender} on port "
                                 f"{token.port} relayed as from port {port}"))
        elif fault is None:
            self.fire("broadcast", response_time=max(0.0, (received - token.sent) * 1000),
                      length=len(line) + 1)
        if fault is not None:
            self.fault(fault(f"message {token.seq} from sender {token.sender}"))
        if newly_lost:
            self.fault(LostMessage(f"{newly_lost} message(s) more than {self.ledger.reorder_window} "
                                   f"before {token.seq} from sender {token.sender}"), count=newly_lost)


# --- users -------------------------------------------------------------------------------

class ChatUser(User):
    """A chat client as a Locust user: one connection at a time to the relay
    at --host (tcp://HOST:PORT or HOST:PORT; default 127.0.0.1:12345)."""

    abstract = True
    host = f"tcp://{chatwire.DEFAULT_HOST}:{chatwire.DEFAULT_PORT}"

    def __init__(self, environment):
        super().__init__(environment)
        self.address = None
        self.chat = None

    def wait_time(self):
        mean = chat_option(self.environment, "chat_wait", DEFAULT_WAIT)
        return random.uniform(0.5 * mean, 1.5 * mean)

    def connect(self):
        """Open a fresh connection (a new sender, sequence from 1). A relay that
        cannot be reached is a `connect` failure; the next task tries again."""
        self.chat = ChatClient(self.environment, self.address)
        try:
            self.chat.open()
        except OSError:
            return False
        return True

    def disconnect(self):
        if self.chat is not None:
            self.chat.leave()

    def on_start(self):
        # A --host that is not tcp://HOST:PORT raises here: loudly, as Locust
        # reports an error in on_start, not as a quietly idle user.
        self.address = chatwire.parse_address(self.host)
        try:
            self.connect()
        except BaseException:
            # on_stop is not called when on_start raises: close our own socket.
            if self.chat is not None:
                self.chat.close()
            raise

    def on_stop(self):
        self.disconnect()


class ChatRoomUser(ChatUser):
    """Chats at --chat-wait intervals with --chat-message-size messages; with
    probability --chat-churn per task it leaves instead and comes back after
    one wait, as a new connection."""

    @task
    def chat(self):
        if self.chat is None or not self.chat.connected:
            if self.chat is not None:
                self.chat.close()  # e.g. after an unexpected disconnect: account for it
            self.connect()
            return
        if random.random() < chat_option(self.environment, "chat_churn", DEFAULT_CHURN):
            self.disconnect()
            self.wait()
            self.connect()
            return
        size = chat_option(self.environment, "chat_message_size", DEFAULT_MESSAGE_SIZE)
        if not self.chat.send_message(min(size, chatwire.MAX_MESSAGE_CHARS)):
            self.chat.close()


# --- the run's summary and verdict -----------------------------------------------------

@events.init.add_listener
def check_options(environment, **_kwargs):
    size = chat_option(environment, "chat_message_size", DEFAULT_MESSAGE_SIZE)
    if size > chatwire.MAX_MESSAGE_CHARS:
        log.warning("--chat-message-size %d is above %d (the relay would split messages): "
                    "using %d", size, chatwire.MAX_MESSAGE_CHARS, chatwire.MAX_MESSAGE_CHARS)


# Distributed runs: has every worker sent the report it makes after its users
# stopped? Those carry the losses found as the last connections closed. The
# master waits only briefly for them (Locust's MasterRunner.quit), and a
# summary without them could pass a run that lost messages - so it fails.
_worker_stopped = False    # on a worker: its users have stopped since the test started
_workers_seen = set()      # on the master: workers that reported during this test
_workers_final = set()     # ... and those whose report came after their users stopped


@events.test_start.add_listener
def reset_tally(environment, **_kwargs):
    # Each test (in the web UI, each start) is checked on its own.
    global _worker_stopped
    _worker_stopped = False
    if not isinstance(environment.runner, WorkerRunner):
        tally.reset()
        _workers_seen.clear()
        _workers_final.clear()


@events.test_stop.add_listener
def note_stopped(environment, **_kwargs):
    global _worker_stopped
    _worker_stopped = True


@events.report_to_master.add_listener
def send_tally(client_id, data, **_kwargs):
    data["chat_tally"] = tally.take_unreported()
    data["chat_final"] = _worker_stopped


@events.worker_report.add_listener
def receive_tally(client_id, data, **_kwargs):
    if "chat_tally" not in data:
        return
    tally.merge(data["chat_tally"])
    _workers_seen.add(client_id)
    if data.get("chat_final"):
        _workers_final.add(client_id)


@events.quitting.add_listener
def report_and_judge(environment, **_kwargs):
    """Print the summary where the whole run's numbers are (master or the
    single process), and fail the run if the relay did not deliver."""
    if isinstance(environment.runner, WorkerRunner):
        return
    if not environment.stats.total.num_requests and not chat_option(environment, "headless", True):
        print("Chat delivery check: no test was run", flush=True)  # web UI opened and closed
        return
    broadcast = environment.stats.entries.get(("broadcast", REQUEST_TYPE))
    p50 = p99 = None
    if broadcast is not None and broadcast.num_requests:
        p50 = broadcast.get_response_time_percentile(0.50)
        p99 = broadcast.get_response_time_percentile(0.99)
    lines, problems = chatwire.summarize(
        tally.counts, p50_ms=p50, p99_ms=p99,
        latency_target_ms=chat_option(environment, "chat_latency_target", DEFAULT_LATENCY_TARGET),
        locust_failures=environment.stats.total.num_failures,
        missing_final_reports=len(_workers_seen - _workers_final),
    )
    print("\n".join(lines), flush=True)
    if problems and not environment.process_exit_code:
        environment.process_exit_code = chat_option(environment, "exit_code_on_error", 1)
    if chat_option(environment, "csv_prefix", None):
        # Locust rewrites its --csv files once a second and does not write
        # them again at shutdown (locust issues #1806, #2299), so they would
        # miss the end of the run - where the losses found as the last
        # connections closed are. Give its writer one more pass.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.3)
