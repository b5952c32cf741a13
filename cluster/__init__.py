"""cluster: several a2/mychatserver.py relay nodes sharing one chat room over Redis Streams.

Imported only by `a2/mychatserver.py --backbone URL` (or $CHAT_BACKBONE; a2/ stays
standard-library only):
- cluster/sequence.py  sans-IO: per-peer sequence numbers -> deliver, duplicate or gap;
- cluster/validate.py  sans-IO: every entry read is checked before it reaches a client;
- cluster/config.py    the URL (plain or Sentinel), secrets from the environment, redact();
- cluster/backbone.py  the Redis I/O: a publisher thread and a reader thread (needs `redis`);
- cluster/demo.py      one command: redis-server and N nodes on loopback, until Ctrl-C.
Design, wire format and guarantees: cluster/README.md.
"""
