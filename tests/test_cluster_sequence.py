"""The sans-IO sequence tracker (cluster/sequence.py): deliver, duplicate, gap,
baseline, heartbeats, forgetting by stream time. Exact verdicts, then
hypothesis: any interleaving of several nodes' entries with losses, resends
and heartbeats."""

from hypothesis import given, settings, strategies as st

from cluster.sequence import SequenceTracker, Verdict

DATA, BEAT = False, True


def test_in_order_entries_are_delivered():
    tracker = SequenceTracker()
    assert tracker.observe("a", 1, DATA, 0.0) == Verdict(True, False, 0, True)
    assert tracker.observe("a", 2, DATA, 0.1) == Verdict(True, False, 0, False)
    assert tracker.observe("a", 3, DATA, 0.2) == Verdict(True, False, 0, False)
    assert (tracker.gaps, tracker.duplicates, tracker.peers) == (0, 0, 1)


def test_first_entry_seen_is_the_baseline():
    tracker = SequenceTracker()
    assert tracker.observe("a", 57, DATA, 0.0) == Verdict(True, False, 0, True)
    assert tracker.observe("a", 58, DATA, 0.0) == Verdict(True, False, 0, False)
    assert tracker.observe("b", 9, BEAT, 0.0) == Verdict(False, False, 0, True)
    assert tracker.observe("b", 10, DATA, 0.0) == Verdict(True, False, 0, False)
    assert tracker.gaps == 0


def test_resent_entries_are_duplicates():
    tracker = SequenceTracker()
    for seq in (1, 2, 3):
        tracker.observe("a", seq, DATA, 0.0)
    # a pipeline of 2, 3 resent after its reply was lost
    assert tracker.observe("a", 2, DATA, 0.0) == Verdict(False, True, 0, False)
    assert tracker.observe("a", 3, DATA, 0.0) == Verdict(False, True, 0, False)
    assert tracker.observe("a", 4, DATA, 0.0) == Verdict(True, False, 0, False)
    assert (tracker.duplicates, tracker.gaps) == (2, 0)


def test_a_skipped_number_is_a_gap_and_the_entry_still_delivered():
    tracker = SequenceTracker()
    tracker.observe("a", 1, DATA, 0.0)
    assert tracker.observe("a", 5, DATA, 0.0) == Verdict(True, False, 3, False)
    assert tracker.observe("a", 6, DATA, 0.0) == Verdict(True, False, 0, False)
    assert (tracker.gaps, tracker.missing) == (1, 3)


def test_heartbeats_reveal_lost_last_entries():
    tracker = SequenceTracker()
    tracker.observe("a", 1, DATA, 0.0)
    assert tracker.observe("a", 1, BEAT, 1.0) == Verdict(False, False, 0, False)
    assert tracker.observe("a", 0, BEAT, 1.0) == Verdict(False, False, 0, False)  # stale resend
    # entries 2 and 3 never arrived (lost, or burnt by a full outbox): the heartbeat says so
    assert tracker.observe("a", 3, BEAT, 2.0) == Verdict(False, False, 2, False)
    assert tracker.observe("a", 4, DATA, 2.5) == Verdict(True, False, 0, False)
    assert (tracker.gaps, tracker.missing) == (1, 2)


def test_silent_peers_are_forgotten_by_stream_time_and_remembered():
    tracker = SequenceTracker(forget_after=5.0)
    tracker.observe("a", 1, DATA, 10.0)
    tracker.observe("b", 1, DATA, 10.0)
    tracker.observe("b", 1, BEAT, 14.0)
    assert tracker.expire(15.0) == []
    assert tracker.expire(15.1) == ["a"]
    assert tracker.peers == 1
    assert tracker.last_seq("a") == 1
    # a comes back: it is a peer again, and its numbers are checked against the old ones
    assert tracker.observe("a", 3, DATA, 16.0) == Verdict(True, False, 1, True)
    assert tracker.peers == 2


def test_a_returning_peer_without_a_gap_is_fine():
    tracker = SequenceTracker(forget_after=1.0)
    tracker.observe("a", 4, DATA, 0.0)
    tracker.expire(2.0)
    assert tracker.observe("a", 5, DATA, 3.0) == Verdict(True, False, 0, True)
    assert tracker.gaps == 0


def test_forgotten_memory_is_bounded():
    tracker = SequenceTracker(forget_after=1.0, remember=3)
    for i in range(5):
        tracker.observe(f"n{i}", 1, DATA, 0.0)
    tracker.expire(2.0)
    assert tracker.peers == 0
    assert [tracker.last_seq(f"n{i}") for i in range(5)] == [None, None, 1, 1, 1]


# --- properties ------------------------------------------------------------------

@st.composite
def streams(draw):
    """Several nodes' published streams, damaged the way a backbone damages
    them, and interleaved: returns (events in stream order, per-node facts).

    Each node publishes data entries 1..N with heartbeats (carrying the last
    number) in between. Some entries are lost; some are resent later (a
    retried XADD: a copy appears after its original, anywhere later in that
    node's stream). One node's order is kept; nodes interleave freely."""
    nodes = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    per_node = {}
    for node in nodes:
        count = draw(st.integers(1, 25))
        published = []
        for seq in range(1, count + 1):
            if draw(st.booleans()) and draw(st.booleans()):
                published.append((seq - 1, BEAT))
            published.append((seq, DATA))
        if draw(st.booleans()):
            published.append((count, BEAT))
        lost = draw(st.sets(st.integers(0, len(published) - 1), max_size=len(published) // 3))
        events = [event for i, event in enumerate(published) if i not in lost]
        for _ in range(draw(st.integers(0, 4))):  # resends, each after its original
            if not events:
                break
            i = draw(st.integers(0, len(events) - 1))
            j = draw(st.integers(i + 1, len(events)))
            events.insert(j, events[i])
        per_node[node] = events
    order = []  # interleave, keeping each node's own order
    queues = {node: list(events) for node, events in per_node.items() if events}
    while queues:
        node = draw(st.sampled_from(sorted(queues)))
        order.append((node, *queues[node].pop(0)))
        if not queues[node]:
            del queues[node]
    return order, per_node


@settings(max_examples=300, deadline=None)
@given(streams())
def test_delivery_is_exactly_once_in_order_and_every_loss_is_a_gap(case):
    order, per_node = case
    tracker = SequenceTracker()
    delivered = {node: [] for node in per_node}
    missing = {node: 0 for node in per_node}
    duplicates = 0
    for now, (node, seq, heartbeat) in enumerate(order):
        verdict = tracker.observe(node, seq, heartbeat, float(now))
        assert not (verdict.deliver and verdict.duplicate)
        if verdict.deliver:
            delivered[node].append(seq)
        duplicates += verdict.duplicate
        missing[node] += verdict.missing
    for node, events in per_node.items():
        if not events:
            continue
        seqs = delivered[node]
        # exactly once, in order
        assert seqs == sorted(set(seqs))
        # every data entry that arrived, from the baseline on, was delivered once
        first, first_beat = events[0]
        baseline = first if first_beat else first - 1
        arrived = sorted({seq for seq, beat in events if not beat and seq > baseline})
        assert seqs == arrived
        # what is missing is exactly the numbers that the node's stream covers
        # (up to its highest number seen) but that never arrived: never silent
        highest = max(seq for seq, _ in events)
        assert missing[node] == len(set(range(baseline + 1, highest + 1)) - set(arrived))
    assert tracker.duplicates == duplicates
    assert tracker.missing == sum(missing.values())
    assert tracker.peers == len([n for n, events in per_node.items() if events])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 3)), min_size=1, max_size=40))
def test_a_peer_is_live_exactly_while_heard_within_forget_after(arrivals):
    tracker = SequenceTracker(forget_after=2.0)
    now = 0.0
    heard = {}
    seqs = {}
    for node, step in arrivals:
        now += step
        tracker.expire(now)
        seqs[node] = seqs.get(node, 0) + 1
        verdict = tracker.observe(node, seqs[node], DATA, now)
        assert verdict.missing == 0  # forgetting never makes up a gap, nor hides one
        assert verdict.new_peer == (node not in heard or now - heard[node] > 2.0)
        heard[node] = now
        assert tracker.peers == sum(1 for t in heard.values() if now - t <= 2.0)
