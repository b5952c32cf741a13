"""Where the backbone connects and with which secrets: the URL, the
environment, the fail-fast check, and the one redaction function.

Why it exists (issue #20): a password on the command line is visible to
every `ps`; a URL printed in an error message leaked it; a wrong password
was retried forever; Sentinel was refused. This module turns the URL (from
--backbone, or the whole of it from $CHAT_BACKBONE) and the environment
into a BackboneConfig that makes redis-py clients, one per thread, for a
plain Redis or for the master that Redis Sentinel names.

Secrets: the password (and user) come from the URL or, when it has none,
from REDIS_PASSWORD / REDIS_USERNAME; the sentinels' own from
REDIS_SENTINEL_PASSWORD / REDIS_SENTINEL_USERNAME. Every secret seen here
is remembered, and redact() - the only function that turns a URL or an
error into text for a person - masks it wherever it appears, as well as the
password part of any URL. Nothing here logs: the caller shows what redact()
returns.

Errors that waiting cannot fix (a malformed URL, credentials Redis
refuses, a certificate that does not verify, a user without the needed
commands) raise BackboneConfigError (a ValueError): the server prints its
one line and exits with status 2. A Redis that is down or restarting is
not such an error: the backbone retries it.
"""

import ipaddress
import re
import urllib.parse

ENV_URL = "CHAT_BACKBONE"
ENV_USERNAME = "REDIS_USERNAME"
ENV_PASSWORD = "REDIS_PASSWORD"
ENV_SENTINEL_USERNAME = "REDIS_SENTINEL_USERNAME"
ENV_SENTINEL_PASSWORD = "REDIS_SENTINEL_PASSWORD"

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
OUR_OPTIONS = ("stream", "maxlen", "outbox")  # the backbone's own, removed before redis-py sees the URL

# A secret this short is masked in URLs only: masking every "ab" in every
# line would garble the logs without hiding anything worth hiding.
MIN_MASKED_SECRET = 4
MASK = "***"


class BackboneConfigError(ValueError):
    """A backbone setting that waiting cannot fix: the server exits with
    status 2. Its message never holds a secret."""


# --- the one redaction function ------------------------------------------------------

_secrets = set()
# scheme://user:password@  (the password ends at the last "@" before the path)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<password>[^\s/]*)@")


def remember_secret(value):
    """From now on redact() masks `value` (and its URL-decoded form) anywhere."""
    if value:
        _secrets.add(value)
        _secrets.add(urllib.parse.unquote(value))


def redact(text):
    """`text` (a URL, an error, a log line) without any secret: every
    remembered secret becomes ***, and so does the password of any URL in it."""
    text = str(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        if len(secret) >= MIN_MASKED_SECRET:
            text = text.replace(secret, MASK)
    return _URL_PASSWORD.sub(lambda match: f"{match['head']}:{MASK}@", text)


def _remember_url_secrets(url):
    """Remember the password of `url` before anything else looks at it, so
    that even the error about a malformed URL cannot show it."""
    try:
        rest = url.split("://", 1)[1]
    except IndexError:
        return
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo = netloc.rpartition("@")[0]
    if ":" in userinfo:
        remember_secret(userinfo.split(":", 1)[1])


# --- the configuration ---------------------------------------------------------------

class BackboneConfig:
    """A parsed backbone URL plus the secrets from the environment.

    kind: "redis" (redis://, rediss://, unix://) or "sentinel"
    (redis+sentinel://). shown: the URL as a person may see it (redacted).
    stream, maxlen, budget: the backbone's own options."""

    def __init__(self, url, env, source):
        _remember_url_secrets(url)
        for name in (ENV_PASSWORD, ENV_SENTINEL_PASSWORD):
            remember_secret(env.get(name))
        self.source = source
        self.shown = redact(url)
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme == SENTINEL_SCHEME:
            self.kind = "sentinel"
            rest = url.split("://", 1)[1]
        elif scheme in PLAIN_SCHEMES:
            self.kind = "redis"
            rest = None
        else:
            raise BackboneConfigError(
                f"{self.shown}: must start with redis://, rediss://, unix:// "
                f"or {SENTINEL_SCHEME}://")
        query = urllib.parse.urlsplit(url).query if rest is None else rest.partition("?")[2]
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        ours = {key: value for key, value in pairs if key in OUR_OPTIONS}
        others = [(key, value) for key, value in pairs if key not in OUR_OPTIONS]
        self.stream = ours.get("stream", "chat:room")
        self.maxlen = self._positive(ours, "maxlen")
        self.budget = self._positive(ours, "outbox")
        if not self.stream:
            raise BackboneConfigError(f"{self.shown}: stream must not be empty")
        self.notes = []  # where the secrets came from, for the start-up line
        if self.kind == "redis":
            self._parse_plain(url, others, env)
        else:
            self._parse_sentinel(rest, others, env)

    def _positive(self, ours, name):
        from cluster import backbone  # the defaults live with the limits they belong to
        default = {"maxlen": backbone.DEFAULT_MAXLEN, "outbox": backbone.DEFAULT_OUTBOX_BUDGET}[name]
        text = ours.get(name, str(default))
        try:
            value = int(text)
        except ValueError:
            raise BackboneConfigError(f"{self.shown}: {name} must be an integer, "
                                      f"got {redact(text)!r}") from None
        if value < 1:
            raise BackboneConfigError(f"{self.shown}: {name} must be at least 1, got {value}")
        return value

    def _credentials(self, username, password, env, user_var, password_var, whose):
        """The URL's user/password, else the environment's; notes where each came from."""
        if password:
            if self.source == "--backbone":
                self.notes.append(f"{whose}password from the command line, visible to ps: "
                                  f"use {password_var} instead")
        elif env.get(password_var):
            password = env[password_var]
            self.notes.append(f"{whose}password from {password_var}")
        if not username and env.get(user_var):
            username = env[user_var]
            self.notes.append(f"{whose}user from {user_var}")
        return username or None, password or None

    def _parse_plain(self, url, others, env):
        from redis.connection import parse_url as redis_parse_url
        parts = urllib.parse.urlsplit(url)
        self.redis_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(others)))
        try:
            options = redis_parse_url(self.redis_url)  # checks redis-py's own options' values; no I/O
        except (ValueError, TypeError) as exc:
            raise BackboneConfigError(f"{self.shown}: {redact(exc)}") from None
        try:  # and their names: a connection object is made (no I/O) and dropped
            import redis
            pool = redis.ConnectionPool.from_url(self.redis_url)
            pool.make_connection()
            pool.disconnect()
        except TypeError as exc:
            raise BackboneConfigError(f"{self.shown}: an option redis-py does not know "
                                      f"({redact(exc)})") from None
        self.username, self.password = self._credentials(
            options.get("username"), options.get("password"), env, ENV_USERNAME, ENV_PASSWORD, "")

    def _parse_sentinel(self, rest, others, env):
        """redis+sentinel://[user[:password]@]HOST[:PORT],HOST[:PORT].../MASTER[/DB]"""
        if others:
            raise BackboneConfigError(
                f"{self.shown}: unknown option {others[0][0]!r} "
                f"(a {SENTINEL_SCHEME} URL takes only {', '.join(OUR_OPTIONS)})")
        netloc, _, path = rest.partition("?")[0].partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        self.sentinels = [self._host_port(item) for item in hosts.split(",")]
        names = [urllib.parse.unquote(piece) for piece in path.split("/") if piece != ""]
        if not names or len(names) > 2:
            raise BackboneConfigError(f"{self.shown}: expected "
                                      f"{SENTINEL_SCHEME}://HOST:PORT,HOST:PORT,.../MASTER[/DB]")
        self.service = names[0]
        try:
            self.db = int(names[1]) if len(names) == 2 else 0
            if self.db < 0:
                raise ValueError
        except ValueError:
            raise BackboneConfigError(f"{self.shown}: the database must be a number "
                                      f"at least 0, got {names[1]!r}") from None
        self.username, self.password = self._credentials(
            urllib.parse.unquote(username), urllib.parse.unquote(password), env,
            ENV_USERNAME, ENV_PASSWORD, "")
        self.sentinel_username = env.get(ENV_SENTINEL_USERNAME) or None
        self.sentinel_password = env.get(ENV_SENTINEL_PASSWORD) or None
        if self.sentinel_password:
            self.notes.append(f"sentinels' password from {ENV_SENTINEL_PASSWORD}")

    def _host_port(self, item):
        item = item.strip()
        if item.startswith("["):  # [IPv6]:PORT
            host, _, port = item[1:].partition("]")
            port = port[1:] if port.startswith(":") else ""
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host, port = item, ""
        try:
            if host.count(":") > 1:
                ipaddress.ip_address(host)
            port = int(port) if port else DEFAULT_SENTINEL_PORT
            if not host or not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise BackboneConfigError(f"{self.shown}: bad sentinel address "
                                      f"{redact(item)!r} (expected HOST:PORT)") from None
        return host, port

    def describe(self):
        """The URL and where it and its secrets came from, for the start-up line."""
        return f"{self.shown} (URL from {self.source}{''.join('; ' + note for note in self.notes)})"

    # --- clients --------------------------------------------------------------------

    def client(self, options):
        """A new redis-py client (its own pool, so its own connection) with
        `options` (timeouts, retry, connect hook): for a plain URL the
        server it names, for Sentinel the master the sentinels name on each
        connect. No I/O yet."""
        import redis
        credentials = {key: value for key, value in
                       (("username", self.username), ("password", self.password)) if value}
        if self.kind == "redis":
            return redis.Redis.from_url(self.redis_url, **credentials, **options)
        sentinel = self.sentinel(options)
        client = sentinel.master_for(self.service, db=self.db, **credentials, **options)
        client.chat_sentinel = sentinel  # closed with it: see close_client()
        return client

    def sentinel(self, options):
        """A redis-py Sentinel over this URL's sentinels, with the sentinels'
        own credentials and the same timeouts and retry policy."""
        from redis.sentinel import Sentinel
        sentinel_options = {key: value for key, value in options.items()
                            if key.startswith("socket_") or key == "retry"}
        if self.sentinel_username:
            sentinel_options["username"] = self.sentinel_username
        if self.sentinel_password:
            sentinel_options["password"] = self.sentinel_password
        return Sentinel(self.sentinels, sentinel_kwargs=sentinel_options)


def describe(exc, limit=300):
    """An error as one short line without secrets (redis-py's "No master
    found" lists every sentinel client's whole repr: cut after its first part)."""
    text = str(exc) or type(exc).__name__
    if type(exc).__name__ == "MasterNotFoundError":
        text = text.split(" : ", 1)[0] + " (no sentinel answered, or none names a live master)"
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + "..."


def close_client(client):
    """Close a client from BackboneConfig.client() (and its sentinels' connections)."""
    for closable in (client, getattr(client, "chat_sentinel", None)):
        try:
            if closable is not None:
                closable.close()
        except Exception:
            pass


def fatal_reason(exc):
    """Why waiting cannot fix `exc`, or None: credentials Redis refused, a
    certificate that does not verify, a command the user may not run."""
    import ssl

    import redis
    if isinstance(exc, redis.AuthenticationError):
        return "Redis refused the credentials"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "the Redis user may not run the backbone's commands (see cluster/README.md, ACL)"
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(("WRONGPASS", "NOAUTH")):
        return "Redis refused the credentials"
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "the TLS certificate does not verify"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, redis.ConnectionError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "the TLS certificate does not verify"
    return None

