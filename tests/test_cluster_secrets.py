"""Secrets off the command line, and fail fast on what waiting cannot fix
(issue #20, items 1 and 2).

Real redis-server processes with a password (requirepass) and per-node ACL
users, real `a2/mychatserver.py` nodes whose URL comes from $CHAT_BACKBONE
and whose password from $REDIS_PASSWORD. The secret is looked for in
everything a person or another user of the machine can see: the process's
command line (what ps shows), its stdout and stderr, /metrics; on success
and on every error path, where the server must print one line and exit 2.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.config import BackboneConfig, BackboneConfigError, redact, remember_secret
from cluster.local import Node, RedisServer, free_port
from conftest import ROOT, SERVER_SCRIPT, Peer, wait_until

pytestmark = pytest.mark.timeout(40)

SECRET = "s3cret-Pa55word"          # the default user's password (requirepass)
NODE2_SECRET = "n0de2-Only-Secret"  # an ACL user's, for one node
ACL_NODE2 = ["user", "node2", "on", f">{NODE2_SECRET}", "~chat:*", "resetchannels", "-@all",
             "+xadd", "+xread", "+xrange", "+xinfo|stream", "+info", "+ping", "+hello", "+auth",
             "+select"]  # what cluster/README.md says a node needs (no CLIENT SETINFO in Redis 7.0)


def clean_env(**extra):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("REDIS_", "CHAT_BACKBONE"))}
    env.update(extra)
    return env


def assert_no_secret(*texts):
    for text in texts:
        for secret in (SECRET, NODE2_SECRET):
            assert secret not in text, f"a secret in {text[-400:]!r}"


@pytest.fixture
def locked_redis():
    with RedisServer(appendonly=False, args=["--requirepass", SECRET]) as server:
        import redis
        admin = redis.Redis(port=server.port, password=SECRET)
        admin.execute_command("ACL", "SETUSER", *ACL_NODE2[1:])
        admin.close()
        yield server


def metrics_text(node):
    line = next(line for line in node.lines if line.startswith("Metrics on "))
    with urllib.request.urlopen(line.split()[-1], timeout=5) as response:
        return response.read().decode()


def test_redact_masks_url_passwords_and_every_remembered_secret():
    remember_secret("remembered-Secret-1")
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://user:p%40ss@h:1/0?x=1") == "redis://user:***@h:1/0?x=1"
    assert redact("redis+sentinel://u:pw@a:1,b:2/m") == "redis+sentinel://u:***@a:1,b:2/m"
    assert redact("http://u:pw@host/x and rediss://:pw2@h2") == "http://u:***@host/x and rediss://:***@h2"
    assert redact("AUTH failed for remembered-Secret-1.") == "AUTH failed for ***."
    assert redact("redis://h:6379/0?a=b@c") == "redis://h:6379/0?a=b@c"  # no userinfo: unchanged


@pytest.mark.parametrize("url, complaint", [
    ("redis://:{s}@127.0.0.1:1/0?maxlen=abc", "maxlen must be an integer"),
    ("redis://:{s}@127.0.0.1:1/0?maxlen=0", "maxlen must be at least 1"),
    ("http://:{s}@127.0.0.1:1/0", "must start with redis://"),
    ("redis://:{s}@127.0.0.1:1/0?socket_timeout=abc", "socket_timeout"),
    ("redis://:{s}@127.0.0.1:1/0?no_such_option=1", "an option redis-py does not know"),
    ("redis://:{s}@127.0.0.1:port/0", "Port could not be cast to integer"),
    ("redis+sentinel://:{s}@127.0.0.1:x,h:2/m", "bad sentinel address"),
    ("redis+sentinel://:{s}@127.0.0.1:26379", "MASTER"),
    ("redis+sentinel://:{s}@127.0.0.1:26379/m/x", "database must be a number"),
    ("redis+sentinel://127.0.0.1:26379/m?socket_timeout=1", "unknown option 'socket_timeout'"),
])
def test_a_malformed_url_is_a_config_error_without_its_secret(url, complaint):
    with pytest.raises(BackboneConfigError) as error:
        BackboneConfig(url.format(s=SECRET), {}, "--backbone")
    assert complaint in str(error.value)
    assert_no_secret(str(error.value))


def test_sentinel_urls_and_secrets_from_the_environment():
    env = {"REDIS_PASSWORD": SECRET, "REDIS_USERNAME": "node1", "REDIS_SENTINEL_PASSWORD": NODE2_SECRET}
    config = BackboneConfig("redis+sentinel://h1:1,[::1]:2,h3/mymaster/3?stream=r&maxlen=50", env,
                            "CHAT_BACKBONE")
    assert (config.kind, config.sentinels, config.service, config.db) == (
        "sentinel", [("h1", 1), ("::1", 2), ("h3", 26379)], "mymaster", 3)
    assert (config.stream, config.maxlen, config.username, config.password) == ("r", 50, "node1", SECRET)
    assert config.sentinel_password == NODE2_SECRET
    assert config.describe() == ("redis+sentinel://h1:1,[::1]:2,h3/mymaster/3?stream=r&maxlen=50 "
                                 "(URL from CHAT_BACKBONE; password from REDIS_PASSWORD; user from "
                                 "REDIS_USERNAME; sentinels' password from REDIS_SENTINEL_PASSWORD)")
    plain = BackboneConfig(f"redis://:{SECRET}@h:1/0", {"REDIS_PASSWORD": "an-0ther-Env-Secret"}, "--backbone")
    assert plain.password == SECRET  # the URL's wins
    assert plain.describe() == ("redis://:***@h:1/0 (URL from --backbone; password from the command "
                                "line, visible to ps: use REDIS_PASSWORD instead)")


def test_password_from_the_environment_reaches_nowhere_visible(locked_redis):
    """Two nodes, the URL from $CHAT_BACKBONE, node 1 with the default user's
    password from $REDIS_PASSWORD, node 2 as its own ACL user: they chat,
    and no secret is in ps, stdout, stderr or /metrics."""
    url = locked_redis.url()
    node1 = Node(None, args=["--metrics-port", "0"], env=clean_env(CHAT_BACKBONE=url, REDIS_PASSWORD=SECRET))
    node2 = Node(None, args=["--metrics-port", "0"], env=clean_env(
        CHAT_BACKBONE=url, REDIS_USERNAME="node2", REDIS_PASSWORD=NODE2_SECRET))
    peers = []
    try:
        for node in (node1, node2):
            wait_until(lambda: node.count("Backbone: connected to Redis"), timeout=10)
        wait_until(lambda: node1.count(f"hearing node {node2.node_id}")
                   and node2.count(f"hearing node {node1.node_id}"), timeout=10)
        peers = [Peer(node1.address), Peer(node2.address)]
        wait_until(lambda: node1.count("New connection") and node2.count("New connection"))
        peers[0].send("hello with a password\n")
        peers[1].expect(f"{peers[0].port}: hello with a password\n", timeout=10)
        assert node1.count(f"on {url} (URL from CHAT_BACKBONE; password from REDIS_PASSWORD)") == 1
        assert node2.count(f"on {url} (URL from CHAT_BACKBONE; password from REDIS_PASSWORD; "
                           f"user from REDIS_USERNAME)") == 1
        for node in (node1, node2):
            with open(f"/proc/{node.proc.pid}/cmdline", "rb") as cmdline:
                assert_no_secret(cmdline.read().decode())
            text = metrics_text(node)
            assert "chat_backbone_connected 1.0" in text
            assert_no_secret(text)
    finally:
        for peer in peers:
            peer.close()
        for node in (node1, node2):
            node.stop()
    assert node1.proc.returncode == node2.proc.returncode == 0
    assert_no_secret("\n".join(node1.lines + node2.lines))


def run_server(*args, env, timeout=10):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--port", "0", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return done, time.monotonic() - started


def assert_fails_fast(done, seconds, words):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert seconds < 5, seconds
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Cannot use the backbone: "), done.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert "Server listening" not in done.stdout
    assert_no_secret(done.stdout, done.stderr)


def test_every_error_path_exits_2_in_one_line_without_the_secret(locked_redis):
    url = locked_redis.url()
    cases = [  # (args, env, words in the one line)
        ((), clean_env(CHAT_BACKBONE=url, REDIS_PASSWORD=SECRET + "x"), "Redis refused the credentials"),
        ((), clean_env(CHAT_BACKBONE=url), "Redis refused the credentials"),  # none given (NOAUTH)
        ((), clean_env(CHAT_BACKBONE=url, REDIS_USERNAME="nobody", REDIS_PASSWORD=SECRET),
         "Redis refused the credentials"),
        (("--backbone", url.replace("redis://", f"redis://node2:{NODE2_SECRET}x@")), clean_env(),
         "Redis refused the credentials"),
        (("--backbone", locked_redis.url(stream="elsewhere")),
         clean_env(REDIS_USERNAME="node2", REDIS_PASSWORD=NODE2_SECRET), "may not run"),  # ACL: ~chat:* only
        (("--backbone", url.replace("redis://", f"redis://:{SECRET}@") + "?maxlen=abc"), clean_env(),
         "maxlen must be an integer"),
        (("--backbone", url.replace("redis://", f"http://:{SECRET}@")), clean_env(), "must start with"),
        ((), clean_env(CHAT_BACKBONE=url.replace("redis://", f"redis://:{SECRET}@") + "?socket_timeout=abc"),
         "socket_timeout"),
        (("--backbone", url.replace("redis://", f"redis://:{SECRET}@") + "?foo=bar"), clean_env(),
         "an option redis-py does not know"),
    ]
    for args, env, words in cases:
        done, seconds = run_server(*args, env=env)
        assert_fails_fast(done, seconds, words)


def test_redis_url_alone_is_named_and_not_used(server_process):
    server = server_process(env=clean_env(REDIS_URL=f"redis://:{SECRET}@127.0.0.1:1/0"))
    server.wait_for_error("REDIS_URL is set but not used: this server runs alone")
    status, lines, errors = server.stop()
    assert status == 0 and not any("Backbone" in line for line in lines)
    assert_no_secret("\n".join(lines), errors)


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server on a TLS port with a certificate made here for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (Debian: apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    port = free_port()
    server = RedisServer(port=port, appendonly=False, args=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"])
    server.start(ready=lambda: _tls_ready(port, cert))
    try:
        yield port, cert
    finally:
        server.stop()


def _tls_ready(port, cert):
    import ssl
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def test_a_certificate_that_does_not_verify_exits_2_and_one_that_does_connects(tls_redis):
    port, cert = tls_redis
    done, seconds = run_server("--backbone", f"rediss://:{SECRET}@127.0.0.1:{port}/0", env=clean_env())
    assert_fails_fast(done, seconds, "the TLS certificate does not verify")
    node = Node(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", args=["--quiet"], env=clean_env())
    try:
        wait_until(lambda: node.count("Backbone: connected to Redis"), timeout=10)
    finally:
        node.stop()
    assert node.proc.returncode == 0
