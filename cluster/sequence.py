"""Which peers' entries to deliver, drop as duplicates, or report as a gap.

Sans-IO (like a2's MessageFramer and h11): no Redis, no sockets, no clock of
its own. The backbone's reader thread owns one SequenceTracker and feeds it,
in stream order, the (node id, sequence number, kind) of every entry it
reads, plus the entry's stream time; the tracker answers what to do. That
makes the rules below unit- and property-tested without any I/O
(tests/test_cluster_sequence.py).

The rules (the wire format is in cluster/README.md):

* Every publishing node numbers its data entries 1, 2, 3, ... (per process
  start; the node id is random per start, so a restarted node is a new peer).
  A heartbeat carries the number of the node's last data entry (0 before the
  first): "everything up to here has been published". A number the node
  burnt without publishing (its outbox was over budget) shows up as a gap.
* The first entry seen from a node sets its baseline: a node joins the
  stream at its current end, and a peer's earlier history is not ours.
* After that, for a node whose last number is L:
    data entry S == L + 1      deliver
    data entry S <= L          duplicate (a resent XADD): drop, count
    data entry S >  L + 1      gap of S - L - 1 entries, then deliver S
    heartbeat  H == L          nothing to do
    heartbeat  H <  L          stale (a resent heartbeat): nothing to do
    heartbeat  H >  L          gap of H - L entries
* A node not heard from for `forget_after` seconds of *stream time* is
  forgotten: it no longer counts as a peer. Stream time, not the local
  clock: a reader that was stopped (SIGSTOP, swap, GC) and catches up on a
  backlog must not forget a peer whose heartbeats are in that backlog and
  then take its jumped numbers for a fresh start. A forgotten node's last
  number is still remembered (the newest `remember` of them), so a node
  that comes back after a gap is still caught.
"""

import collections

DEFAULT_FORGET_AFTER = 3.0   # seconds of stream time: three heartbeats (every ~1 s) missed
DEFAULT_REMEMBER = 1024      # forgotten nodes whose last number is kept (bounded memory)


class Verdict(collections.namedtuple("Verdict", "deliver duplicate missing new_peer")):
    """What to do with one entry.

    deliver:   relay its messages to the local clients
    duplicate: it was seen before; dropped
    missing:   entries of this node that can no longer arrive (> 0: a gap)
    new_peer:  the first entry seen from this node (or after it was forgotten)
    """


class SequenceTracker:
    """Per-peer last sequence numbers; see the module docstring for the rules."""

    def __init__(self, forget_after=DEFAULT_FORGET_AFTER, remember=DEFAULT_REMEMBER):
        self.forget_after = forget_after
        self.remember = remember
        self._last = {}          # live peer -> its last data-entry number
        self._heard = {}         # live peer -> stream time it was last heard from
        self._forgotten = collections.OrderedDict()  # forgotten peer -> last number, oldest first
        self.duplicates = 0
        self.gaps = 0            # gap events (each may cover several entries)
        self.missing = 0         # entries lost in all gaps

    @property
    def peers(self):
        """Nodes heard from recently, this node excluded."""
        return len(self._last)

    def observe(self, node, seq, heartbeat, now):
        """One entry from `node` (never this node: the caller skips its own),
        read at stream time `now` (seconds). Returns a Verdict."""
        new_peer = node not in self._last
        if new_peer:
            if node in self._forgotten:
                self._last[node] = self._forgotten.pop(node)
            else:  # the baseline: what came before this entry is not ours
                self._last[node] = seq if heartbeat else seq - 1
        self._heard[node] = now
        last = self._last[node]
        covered = seq if heartbeat else seq - 1  # numbers published before this entry
        if covered < last:
            if heartbeat:  # a resent heartbeat: nothing new
                return Verdict(False, False, 0, new_peer)
            self.duplicates += 1
            return Verdict(False, True, 0, new_peer)
        missing = covered - last
        if missing:
            self.gaps += 1
            self.missing += missing
        self._last[node] = seq
        return Verdict(not heartbeat, False, missing, new_peer)

    def expire(self, now):
        """Forget peers not heard from since `now - forget_after`; returns them."""
        gone = [node for node, heard in self._heard.items() if now - heard > self.forget_after]
        for node in gone:
            del self._heard[node]
            self._forgotten[node] = self._last.pop(node)
            while len(self._forgotten) > self.remember:
                self._forgotten.popitem(last=False)
        return gone

    def last_seq(self, node):
        """The last number seen from `node` (live or remembered), or None."""
        if node in self._last:
            return self._last[node]
        return self._forgotten.get(node)
