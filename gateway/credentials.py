"""SMTP AUTH credentials: a users file with scrypt hashes, as a twisted.cred
checker, and the per-IP/per-user failure counter that throttles guessing.

Why scrypt from the stdlib: a slow, salted, memory-hard hash with no new
dependency.  Verifying it costs tens of milliseconds, so it always runs in
a thread (C{run_in_thread}); the reactor never waits for it.  The file is
re-read when its mtime or size changes, so C{gatewayctl user add} takes
effect without a restart.  Unknown users cost the same time as known ones
(a dummy hash is checked), so the reply time does not tell which exist.

Other back ends (LDAP, IMAP, PAM, ...) plug in through Twisted's own
checker plug-ins: C{[auth] checker = "NAME:ARGS"} is handed to
C{twisted.cred.strcred.makeChecker}, which finds C{ICheckerFactory}
plug-ins in C{twisted/plugins/}.

File format, one user per line: C{name:scrypt$N$r$p$SALT$HASH} (base64);
blank lines and C{#} comments are ignored.

Standards: RFC 4954 §4 (AUTH), RFC 4616 (PLAIN), RFC 7914 (scrypt).
See also: twisted.cred.checkers; Postfix smtpd_sasl_*; dovecot passdb.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from collections import deque
from typing import Any, Callable

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_LENGTH = 2**14, 8, 1, 32


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line (message says where)."""


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash in the users-file format."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_LENGTH)
    b64 = lambda b: base64.b64encode(b).decode("ascii")
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check C{password} against a stored hash in constant time.  Blocking."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt),
                                n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY = hash_password(secrets.token_hex(8))


class UsersFile:
    """The users file: read (cached until it changes) and edited atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def users(self) -> dict[str, str]:
        """Name -> hash, re-read when the file changed.  Blocking (small)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._users = self._parse()
            self._stamp = stamp
        return self._users

    def _parse(self) -> dict[str, str]:
        users = {}
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, encoded = line.rpartition(":")
                if not sep or not name or not encoded.startswith("scrypt$"):
                    raise UsersFileError(f"{self.path}:{number}: expected NAME:scrypt$...")
                users[name] = encoded
        return users

    def _write(self, users: dict[str, str]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write("# mailgateway users: NAME:scrypt hash (gatewayctl user add|passwd|del)\n")
                for name in sorted(users):
                    handle.write(f"{name}:{users[name]}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def set(self, name: str, password: str, *, must_exist: bool | None = None) -> None:
        """Add or change a user (C{must_exist}: True for passwd, False for add)."""
        if not name or ":" in name or any(c.isspace() for c in name):
            raise ValueError("a user name must not be empty or contain ':' or spaces")
        users = dict(self.users())
        if must_exist is True and name not in users:
            raise KeyError(name)
        if must_exist is False and name in users:
            raise ValueError(f"user {name} exists (use passwd)")
        users[name] = hash_password(password)
        self._write(users)

    def delete(self, name: str) -> None:
        users = dict(self.users())
        if name not in users:
            raise KeyError(name)
        del users[name]
        self._write(users)


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """A twisted.cred checker over a L{UsersFile}; hashing runs in a thread."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, users_file: UsersFile, run_in_thread: Callable[..., defer.Deferred]) -> None:
        self.users_file = users_file
        self.run_in_thread = run_in_thread

    def _check(self, username: str, password: str) -> str:
        encoded = self.users_file.users().get(username)
        if encoded is None:
            verify_password(password, _DUMMY)
            raise UnauthorizedLogin("bad credentials")
        if not verify_password(password, encoded):
            raise UnauthorizedLogin("bad credentials")
        return username

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return self.run_in_thread(self._check, username, password)


class FailureCounter:
    """Counts AUTH failures per client IP and per user in a sliding window.

    Past C{delay_after} failures each further 535 is delayed (growing, capped);
    past C{max_failures} AUTH is refused (454 4.7.0) until the window has
    room again.

    @param clock: C{seconds()} provider (IReactorTime), for tests.
    """

    def __init__(self, clock: Any, *, window: float = 600.0, delay_after: int = 3,
                 max_failures: int = 10, delay: float = 1.0, max_delay: float = 10.0) -> None:
        self.clock = clock
        self.window = window
        self.delay_after = delay_after
        self.max_failures = max_failures
        self.delay = delay
        self.max_delay = max_delay
        self._events: dict[str, deque[float]] = {}

    def _count(self, key: str) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        cutoff = self.clock.seconds() - self.window
        while events and events[0] < cutoff:
            events.popleft()
        if not events:
            del self._events[key]
            return 0
        return len(events)

    def failures(self, ip: str, user: str | None = None) -> int:
        """The larger of the IP's and the user's recent failure counts."""
        counts = [self._count("ip:" + ip)]
        if user:
            counts.append(self._count("user:" + user))
        return max(counts)

    def blocked(self, ip: str, user: str | None = None) -> bool:
        """True when AUTH must be refused for now."""
        return self.failures(ip, user) >= self.max_failures

    def record(self, ip: str, user: str | None) -> float:
        """Count a failure; return how long to delay the reply."""
        now = self.clock.seconds()
        keys = ["ip:" + ip] + (["user:" + user] if user else [])
        for key in keys:
            self._events.setdefault(key, deque()).append(now)
            if len(self._events) > 100_000:
                self._events.pop(next(iter(self._events)))
        over = self.failures(ip, user) - self.delay_after
        return 0.0 if over <= 0 else min(self.max_delay, self.delay * over)
