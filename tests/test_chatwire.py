"""Unit tests of loadtest/chatwire.py: the token, frame parsing and the
delivery accounting that decide whether a load-test run passes.

chatwire imports neither locust nor gevent, so it is tested here, in the
ordinary pytest process (the locustfile itself is only ever run as a
subprocess: see test_loadtest.py)."""

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT / "loadtest"))
import chatwire  # noqa: E402
from chatwire import (  # noqa: E402
    DeliveryLedger, DuplicateMessage, MalformedFrame, ReorderedMessage, RunTally,
)


def test_chatwire_does_not_pull_in_locust_or_gevent():
    # It must be importable here without monkey-patching this process.
    check = ("import sys, chatwire; "
             "assert not {'locust', 'gevent'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", check], cwd=ROOT / "loadtest", check=True, timeout=30)


# --- addresses ---------------------------------------------------------------------

@pytest.mark.parametrize("text, address", [
    ("", ("127.0.0.1", 12345)),
    ("tcp://127.0.0.1:12345", ("127.0.0.1", 12345)),
    ("127.0.0.2:4000", ("127.0.0.2", 4000)),
    ("localhost", ("localhost", 12345)),
    ("tcp://[::1]:5000", ("::1", 5000)),
    ("tcp://127.0.0.1:7/", ("127.0.0.1", 7)),
])
def test_parse_address(text, address):
    assert chatwire.parse_address(text) == address


@pytest.mark.parametrize("text", ["http://127.0.0.1:12345", "tcp://127.0.0.1:99999",
                                  "tcp://:5000", "tcp://127.0.0.1:5000/chat"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        chatwire.parse_address(text)


# --- messages and frames ----------------------------------------------------------------

def test_message_round_trip_and_size():
    message = chatwire.format_message("ab12cd34.7", 42, 54321, 1712345678.25, 120)
    assert len(message) == 120
    assert message.startswith("chat1|ab12cd34.7|42|54321|1712345678.250000|")
    token = chatwire.parse_message(message)
    assert token == chatwire.Token("ab12cd34.7", 42, 54321, 1712345678.25)


@given(size=st.integers(0, chatwire.MAX_MESSAGE_CHARS), seq=st.integers(1, 10**9),
       port=st.integers(1, 65535))
def test_message_sizes(size, seq, port):
    message = chatwire.format_message("deadbeef.123", seq, port, 1712345678.123456, size)
    token = chatwire.parse_message(message)
    assert (token.seq, token.port) == (seq, port)
    assert len(message) <= max(size, len(message))
    header = len(chatwire.format_message("deadbeef.123", seq, port, 1712345678.123456, 0))
    if size > header:
        # Exact, or one short where the padding's digit count steps (9 -> 10).
        assert size - 1 <= len(message) <= size
    assert message.isprintable() and "\n" not in message


def test_message_never_longer_than_the_relay_keeps_whole():
    with pytest.raises(ValueError):
        chatwire.format_message("a" * 990 + ".1", 1, 1, 0.0, 0)


@pytest.mark.parametrize("text, summary", [
    ("hello", "a message is not a load-test token"),
    ("chat1|ab.1|1|2|3.0|5|xxxx", "a message arrived truncated or altered"),
    ("chat1|ab.1|1|2|3.0|2|xxx", "a message arrived truncated or altered"),
    ("chat1|ab.1|1|2|3.0|0|", None),
])
def test_parse_message_checks_the_token(text, summary):
    if summary is None:
        assert chatwire.parse_message(text).sender == "ab.1"
        return
    with pytest.raises(MalformedFrame) as caught:
        chatwire.parse_message(text)
    assert str(caught.value) == summary  # fixed, so Locust groups one row per kind


@pytest.mark.parametrize("line, parsed", [
    (b"54321: hello", (54321, "hello")),
    (b"1: a: b", (1, "a: b")),
    ("7: caf\u00e9".encode(), (7, "caf\u00e9")),
])
def test_parse_frame(line, parsed):
    assert chatwire.parse_frame(line) == parsed


@pytest.mark.parametrize("line", [b"hello", b"54321:hello", b"54321: ", b": x", b"abc: x",
                                  b"123456: x", b"0: x", b"70000: x", b"12: \xff\xfe"])
def test_parse_frame_rejects(line):
    with pytest.raises(MalformedFrame):
        chatwire.parse_frame(line)


def test_split_lines_keeps_partial_frames():
    lines, rest = chatwire.split_lines(b"1: a", b"bc\n2: d\n3: e")
    assert lines == [b"1: abc", b"2: d"] and rest == b"3: e"
    lines, rest = chatwire.split_lines(rest, b"f\n")
    assert lines == [b"3: ef"] and rest == b""


# --- the ledger: loss, duplicates, reordering ---------------------------------------------

def deliver(ledger, sender, seqs):
    """Feed seqs; return [(fault, newly_lost)] per message."""
    return [ledger.observe(sender, seq) for seq in seqs]


def test_in_order_is_clean_and_baseline_is_the_first_seen():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    # Joined late: the first message seen is 17, earlier ones are not expected.
    assert deliver(ledger, "s.1", range(17, 30)) == [(None, 0)] * 13
    assert ledger.close() == 0
    assert tally.counts == {"expected": 13, "delivered": 13}


def test_gap_is_lost_when_the_connection_closes():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    assert deliver(ledger, "s.1", [1, 2, 5, 6]) == [(None, 0)] * 4
    assert ledger.pending == 2
    assert ledger.close() == 2
    assert ledger.close() == 0  # idempotent
    assert tally.counts["lost"] == 2
    assert tally.counts["expected"] == tally.counts["delivered"] + tally.counts["lost"] == 6


def test_tail_after_the_last_seen_is_not_expected():
    # Messages still in flight when a side leaves come after the last one seen:
    # never a gap, so never counted lost (README: the delivery rule).
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    deliver(ledger, "s.1", [1, 2, 3])
    assert ledger.close() == 0
    assert tally.counts["lost"] == 0


def test_late_arrival_is_a_reordering_not_a_loss():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    results = deliver(ledger, "s.1", [1, 3, 2, 4])
    assert results == [(None, 0), (None, 0), (ReorderedMessage, 0), (None, 0)]
    assert ledger.close() == 0
    assert tally.counts["reordered"] == 1 and tally.counts["lost"] == 0
    assert tally.counts["expected"] == tally.counts["delivered"] == 4


def test_arrival_before_the_baseline_is_a_reordering():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    assert deliver(ledger, "s.1", [5, 4]) == [(None, 0), (ReorderedMessage, 0)]
    assert tally.counts["reordered"] == 1 and tally.counts["expected"] == 1


def test_duplicates():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    results = deliver(ledger, "s.1", [1, 2, 2, 3, 1])
    assert [fault for fault, _ in results] == [None, None, DuplicateMessage, None, DuplicateMessage]
    assert tally.counts["duplicate"] == 2 and tally.counts["delivered"] == 3


def test_senders_are_tracked_separately():
    tally = RunTally()
    ledger = DeliveryLedger(tally)
    deliver(ledger, "a.1", [1, 2])
    deliver(ledger, "b.1", [7, 9])
    deliver(ledger, "a.1", [3])
    assert ledger.pending == 1  # b's 8
    assert ledger.describe_pending() == "b.1: 8"
    assert ledger.close() == 1


def test_a_missing_message_is_written_off_beyond_the_window():
    tally = RunTally()
    ledger = DeliveryLedger(tally, reorder_window=4)
    deliver(ledger, "s.1", [1, 3, 4, 5, 6])
    assert ledger.pending == 1
    assert ledger.pending == 1  # 2 trails 6 by 4: still within the window
    assert ledger.observe("s.1", 7) == (None, 1)  # now by 5: written off as lost
    assert ledger.pending == 0 and tally.counts["lost"] == 1
    # If it shows up after all, it is late (reordered), and not delivered twice over.
    assert ledger.observe("s.1", 2) == (ReorderedMessage, 0)
    assert tally.counts["delivered"] == 6 and tally.counts["expected"] == 7


def test_a_huge_jump_stays_bounded():
    tally = RunTally()
    ledger = DeliveryLedger(tally, reorder_window=10)
    ledger.observe("s.1", 1)
    fault, newly_lost = ledger.observe("s.1", 1_000_000_000)
    assert fault is None
    assert ledger.pending == 10
    assert newly_lost + ledger.close() == 1_000_000_000 - 2
    assert tally.counts["expected"] == tally.counts["delivered"] + tally.counts["lost"]


@given(st.lists(st.integers(1, 60), max_size=200))
def test_ledger_matches_a_plain_model(arrivals):
    """Against a straightforward set-based model (no reorder window): what is
    delivered, lost, duplicated and reordered, for any arrival order."""
    tally = RunTally()
    ledger = DeliveryLedger(tally, reorder_window=10**9)
    for seq in arrivals:
        ledger.observe("s.1", seq)
    ledger.close()

    model = {"expected": 0, "delivered": 0, "lost": 0, "duplicate": 0, "reordered": 0}
    if arrivals:
        first, highest, received = arrivals[0], arrivals[0], set()
        for seq in arrivals:
            if seq in received:
                model["duplicate"] += 1
            elif seq < first:
                model["reordered"] += 1  # outside the window: not delivered
            else:
                if seq < highest:
                    model["reordered"] += 1
                received.add(seq)
                highest = max(highest, seq)
        model["expected"] = highest - first + 1
        model["delivered"] = len(received)
        model["lost"] = model["expected"] - model["delivered"]
    assert {key: tally.counts[key] for key in model} == model


@given(st.lists(st.integers(1, 300), max_size=300), st.integers(1, 20))
def test_accounting_invariant_with_any_window(arrivals, window):
    tally = RunTally()
    ledger = DeliveryLedger(tally, reorder_window=window)
    for seq in arrivals:
        ledger.observe("s.1", seq)
    ledger.close()
    counts = tally.counts
    assert counts["expected"] == counts["delivered"] + counts["lost"]
    # Each arrival counts once, except a late one that fills a gap: delivered and reordered.
    assert counts["delivered"] + counts["duplicate"] <= len(arrivals)
    assert len(arrivals) <= counts["delivered"] + counts["duplicate"] + counts["reordered"]


# --- the tally and the summary ------------------------------------------------------------

def test_tally_deltas_merge_to_the_total():
    worker, master = RunTally(), RunTally()
    worker.add("sent", 3)
    master.merge(worker.take_unreported())
    worker.add("sent", 2)
    worker.add("lost")
    master.merge(worker.take_unreported())
    assert worker.take_unreported() == {}
    assert master.counts == worker.counts == {"sent": 5, "lost": 1}
    with pytest.raises(KeyError):
        worker.add("bogus")


def test_summary_passes_a_clean_run():
    lines, problems = chatwire.summarize({"sent": 10, "expected": 90, "delivered": 90},
                                         p50_ms=1, p99_ms=5, latency_target_ms=50)
    assert problems == []
    assert lines[-1].startswith("  RESULT: PASS")
    assert any("expected deliveries" in line and line.endswith(" 90") for line in lines)


@pytest.mark.parametrize("counts, kwargs, problem", [
    ({"delivered": 5, "lost": 2}, {}, "2 lost"),
    ({"delivered": 5, "duplicate": 1}, {}, "1 duplicates"),
    ({"delivered": 5, "unexpected_disconnect": 1}, {}, "1 unexpected disconnects"),
    ({"sent": 5}, {}, "no message was delivered"),
    ({"delivered": 5}, {"p99_ms": 80, "p50_ms": 1, "latency_target_ms": 50}, "above the 50 ms target"),
    ({"delivered": 5}, {"locust_failures": 3}, "3 Locust failures"),
    ({"delivered": 5}, {"missing_final_reports": 1}, "counts are incomplete"),
])
def test_summary_fails(counts, kwargs, problem):
    lines, problems = chatwire.summarize(counts, **kwargs)
    assert any(problem in text for text in problems)
    assert lines[-1].startswith("  RESULT: FAIL") and problem in lines[-1]


# --- --chat-hosts, loss ratio, verdict, figures --------------------------------------------

def test_parse_hosts():
    assert chatwire.parse_hosts("") == []
    assert chatwire.parse_hosts("127.0.0.1:5000, localhost:5001,tcp://[::1]:7") == [
        ("127.0.0.1", 5000), ("localhost", 5001), ("::1", 7)]
    assert [chatwire.node_name(a) for a in chatwire.parse_hosts("127.0.0.1:5,[::1]:6")] == [
        "127.0.0.1:5", "[::1]:6"]


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:1,,127.0.0.1:2", "empty entry"),
    ("127.0.0.1:1,http://x:2", "entry 'http://x:2'"),
    ("127.0.0.1:99999", "bad port"),
])
def test_parse_hosts_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        chatwire.parse_hosts(text)


@pytest.mark.parametrize("lost, expected, text", [
    (0, 0, "0%"), (0, 500, "0%"), (1, 500, "0.200%"), (75, 16931, "0.443%"),
    (1, 81300, "0.00123%"), (1, 2, "50.0%"), (5, 5, "100.0%"), (3, 0, "n/a"),
])
def test_loss_percent_never_rounds_a_loss_to_zero(lost, expected, text):
    assert chatwire.loss_percent(lost, expected) == text


def test_verdict_and_figures():
    counts = {"sent": 10, "expected": 500, "delivered": 499, "lost": 1}
    problems = chatwire.judge(counts, p99_ms=9)
    assert chatwire.verdict(problems) == "FAIL - 1 lost"
    assert chatwire.verdict([]) == "PASS"
    rows = dict(chatwire.figures(counts, p50_ms=2, p99_ms=9, latency_target_ms=50, problems=problems))
    assert rows["verdict"] == "FAIL - 1 lost"
    assert rows["loss ratio"] == "0.200% (1 of 500 expected)"
    assert rows["lost"] == "1" and rows["expected deliveries"] == "500"
    assert rows["broadcast p99"] == "9 ms (target: 50 ms)"
    nodes = {"127.0.0.1:1": 3, "localhost:1": 2}
    routes = {"127.0.0.1:1 -> localhost:1": 7, "localhost:1 -> 127.0.0.1:1": 5, "localhost:1 -> localhost:1": 1}
    lines, _ = chatwire.summarize(counts, p50_ms=2, p99_ms=9, nodes=nodes, routes=routes)
    assert "  loss ratio               0.200%" in lines
    assert "  connections by node      127.0.0.1:1 3, localhost:1 2" in lines
    assert "  deliveries across nodes  127.0.0.1:1 -> localhost:1 7, localhost:1 -> 127.0.0.1:1 5" in lines


def test_nodes_that_do_not_share_a_room_fail():
    # Each receiver only hears its own node: every per-sender expectation is
    # met, but nothing crossed from node to node.
    counts = {"sent": 10, "expected": 40, "delivered": 40}
    nodes = {"a:1": 2, "b:1": 2}
    routes = {"a:1 -> a:1": 20, "b:1 -> b:1": 20}
    problems = chatwire.judge(counts, nodes=nodes, routes=routes)
    assert problems == ["no delivery across nodes a:1 -> b:1, b:1 -> a:1 (do they share one room?)"]
    routes.update({"a:1 -> b:1": 1})
    assert chatwire.judge(counts, nodes=nodes, routes=routes) == [
        "no delivery across nodes b:1 -> a:1 (do they share one room?)"]
    routes.update({"b:1 -> a:1": 1})
    assert chatwire.judge(counts, nodes=nodes, routes=routes) == []
    assert chatwire.sender_node("ab12cd34.7@1") == 1 and chatwire.sender_node("ab12cd34.7") is None
    assert chatwire.parse_message(chatwire.format_message("ab12cd34.7@1", 1, 5, 0.5, 60)).sender == "ab12cd34.7@1"


def test_tally_counts_connections_and_routes_per_node():
    worker, master = RunTally(), RunTally()
    worker.add_connection("a:1")
    worker.add_connection("b:1")
    worker.add_route("a:1", "b:1")
    master.merge(worker.take_unreported())
    worker.add_connection("a:1")
    worker.add_route("a:1", "b:1")
    master.merge(worker.take_unreported())
    assert master.nodes == {"a:1": 2, "b:1": 1}
    assert master.routes == {"a:1 -> b:1": 2}
    assert worker.take_unreported() == {}
    master.reset()
    assert not master.nodes and not master.counts
