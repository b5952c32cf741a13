"""chatusers.py - Locust users that chat over raw TCP and check every delivery.

Run:  locust -f loadtest/chatusers.py                     (web UI, relay 127.0.0.1:12345)
      locust -f loadtest/chatusers.py --headless -u 50 -r 10 -t 30s --host tcp://127.0.0.1:12345
      locust -f loadtest/chatusers.py --headless -u 60 -t 30s --chat-hosts 127.0.0.1:12345,127.0.0.1:12346

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

State, and statistics across processes
    Everything this process knows about the run is one RunState (`state`):
    the tally of the test in progress, the last faults, the connection
    identities, the round-robin over --chat-hosts, and (on the master) which
    workers have sent their final counts. One tally per test: it restarts
    when a test starts and when Locust's statistics are reset (the web UI's
    reset button, --reset-stats), so it always covers what the stats table
    covers. Workers send what they counted with every stats report
    (events.report_to_master -> events.worker_report) and a final message
    once their users have stopped; the master adds it up.

Where the verdict is shown
    When a test stops (Stop button, POST /stop, -t elapsing, quitting) the
    summary and its verdict are logged; the exit code fails if any test of
    the run failed. While a test runs, the web UI has a "Delivery" tab (the
    same figures, live, after the Logs tab), and the outputs carry them:
    <prefix>_delivery.csv beside --csv, an entry in --json-file, a section in
    --html and in the web UI's downloadable report.

Options
    The --chat-* options are added to Locust's parser (init_command_line_parser),
    so they work on the command line and in the web UI's start form under
    "Custom parameters"; `locust --help` does not list them, because Locust
    prints its help before loading this file. loadtest/README.md lists them.
"""

import collections
import csv
import html
import io
import itertools
import json
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
from locust.runners import MasterRunner, WorkerRunner
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
FAULT_DETAILS_LOGGED = 20  # per process and test: enough to diagnose, not a flood
RECENT_FAULTS = 10         # the last faults the Delivery view shows

# Defaults of the command-line options below. Floats stay floats, because the
# web UI converts what is typed into the type of the default.
DEFAULT_MESSAGE_SIZE = 64
DEFAULT_WAIT = 0.5
DEFAULT_CHURN = 0.02
DEFAULT_LATENCY_TARGET = 0.0


class RunState:
    """Everything this process keeps about the run, in one place.

    Owned by the event listeners at the bottom of this file (begin_test,
    reset, the worker reports) and fed by ChatClient (tally, note_fault).
    Invariants: `tally` covers exactly the current test since its start or
    Locust's last stats reset; `results` holds one entry per finished test,
    in order; `judged` is true once the current test's verdict is logged."""

    def __init__(self):
        self.tally = RunTally()
        self.environment = None  # Locust's, set at init
        # identities: a random tag per process (drawn lazily, see new_sender_id)
        self.process_tag = None
        self.process_tag_pid = None
        self.connection_numbers = itertools.count(1)
        # --chat-hosts round-robin (per process, offset by the worker index)
        self.host_turns = None
        # faults: the first ones logged, the last ones shown (and shipped to the master)
        self.faults_logged = 0
        self.recent_faults = collections.deque(maxlen=RECENT_FAULTS)
        self.unsent_faults = collections.deque(maxlen=RECENT_FAULTS)
        # tests
        self.test_number = 0
        self.running = False
        self.started_at = None
        self.judged = False
        self.results = []
        # distributed runs, on the master: who reported during this test, who
        # sent its final counts (after its users stopped), and who has since
        # sent a stats report too - Locust's own last figures (failures,
        # latency) come with that one
        self.workers_seen = set()
        self.workers_final = set()
        self.workers_settled = set()
        # on a worker: the final counts of this test have been sent
        self.final_sent = False

    def begin_test(self):
        self.reset()
        self.faults_logged = 0
        self.test_number += 1
        self.running = True
        self.started_at = time.time()
        self.judged = False
        self.workers_seen.clear()
        self.workers_final.clear()
        self.workers_settled.clear()
        self.final_sent = False

    def reset(self):
        """A fresh tally (test start, or Locust's stats reset)."""
        self.tally.reset()
        self.recent_faults.clear()
        self.unsent_faults.clear()

    def note_fault(self, fault):
        self.recent_faults.append(fault)
        self.unsent_faults.append(fault)

    def take_unsent_faults(self):
        faults = list(self.unsent_faults)
        self.unsent_faults.clear()
        return faults

    @property
    def missing_final_reports(self):
        return len(self.workers_seen - self.workers_settled)


state = RunState()


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
    parser.add_argument("--chat-hosts", default="", metavar="HOST:PORT,...",
                        help="relay nodes to spread users over, round-robin (each user keeps its "
                             "node); empty = the one relay at --host")
    # This project runs on loopback: Locust's own listeners (web UI, the
    # master's worker port) follow suit unless told otherwise on the command line.
    parser.set_defaults(web_host="127.0.0.1", master_bind_host="127.0.0.1")


def chat_option(environment, name, default):
    """An option's value; `default` when Locust runs without a parsed command
    line (e.g. an Environment built in a script)."""
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


# --- identities ------------------------------------------------------------------------

def new_sender_id(node_index=None):
    """A name for one connection, unique across processes and machines: a
    random tag per process plus a counter, and "@<index>" of its relay node
    with --chat-hosts. The tag is drawn lazily, in the process itself:
    --processes forks after importing this file, and the children must not
    share the parent's tag."""
    if state.process_tag_pid != os.getpid():
        state.process_tag, state.process_tag_pid = secrets.token_hex(4), os.getpid()
    sender = f"{state.process_tag}.{next(state.connection_numbers)}"
    return sender if node_index is None else f"{sender}@{node_index}"


def next_address(environment, host):
    """The relay node for a new user, as (address, node index): the next
    --chat-hosts entry in turn, or `host` (--host, index None) without
    --chat-hosts. Raises ValueError for a bad one.
    The turn starts at the worker's index, so that in a distributed run the
    workers' first users do not all land on the first node."""
    nodes = chatwire.parse_hosts(chat_option(environment, "chat_hosts", ""))
    if not nodes:
        return chatwire.parse_address(host), None
    if state.host_turns is None:
        state.host_turns = itertools.count(getattr(environment.runner, "worker_index", 0) or 0)
    index = next(state.host_turns) % len(nodes)
    return nodes[index], index


def node_names(environment):
    """--chat-hosts entries by index, as node_name gives them."""
    return [chatwire.node_name(address)
            for address in chatwire.parse_hosts(chat_option(environment, "chat_hosts", ""))]


# --- one connection --------------------------------------------------------------------

class ChatClient:
    """One TCP connection to the relay, as one chat client.

    The user's greenlet calls open(), send_message() and leave(); a receiver
    greenlet is the only reader of the socket. Every outcome is a Locust
    request event (request_type CHAT): connect, send, exit, broadcast (one
    per message received, its response time the send-to-receipt latency),
    and a failure row per fault, named after it.
    """

    def __init__(self, environment, address, node_index=None):
        self.environment = environment
        self.address = address
        self.node_index = node_index
        self.sender = new_sender_id(node_index)
        self.sock = None
        self.port = None
        self.seq = 0
        self.node = chatwire.node_name(address)
        self.ledger = DeliveryLedger(state.tally)
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
        """Report `count` occurrences of a delivery fault as Locust failures,
        and keep it among the last faults the Delivery view shows."""
        if state.faults_logged < FAULT_DETAILS_LOGGED:
            state.faults_logged += 1
            log.warning("%s: %s (receiver %s, port %s): %s", exception.request_name, exception,
                        self.sender, self.port, exception.detail)
            if state.faults_logged == FAULT_DETAILS_LOGGED:
                log.warning("further delivery faults in this process are counted but not logged")
        state.note_fault({
            "time": time.strftime("%H:%M:%S"), "fault": exception.request_name, "count": count,
            "receiver": self.sender, "port": self.port, "node": self.node,
            "detail": chatwire.shorten(exception.detail, 240),
        })
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
        state.tally.add_connection(self.node)
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
        state.tally.add("sent")
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
                state.tally.add("unexpected_disconnect")
                self.fault(UnexpectedDisconnect(detail))
            self.closed.set()

    def _count_route(self, sender):
        """With --chat-hosts: one delivery from the sender's node to ours."""
        from_index = chatwire.sender_node(sender)
        if self.node_index is None or from_index is None:
            return
        names = node_names(self.environment)
        if from_index < len(names):
            state.tally.add_route(names[from_index], self.node)

    def _on_line(self, line):
        received = time.time()
        if self.finished:
            return  # close() has settled the accounting already
        try:
            port, message = chatwire.parse_frame(line)
            token = chatwire.parse_message(message)
        except MalformedFrame as exc:
            state.tally.add("bad_frame")
            self.fault(exc)
            return
        if token.sender == self.sender:
            state.tally.add("echoed")
            self.fault(EchoedMessage(f"own message {token.seq}"))
            return
        # Mislabelled or not, it is a delivery: the ledger accounts for it.
        fault, newly_lost = self.ledger.observe(token.sender, token.seq)
        if port != token.port:
            state.tally.add("wrong_port")
            self.fault(WrongPort(f"message {token.seq} from sender {token.sender} on port "
                                 f"{token.port} relayed as from port {port}"))
        elif fault is None:
            self.fire("broadcast", response_time=max(0.0, (received - token.sent) * 1000),
                      length=len(line) + 1)
            self._count_route(token.sender)
        if fault is not None:
            self.fault(fault(f"message {token.seq} from sender {token.sender}"))
        if newly_lost:
            self.fault(LostMessage(f"{newly_lost} message(s) more than {self.ledger.reorder_window} "
                                   f"before {token.seq} from sender {token.sender}"), count=newly_lost)


# --- users -------------------------------------------------------------------------------

class ChatUser(User):
    """A chat client as a Locust user: one connection at a time to its relay
    node: the one at --host (tcp://HOST:PORT or HOST:PORT; default
    127.0.0.1:12345), or its turn of --chat-hosts."""

    abstract = True
    host = f"tcp://{chatwire.DEFAULT_HOST}:{chatwire.DEFAULT_PORT}"

    def __init__(self, environment):
        super().__init__(environment)
        self.address = None
        self.node_index = None
        self.chat = None

    def wait_time(self):
        mean = chat_option(self.environment, "chat_wait", DEFAULT_WAIT)
        return random.uniform(0.5 * mean, 1.5 * mean)

    def connect(self):
        """Open a fresh connection (a new sender, sequence from 1). A relay that
        cannot be reached is a `connect` failure; the next task tries again."""
        self.chat = ChatClient(self.environment, self.address, self.node_index)
        try:
            self.chat.open()
        except OSError:
            return False
        return True

    def disconnect(self):
        if self.chat is not None:
            self.chat.leave()

    def on_start(self):
        # A --host (or --chat-hosts entry) that is not HOST:PORT raises here:
        # loudly, as Locust reports an error in on_start, not as an idle user.
        self.address, self.node_index = next_address(self.environment, self.host)
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


# --- the run's figures, verdict and summary -------------------------------------------

def is_worker(environment):
    return isinstance(environment.runner, WorkerRunner)


def broadcast_percentiles(environment):
    """(p50, p99) of the `broadcast` row, in ms; (None, None) before any delivery."""
    broadcast = environment.stats.entries.get(("broadcast", REQUEST_TYPE))
    if broadcast is None or not broadcast.num_requests:
        return None, None
    return broadcast.get_response_time_percentile(0.50), broadcast.get_response_time_percentile(0.99)


def snapshot(environment, missing_final_reports=0):
    """The current test's figures, on the master or the single process: the
    source of the Delivery view, the summary, and every output.
    `missing_final_reports` None: the test has stopped and the master is
    still waiting for them (not yet a fault)."""
    counts = dict(state.tally.counts)
    p50, p99 = broadcast_percentiles(environment)
    target = chat_option(environment, "chat_latency_target", DEFAULT_LATENCY_TARGET)
    problems = chatwire.judge(counts, p99_ms=p99, latency_target_ms=target,
                              locust_failures=environment.stats.total.num_failures,
                              missing_final_reports=missing_final_reports or 0,
                              nodes=state.tally.nodes, routes=state.tally.routes)
    return {
        "test": state.test_number,
        "state": ("running" if state.running else
                  "stopped, waiting for the workers' final counts" if missing_final_reports is None
                  else "stopped"),
        "verdict": chatwire.verdict(problems),
        "passed": not problems,
        "problems": problems,
        "counts": {counter: counts.get(counter, 0) for counter in chatwire.COUNTERS},
        "loss_ratio": chatwire.loss_percent(counts.get("lost", 0), counts.get("expected", 0)),
        "broadcast_p50_ms": p50,
        "broadcast_p99_ms": p99,
        "latency_target_ms": target,
        "connections_by_node": dict(state.tally.nodes),
        "deliveries_by_route": dict(state.tally.routes),
        "recent_faults": list(state.recent_faults),
        "workers_reporting": len(state.workers_seen) if isinstance(environment.runner, MasterRunner) else None,
    }


def finish_test(environment):
    """The current test is over: log its summary and verdict, keep its result."""
    if state.judged or not state.test_number:
        return
    state.judged = True
    result = snapshot(environment, missing_final_reports=state.missing_final_reports)
    result["state"] = "stopped"
    lines, _problems = chatwire.summarize(
        result["counts"], p50_ms=result["broadcast_p50_ms"], p99_ms=result["broadcast_p99_ms"],
        latency_target_ms=result["latency_target_ms"],
        locust_failures=environment.stats.total.num_failures,
        missing_final_reports=state.missing_final_reports, nodes=result["connections_by_node"],
        routes=result["deliveries_by_route"])
    state.results.append(result)
    (log.info if result["passed"] else log.error)("\n".join(lines))
    write_delivery_csv(environment)


# --- tests: start, reset, stop --------------------------------------------------------

@events.init.add_listener
def on_init(environment, runner=None, web_ui=None, **_kwargs):
    state.environment = environment  # for the listeners of events that carry none
    size = chat_option(environment, "chat_message_size", DEFAULT_MESSAGE_SIZE)
    if size > chatwire.MAX_MESSAGE_CHARS:
        log.warning("--chat-message-size %d is above %d (the relay would split messages): "
                    "using %d", size, chatwire.MAX_MESSAGE_CHARS, chatwire.MAX_MESSAGE_CHARS)
    try:
        chatwire.parse_hosts(chat_option(environment, "chat_hosts", ""))
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if isinstance(runner, MasterRunner):
        runner.register_message("chat_final", receive_final_tally)
    if web_ui is not None:
        add_delivery_view(environment, web_ui)
    if not is_worker(environment) and chat_option(environment, "csv_prefix", None):
        gevent.spawn(keep_writing_delivery_csv, environment)
    # Locust arms -t with gevent.spawn_later, which counts from the event
    # loop's cached clock: that clock stands still while startup blocks (the
    # imports, on a loaded machine seconds), and -t 2s could elapse at once,
    # before a single delivery. Bring it up to date.
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def on_test_start(environment, **_kwargs):
    # Each test (in the web UI, each start) is checked on its own.
    state.begin_test()


@events.reset_stats.add_listener
def on_reset_stats(**_kwargs):
    # The web UI's "Reset stats": Locust's table restarts, and so does the tally.
    state.reset()


@events.spawning_complete.add_listener
def on_spawning_complete(user_count, **_kwargs):
    # --reset-stats: Locust resets its statistics once all users are running,
    # without firing reset_stats.
    environment = state.environment
    if environment is not None and environment.reset_stats and not is_worker(environment):
        state.reset()


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs):
    state.running = False
    if is_worker(environment):
        # Our users have stopped, so their last connections are settled:
        # send the final counts now, ahead of Locust's "client_stopped".
        final = {"chat_tally": state.tally.take_unreported(), "chat_faults": state.take_unsent_faults()}
        try:
            environment.runner.send_message("chat_final", final)
        except Exception as exc:  # the master is gone: it will count us as missing
            log.warning("could not send the final counts to the master: %s", exc)
        state.final_sent = True
        return
    if isinstance(environment.runner, MasterRunner):
        # Every worker still connected ran this test's users (or had none):
        # each sends its final counts, if it has not already.
        state.workers_seen.update(client.id for client in environment.runner.clients.all)
    if not state.missing_final_reports:
        finish_test(environment)
    else:
        log.info("test stopped: waiting for the final counts of %d worker(s)", state.missing_final_reports)


@events.report_to_master.add_listener
def send_tally(client_id, data, **_kwargs):
    data["chat_tally"] = state.tally.take_unreported()
    data["chat_faults"] = state.take_unsent_faults()
    # Gathered after the final counts were sent, so Locust's own statistics
    # in this report (gathered at the same moment) are complete as well. (A
    # report gathered earlier may still be on its way: it does not count.)
    data["chat_after_final"] = state.final_sent


def merge_report(client_id, data):
    state.tally.merge(data["chat_tally"])
    for fault in data.get("chat_faults", ()):
        state.recent_faults.append({**fault, "worker": client_id})
    state.workers_seen.add(client_id)


@events.worker_report.add_listener
def receive_tally(client_id, data, **_kwargs):
    if "chat_tally" not in data:
        return
    merge_report(client_id, data)
    if data.get("chat_after_final") and client_id in state.workers_final:
        state.workers_settled.add(client_id)
        if not state.running and not state.missing_final_reports:
            # The last worker's last report is in. Locust's own listener (which
            # adds the report to its statistics) runs after this one: judge
            # once it has.
            gevent.spawn(finish_test, state.environment)


def receive_final_tally(environment, msg, **_kwargs):
    merge_report(msg.node_id, msg.data)
    state.workers_final.add(msg.node_id)


@events.quitting.add_listener
def report_and_judge(environment, **_kwargs):
    """At quit: settle a test still running, then set the exit code from
    every test of the run."""
    if is_worker(environment):
        return
    if state.running and environment.runner is not None:
        # Ctrl-C or SIGTERM during a test: stop the users first, so that the
        # losses found as the last connections close are counted.
        environment.runner.stop()
    finish_test(environment)  # no-op when the test's verdict is logged already
    if not state.results:
        log.info("Chat delivery check: no test was run")
        return
    failed = [result["test"] for result in state.results if not result["passed"]]
    if len(state.results) > 1:
        log.info("Chat delivery check: %d test(s) in this run, %s", len(state.results),
                 f"test(s) {', '.join(map(str, failed))} failed" if failed else "all passed")
    if failed and not environment.process_exit_code:
        environment.process_exit_code = chat_option(environment, "exit_code_on_error", 1)
    write_delivery_csv(environment)
    write_delivery_html(environment)
    if chat_option(environment, "csv_prefix", None):
        # Locust rewrites its --csv files once a second and does not write
        # them again at shutdown (locust issues #1806, #2299), so they would
        # miss the end of the run - where the losses found as the last
        # connections closed are. Give its writer one more pass.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.3)


@events.quit.add_listener
def add_delivery_to_json(**_kwargs):
    """--json-file: Locust has just written its list of statistics entries
    (after `quitting`); append one entry with the delivery figures."""
    environment = state.environment
    json_file = chat_option(environment, "json_file", None) if environment is not None else None
    if not json_file or is_worker(environment) or not state.results:
        return
    path = f"{json_file}.json"
    try:
        with open(path) as file:
            entries = json.load(file)
        entries.append({"name": "chat delivery check", "method": REQUEST_TYPE,
                        "delivery": state.results[-1], "tests": state.results})
        with open(path, "w") as file:
            json.dump(entries, file, indent=4)
    except (OSError, ValueError) as exc:
        log.error("could not add the delivery figures to %s: %s", path, exc)


# --- outputs: CSV, HTML ----------------------------------------------------------------

CSV_COLUMNS = ["Test", "State", "Verdict", "Messages Sent", "Expected Deliveries", "Delivered",
               "Lost", "Loss Ratio", "Duplicates", "Reordered", "Bad Frames", "Wrong Port",
               "Echoed", "Unexpected Disconnects", "Broadcast p50 (ms)", "Broadcast p99 (ms)",
               "Connections By Node", "Deliveries By Route"]


def delivery_rows(environment):
    """Every finished test of this run, then the one in progress (if any)."""
    rows = list(state.results)
    if state.test_number and not state.judged:
        rows.append(snapshot(environment))
    return rows


def delivery_csv(environment):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in delivery_rows(environment):
        counts = row["counts"]
        writer.writerow([row["test"], row["state"], row["verdict"]]
                        + [counts[counter] for counter in ("sent", "expected", "delivered", "lost")]
                        + [row["loss_ratio"]]
                        + [counts[counter] for counter in ("duplicate", "reordered", "bad_frame",
                                                           "wrong_port", "echoed", "unexpected_disconnect")]
                        + [row["broadcast_p50_ms"], row["broadcast_p99_ms"],
                           " ".join(f"{node}={n}" for node, n in sorted(row["connections_by_node"].items())),
                           "; ".join(f"{route}={n}" for route, n in sorted(row["deliveries_by_route"].items()))])
    return out.getvalue()


def write_delivery_csv(environment):
    prefix = chat_option(environment, "csv_prefix", None)
    if not prefix or is_worker(environment):
        return
    try:
        with open(f"{prefix}_delivery.csv", "w", newline="") as file:
            file.write(delivery_csv(environment))
    except OSError as exc:
        log.error("could not write %s_delivery.csv: %s", prefix, exc)


def keep_writing_delivery_csv(environment):
    """<prefix>_delivery.csv is rewritten as often as Locust's own --csv files."""
    while True:
        gevent.sleep(CSV_STATS_INTERVAL_SEC)
        write_delivery_csv(environment)


def view_rows(current):
    """The Delivery view's table: (figure, value) rows, then the last faults."""
    rows = [{"figure": label, "value": text} for label, text in chatwire.figures(
        current["counts"], p50_ms=current["broadcast_p50_ms"], p99_ms=current["broadcast_p99_ms"],
        latency_target_ms=current["latency_target_ms"], problems=current["problems"])]
    rows.insert(1, {"figure": "state", "value": f"test {current['test']}: {current['state']}"})
    if current["connections_by_node"]:
        rows.append({"figure": "connections by node", "value": ", ".join(
            f"{node} {n}" for node, n in sorted(current["connections_by_node"].items()))})
    if len(current["connections_by_node"]) > 1:
        rows.append({"figure": "deliveries across nodes", "value": ", ".join(
            f"{route} {n}" for route, n in sorted(current["deliveries_by_route"].items())
            if route.split(" -> ")[0] != route.split(" -> ")[1]) or "none"})
    if current["workers_reporting"] is not None:
        rows.append({"figure": "workers reporting", "value": str(current["workers_reporting"])})
    for fault in reversed(current["recent_faults"]):
        where = f" on {fault['worker']}" if fault.get("worker") else ""
        rows.append({"figure": f"fault at {fault['time']}",
                     "value": f"{fault['fault']} x{fault['count']}: receiver {fault['receiver']} "
                              f"(port {fault['port']}, {fault['node']}{where}): {fault['detail']}"})
    if not current["recent_faults"]:
        rows.append({"figure": "last faults", "value": "none"})
    return rows


def current_figures(environment):
    """What the view shows: the test in progress, or else the last one finished."""
    if state.test_number and not state.judged:
        waiting = not state.running and state.missing_final_reports
        return snapshot(environment, missing_final_reports=None if waiting else 0)
    return state.results[-1] if state.results else snapshot(environment)


def delivery_html(environment):
    """A self-contained section for Locust's HTML report (inline styles: the
    report is a file opened anywhere)."""
    tests = state.results or [snapshot(environment)]
    parts = ['<section id="chat-delivery" style="font-family:sans-serif;max-width:1100px;'
             'margin:24px auto;padding:16px;background:#fff;color:#111;border:1px solid #ccc">',
             "<h2>Chat delivery check</h2>"]
    for result in tests:
        colour = "#1b7f3b" if result["passed"] else "#b00020"
        parts.append(f'<h3>Test {result["test"]} ({html.escape(result["state"])}): '
                     f'<span class="chat-verdict" style="color:{colour}">'
                     f'{html.escape(result["verdict"])}</span></h3>')
        parts.append('<table class="chat-figures" style="border-collapse:collapse">')
        for row in view_rows(result):
            parts.append('<tr><th style="text-align:left;padding:2px 12px 2px 0;vertical-align:top">'
                         f'{html.escape(row["figure"])}</th><td style="padding:2px 0">'
                         f'{html.escape(row["value"])}</td></tr>')
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)


def inject_html(environment, report):
    """The report with the section added at the end of its body. (The last
    "</body>": the report's inlined scripts contain the string too.)"""
    end = report.rfind("</body>")
    if end < 0:
        return report + delivery_html(environment)
    return report[:end] + delivery_html(environment) + "\n" + report[end:]


def write_delivery_html(environment):
    """--html: Locust wrote its report before `quitting`; add the section."""
    path = chat_option(environment, "html_file", None)
    if not path or not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as file:
            report = file.read()
        if 'id="chat-delivery"' not in report:
            with open(path, "w", encoding="utf-8") as file:
                file.write(inject_html(environment, report))
    except OSError as exc:
        log.error("could not add the delivery section to %s: %s", path, exc)


# --- the web UI's Delivery view --------------------------------------------------------

DELIVERY_TAB = "delivery"


def add_delivery_view(environment, web_ui):
    """A "Delivery" tab, by Locust's own extension points: the tab and its
    table's columns go into the page's template_args; its rows ride along in
    every /stats/requests answer (`extended_stats`), so the tab refreshes with
    the stats table. The report download gets the HTML section, and
    "Download Data" a link to the delivery CSV."""
    from flask import make_response, request  # Locust's web UI is Flask; only needed with it

    web_ui.template_args["extended_tabs"] = [{"title": "Delivery", "key": DELIVERY_TAB}]
    web_ui.template_args["extended_tables"] = [{"key": DELIVERY_TAB, "structure": [
        {"key": "figure", "title": "Figure"}, {"key": "value", "title": "Value"}]}]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "./delivery/csv", "title": "Download delivery check CSV"}]

    @web_ui.app.after_request
    def extend_responses(response):
        if request.path.endswith("/stats/requests") and response.is_json:
            body = response.get_json()
            body["extended_stats"] = [{"key": DELIVERY_TAB, "data": view_rows(current_figures(environment))}]
            response.set_data(json.dumps(body))
        elif request.path.endswith("/stats/report") and response.status_code == 200:
            response.set_data(inject_html(environment, response.get_data(as_text=True)))
        return response

    @web_ui.app.route("/delivery/csv")
    def delivery_csv_download():
        response = make_response(delivery_csv(environment))
        response.headers["Content-Type"] = "text/csv"
        response.headers["Content-Disposition"] = "attachment;filename=chat_delivery.csv"
        return response

    @web_ui.app.route("/delivery")
    def delivery_json():
        """The view's figures as JSON (for scripts and tests)."""
        return current_figures(environment)
