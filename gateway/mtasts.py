# -*- test-case-name: tests.test_mtasts -*-
"""MTA-STS: discover, fetch, parse and cache a recipient domain's TLS policy.

Why: without it, a network attacker can strip STARTTLS or present any
certificate, and opportunistic TLS (RFC 7435) delivers anyway.  A domain
publishing MTA-STS says "only deliver to these MX hosts, over TLS with a
certificate valid for them"; the sender learns that once over HTTPS with
WebPKI validation and caches it, so a later attacker who controls DNS
cannot turn it off (trust on first use, bounded by C{max_age}).

Three layers, kept apart so each can be tested alone:

  - pure parsers: L{parse_txt} (the C{_mta-sts} TXT record),
    L{parse_policy} (the policy file) and L{Policy.matches} (MX patterns);
  - I/O through injected Twisted objects: L{lookup_txt} (twisted.names),
    L{PolicyFetcher} (twisted.web C{Agent}, no redirects, size cap,
    whole-fetch timeout);
  - the decision of RFC 8461 §5: L{PolicyResolver.policy_for}, over an
    L{IPolicyCache} (L{FilePolicyCache} by default).

What the relay client does with the answer (refuse MX hosts that do not
match, require verified TLS for C{enforce}, only report for C{testing}) is
not here: see L{Policy.matches} and the scheduler.

Failures carry a TLS-RPT result type (RFC 8460 §4.3.2.2) so reporting can
count them: L{PolicyError.result_type}.

Standards: RFC 8461 §3.1 (TXT record), §3.2 (policy), §3.3 (HTTPS
fetch: WebPKI, no redirects, 200 only, text/plain), §4.1 (MX matching),
§5 and §5.1 (policy discovery and cache update), §10.2 (size and time
limits); RFC 8460 §4.3.2.2 (failure result types); RFC 7405 (case-
sensitive ABNF strings).
See also: gateway.routing (MTA-STS applies to MX delivery, not to a
smarthost); gateway.tls.trust_root; Postfix's postfix-mta-sts-resolver
(the same split between resolver and MTA).
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import defer, protocol
from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import Interface, implementer

from gateway.dns import DNSPermanentError, DNSTemporaryError

#: RFC 8461 §3.2: the largest C{max_age} honoured (one year); larger is capped.
MAX_AGE_LIMIT = 31557600

#: RFC 8461 §3.3 suggests senders limit the policy body; 64 KiB is the
#: usual figure (and what most publishers document).
DEFAULT_MAX_SIZE = 64 * 1024

#: The well-known path of the policy file (RFC 8461 §3.2).
POLICY_PATH = "/.well-known/mta-sts.txt"

#: The longest CNAME chain followed for the TXT record.

#: PolicyError kinds, and the TLS-RPT result type each is reported as.
RESULT_TYPES = {
    "domain": "sts-policy-fetch-error",
    "connect": "sts-policy-fetch-error",
    "timeout": "sts-policy-fetch-error",
    "tls": "sts-webpki-invalid",
    "redirect": "sts-policy-fetch-error",
    "http-status": "sts-policy-fetch-error",
    "content-type": "sts-policy-fetch-error",
    "too-large": "sts-policy-fetch-error",
    "parse": "sts-policy-invalid",
}

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_TXT_STS_PREFIX = re.compile(r"v=STSv1(?=[ \t]*;|[ \t]*$)")
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


# -- Policy model --------------------------------------------------------------


class Mode(enum.Enum):
    """The C{mode} of a policy (RFC 8461 §5).

    C{ENFORCE}: deliver only to matching MX hosts over verified TLS.
    C{TESTING}: check as for enforce, report failures, deliver anyway.
    C{NONE}: the domain withdrew its policy; deliver as without one.
    """

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(ValueError):
    """A policy could not be had: the reason, and its kind.

    @ivar reason: a short human-readable text for logs (also C{str(self)}).
    @ivar kind: one of the keys of L{RESULT_TYPES}: C{"parse"} for a
        malformed policy, C{"tls"} for a certificate or handshake failure,
        C{"connect"}, C{"timeout"}, C{"redirect"}, C{"http-status"},
        C{"content-type"}, C{"too-large"}, C{"domain"} (not a domain name).
    """

    def __init__(self, reason: str, kind: str = "parse") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @property
    def result_type(self) -> str:
        """The TLS-RPT result type (RFC 8460 §4.3.2.2) for this failure:
        C{sts-policy-invalid}, C{sts-webpki-invalid} or
        C{sts-policy-fetch-error}."""
        return RESULT_TYPES.get(self.kind, "sts-policy-fetch-error")


def _host_text(name: str) -> str:
    """A comparable host name: lower case, no trailing dot, A-labels."""
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return name
    return name


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and len(labels) >= 1 and all(_LABEL.fullmatch(label) for label in labels)


def normalize_domain(domain: str) -> str:
    """The policy domain as used in DNS names, URLs and cache keys: lower
    case, no trailing dot, IDNA A-labels.

    @raise PolicyError: (kind C{"domain"}) for an address literal or
        anything that is not a host name, so nothing odd ever reaches a
        URL or a file name.
    """
    name = _host_text(domain)
    if not name or not _is_hostname(name):
        raise PolicyError(f"not a domain name: {domain!r}", "domain")
    return name


def policy_host(domain: str) -> str:
    """C{mta-sts.<domain>}, the host serving the policy (RFC 8461 §3.3)."""
    return "mta-sts." + normalize_domain(domain)


def policy_url(domain: str, port: int = 443) -> str:
    """The policy URL; the port appears only when it is not 443."""
    netloc = policy_host(domain) if port == 443 else f"{policy_host(domain)}:{port}"
    return f"https://{netloc}{POLICY_PATH}"


@dataclass(frozen=True)
class Policy:
    """A parsed MTA-STS policy (RFC 8461 §3.2).

    @ivar version: always C{"STSv1"}.
    @ivar mode: what to do on a mismatch.
    @ivar mx: the MX patterns, lower case, without trailing dot;
        C{"*.example.com"} is a wildcard for one label.
    @ivar max_age: seconds the policy may be cached; capped at
        L{MAX_AGE_LIMIT} on construction.
    """

    version: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "mx", tuple(_host_text(p) for p in self.mx))
        if self.max_age < 0:
            raise ValueError("max_age must not be negative")
        if self.max_age > MAX_AGE_LIMIT:
            object.__setattr__(self, "max_age", MAX_AGE_LIMIT)

    def matches(self, mx_host: str) -> bool:
        """Whether C{mx_host} is an MX host this policy allows (RFC 8461 §4.1).

        A pattern matches the same name (case-insensitive, trailing dot
        ignored); C{"*.example.com"} matches exactly one more label on the
        left: C{"mx1.example.com"}, never C{"example.com"} nor
        C{"a.b.example.com"}.
        """
        host = _host_text(mx_host)
        if not host:
            return False
        for pattern in self.mx:
            if pattern.startswith("*."):
                suffix = pattern[1:]  # ".example.com"
                if host.endswith(suffix):
                    first = host[: -len(suffix)]
                    if first and "." not in first:
                        return True
            elif host == pattern:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (cache files, C{gatewayctl mta-sts})."""
        return {"version": self.version, "mode": self.mode.value, "mx": list(self.mx), "max_age": self.max_age}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """The inverse of L{to_dict}.

        @raise ValueError, KeyError, TypeError: on a malformed dict.
        """
        return cls(version=str(data["version"]), mode=Mode(data["mode"]),
                   mx=tuple(str(m) for m in data["mx"]), max_age=int(data["max_age"]))


# -- Pure parsers --------------------------------------------------------------


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the TXT records at C{_mta-sts.<domain>}.

    RFC 8461 §3.1: records that do not start with C{v=STSv1} are ignored;
    when not exactly one remains, or that one is malformed, the domain has
    no policy available (C{None}).  The id is 1-32 letters and digits;
    other C{name=value} fields are allowed and ignored; a repeated id keeps
    the first (as §3.2 says for policy fields).

    @param records: one string per TXT record, its character-strings
        already concatenated (L{lookup_txt} does that).
    @return: the id, or None.
    """
    candidates = [r for r in records if _TXT_STS_PREFIX.match(r)]
    if len(candidates) != 1:
        return None
    record = candidates[0]
    fields = [f.strip(" \t") for f in record.split(";")]
    if fields[0] != "v=STSv1":
        return None
    rest = fields[1:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # the optional trailing ";"
    policy_id = None
    for item in rest:
        name, sep, value = item.partition("=")
        if not sep or not _TXT_EXT_NAME.fullmatch(name):
            return None
        if name == "id":
            if not _TXT_ID.fullmatch(value):
                return None
            if policy_id is None:
                policy_id = value
        elif not _TXT_EXT_VALUE.fullmatch(value):
            return None
    return policy_id


def _mx_pattern(value: str, line: int) -> str:
    pattern = value.rstrip(".").lower()
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise PolicyError(f"line {line}: mx {value!r} is not a domain name") from None
        pattern = ("*." if pattern.startswith("*.") else "") + name
    if not _is_hostname(name):
        raise PolicyError(f"line {line}: mx {value!r} is not a domain name or *.domain pattern")
    return pattern


def parse_policy(body: bytes) -> Policy:
    """Parse a policy file (RFC 8461 §3.2).

    C{key: value} lines separated by CRLF or LF; keys and the values
    C{STSv1}, C{enforce}, C{testing}, C{none} are case-sensitive (RFC
    7405 strings).  C{version: STSv1}, a valid C{mode} and C{max_age} (1
    to 10 digits, capped at L{MAX_AGE_LIMIT}) are required, and at least
    one C{mx} unless the mode is C{none}.  Unknown keys are ignored; a
    repeated key other than C{mx} keeps its first value.  Blank lines are
    tolerated.

    @raise PolicyError: with the reason, kind C{"parse"}.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy is not UTF-8 (byte {exc.start})") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(" \t"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {number}: not a 'key: value' line")
        if not _POLICY_KEY.fullmatch(key):
            raise PolicyError(f"line {number}: invalid key {key[:40]!r}")
        value = value.strip(" \t")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or not value:
            raise PolicyError(f"line {number}: empty value or control character in {key}")
        if key == "mx":
            mx.append(_mx_pattern(value, number))
        else:
            fields.setdefault(key, value)

    version = fields.get("version")
    if version is None:
        raise PolicyError("no version field")
    if version != "STSv1":
        raise PolicyError(f"unsupported version {version[:40]!r}")
    mode_text = fields.get("mode")
    if mode_text is None:
        raise PolicyError("no mode field")
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise PolicyError(f"invalid mode {mode_text[:40]!r}") from None
    max_age_text = fields.get("max_age")
    if max_age_text is None:
        raise PolicyError("no max_age field")
    if not _MAX_AGE.fullmatch(max_age_text):
        raise PolicyError(f"invalid max_age {max_age_text[:40]!r} (1 to 10 digits)")
    if not mx and mode is not Mode.NONE:
        raise PolicyError(f"no mx field in a {mode.value} policy")
    return Policy(version=version, mode=mode, mx=tuple(mx), max_age=int(max_age_text))


# -- Cache -----------------------------------------------------------------------


@dataclass
class CachedPolicy:
    """A policy as cached, with the TXT id it was fetched under.

    @ivar domain: the policy domain (normalized).
    @ivar policy_id: the C{id=} of the TXT record when it was fetched.
    @ivar fetched_at: C{clock.seconds()} of the successful fetch.
    @ivar expires_at: C{fetched_at + policy.max_age}.
    """

    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float
    expires_at: float

    def expired(self, now: float) -> bool:
        """Whether the policy may no longer be applied (RFC 8461 §5.1)."""
        return now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "policy_id": self.policy_id, "policy": self.policy.to_dict(),
            "fetched_at": self.fetched_at, "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CachedPolicy:
        """@raise ValueError, KeyError, TypeError: on a malformed dict."""
        return cls(domain=str(data["domain"]), policy_id=str(data["policy_id"]),
                   policy=Policy.from_dict(data["policy"]),
                   fetched_at=float(data["fetched_at"]), expires_at=float(data["expires_at"]))


class IPolicyCache(Interface):
    """Where fetched policies are kept between deliveries and restarts.

    C{get} and C{all} must not block (they are called for every delivery);
    C{put} and C{delete} may block on small I/O, so the resolver can run
    them through C{run_in_thread}.
    """

    def get(domain):
        """The L{CachedPolicy} for C{domain} (normalized), expired or not,
        or None."""

    def put(entry):
        """Store a L{CachedPolicy}, replacing the domain's previous one."""

    def delete(domain):
        """Forget the policy of C{domain}; no error when there is none."""

    def all():
        """Every cached L{CachedPolicy}, as a list."""


@implementer(IPolicyCache)
class MemoryPolicyCache:
    """A cache that forgets on restart: for tests and C{gatewayctl}."""

    def __init__(self) -> None:
        self._entries: dict[str, CachedPolicy] = {}

    def get(self, domain: str) -> CachedPolicy | None:
        return self._entries.get(domain)

    def put(self, entry: CachedPolicy) -> None:
        self._entries[entry.domain] = entry

    def delete(self, domain: str) -> None:
        self._entries.pop(domain, None)

    def all(self) -> list[CachedPolicy]:
        return list(self._entries.values())


_FILE_SUFFIX = ".json"
_FILE_FORMAT = 1


@implementer(IPolicyCache)
class FilePolicyCache:
    """The default cache: one JSON file per domain in a directory, kept in
    memory too, so it survives restarts (RFC 8461 §5.1: a policy must
    outlive the process, or an attacker only needs to wait for a restart).

    Each file is C{<domain>.json} and is replaced atomically: written to a
    temporary file in the same directory, fsynced, renamed over the old
    one, then the directory is fsynced.  A reader therefore sees the old
    or the new policy, never half of one.

    Blocking: the constructor and L{load} read the directory; L{put} and
    L{delete} write and fsync (a few hundred bytes).  L{get} and L{all}
    only read memory.  All methods are thread-safe, so C{put} and
    C{delete} may run in a thread pool (L{PolicyResolver} does that when
    given C{run_in_thread}).

    @param directory: created (mode 0700) if missing.
    """

    log = Logger()

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        # Two locks, so get() never waits for an fsync: _lock guards the
        # dict (held briefly), _write_lock orders writers, memory and disk
        # alike, so the file always holds the newest entry.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._entries: dict[str, CachedPolicy] = {}
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in self.directory.glob(".*.tmp"):
            path.unlink(missing_ok=True)  # left by a crash during put()
        self.load()

    def load(self) -> None:
        """(Re-)read every cache file.  Blocking.

        Unreadable or malformed files are skipped with a warning (and left
        in place for the admin).
        """
        entries: dict[str, CachedPolicy] = {}
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if not name.endswith(_FILE_SUFFIX) or name.startswith("."):
                continue
            try:
                data = json.loads(path.read_bytes())
                entry = CachedPolicy.from_dict(data)
                if self._file_for(entry.domain) != path:
                    raise ValueError(f"file holds the policy of {entry.domain!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log.warn("ignoring MTA-STS cache file {path}: {error}", path=str(path), error=str(exc))
                continue
            entries[entry.domain] = entry
        with self._lock:
            self._entries = entries

    def _file_for(self, domain: str) -> Path:
        if normalize_domain(domain) != domain:
            raise ValueError(f"not a normalized domain name: {domain!r}")
        return self.directory / f"{domain}{_FILE_SUFFIX}"

    def get(self, domain: str) -> CachedPolicy | None:
        """Non-blocking."""
        with self._lock:
            return self._entries.get(domain)

    def all(self) -> list[CachedPolicy]:
        """Non-blocking."""
        with self._lock:
            return list(self._entries.values())

    def put(self, entry: CachedPolicy) -> None:
        """Store C{entry} in memory and on disk.  Blocking (write, fsync,
        rename, directory fsync).

        @raise ValueError: the domain is not a normalized domain name.
        @raise OSError: the file could not be written (memory is updated
            all the same, so the running process still applies it).
        """
        path = self._file_for(entry.domain)
        data = dict(entry.to_dict(), format=_FILE_FORMAT)
        payload = json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        with self._write_lock:
            with self._lock:
                self._entries[entry.domain] = entry
            fd, tmp = tempfile.mkstemp(prefix=f".{entry.domain}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self._fsync_directory()

    def delete(self, domain: str) -> None:
        """Forget C{domain}.  Blocking (unlink, directory fsync)."""
        path = self._file_for(domain)
        with self._write_lock:
            with self._lock:
                self._entries.pop(domain, None)
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._fsync_directory()

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- DNS -------------------------------------------------------------------------


async def lookup_txt(resolver: IResolver, name: str) -> list[str]:
    """The TXT records of C{name} as text (see L{gateway.dns.lookup_txt}).

    @raise DNSPermanentError: NXDOMAIN.
    @raise DNSTemporaryError: any other failure.
    """
    from gateway import dns as gateway_dns

    return [r.decode("utf-8", "replace") for r in await gateway_dns.lookup_txt(resolver, name)]


# -- HTTPS fetch -------------------------------------------------------------------


@implementer(IAgentEndpointFactory)
class _PolicyHostEndpoints:
    """TLS endpoints for the Agent: TCP to the (possibly overridden)
    address, SNI and certificate check against the URL's host name."""

    def __init__(self, reactor: Any, trust: Any, host_override: Mapping[str, str], connect_timeout: float) -> None:
        self._reactor = reactor
        self._trust = trust
        self._override = {_host_text(k): v for k, v in host_override.items()}
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        address = self._override.get(_host_text(host), host)
        tcp = HostnameEndpoint(self._reactor, address, uri.port, timeout=self._connect_timeout)
        options = optionsForClientTLS(
            host, trustRoot=self._trust,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
        return wrapClientTLS(options, tcp)


class _CappedBody(protocol.Protocol):
    """Collects a response body, failing as soon as it exceeds C{limit}."""

    def __init__(self, limit: int, host: str) -> None:
        self._limit = limit
        self._host = host
        self._parts: list[bytes] = []
        self._size = 0
        self.finished: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            self.finished.errback(PolicyError(
                f"policy from {self._host} exceeds {self._limit} bytes", "too-large"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.finished.called:
            return
        # PotentialDataLoss: no length, body ended by the close (HTTP/1.0
        # style); complete as far as HTTP can tell.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._parts))
        else:
            self.finished.errback(PolicyError(
                f"connection to {self._host} lost while reading the policy: {reason.getErrorMessage()}", "connect"))


class _Discard(protocol.Protocol):
    """Drops a refused response's body and closes the connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _underlying(exc: BaseException) -> list[BaseException]:
    """The causes inside twisted.web's wrapper exceptions (their
    C{reasons} lists of Failures), else C{[exc]}."""
    reasons = getattr(exc, "reasons", None)
    if not reasons:
        return [exc]
    found: list[BaseException] = []
    for reason in reasons:
        value = reason.value if isinstance(reason, Failure) else reason
        found.extend(_underlying(value))
    return found


def _ssl_error_text(exc: BaseException) -> str:
    try:
        parts = [entry[2] for entry in exc.args[0] if len(entry) >= 3 and entry[2]]
    except (IndexError, TypeError):
        parts = []
    return ", ".join(parts) or str(exc) or type(exc).__name__


def _transport_error(host: str, exc: BaseException) -> PolicyError:
    """A L{PolicyError} for a failure before any response arrived."""
    causes = _underlying(exc)
    for cause in causes:
        if isinstance(cause, (VerificationError, CertificateError)):
            return PolicyError(f"certificate of {host} is not valid for that name", "tls")
        if isinstance(cause, SSL.Error):
            return PolicyError(f"TLS with {host} failed: {_ssl_error_text(cause)}", "tls")
    for cause in causes:
        if isinstance(cause, net_error.ConnectionRefusedError):
            return PolicyError(f"connection to {host} refused", "connect")
        if isinstance(cause, net_error.DNSLookupError):
            return PolicyError(f"cannot resolve {host}", "connect")
        if isinstance(cause, (net_error.TimeoutError, net_error.ConnectingCancelledError)):
            return PolicyError(f"connecting to {host} timed out", "connect")
        if isinstance(cause, net_error.ConnectError):
            return PolicyError(f"cannot connect to {host}: {cause}", "connect")
        if isinstance(cause, (net_error.ConnectionLost, net_error.ConnectionDone)):
            return PolicyError(f"{host} closed the connection before answering", "connect")
    cause = causes[0]
    return PolicyError(f"fetching from {host} failed: {type(cause).__name__}: {cause}", "connect")


class PolicyFetcher:
    """Fetches C{https://mta-sts.<domain>/.well-known/mta-sts.txt} the way
    RFC 8461 §3.3 requires, and parses it.

    What is refused, each with a L{PolicyError} of its own kind: a
    certificate that does not chain to C{trust_root} or is not valid for
    C{mta-sts.<domain>} (checked by service-identity through
    C{optionsForClientTLS}; TLS 1.2 or later); any redirect (never
    followed); a status other than 200; a Content-Type other than
    C{text/plain} (parameters allowed); a body over C{max_size} (refused
    from Content-Length when announced, else the connection is closed as
    soon as the count passes it); no complete answer within C{timeout}
    (one bound for connect, TLS, request and body together); a malformed
    policy.

    @param reactor: connects (IReactorTCP, name resolution for
        C{HostnameEndpoint}).
    @param clock: times the whole fetch (IReactorTime).
    @param trust_root: an C{IOpenSSLTrustRoot}, a path to a PEM CA bundle,
        or None for the platform's trust store.
    @param timeout: seconds for a whole fetch.
    @param max_size: the largest policy body accepted, in bytes.
    @param port: the HTTPS port; 443 except in tests.
    @param host_override: host name -> address to connect to instead of
        resolving it (C{{"mta-sts.example.test": "127.0.0.1"}} in tests);
        SNI and the certificate check still use the host name.
    @param resolve_host: C{async f(host) -> list[str]} of addresses; when
        given, the policy host is resolved through it (the gateway passes
        its twisted.names look-up, so C{[dns] servers} apply) instead of
        the system resolver.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        *,
        trust_root: Any = None,
        timeout: float = 30.0,
        max_size: int = DEFAULT_MAX_SIZE,
        port: int = 443,
        host_override: Mapping[str, str] | None = None,
        user_agent: str = "mailgateway MTA-STS",
        resolve_host: Any = None,
    ) -> None:
        self._clock = clock
        self._resolve_host = resolve_host
        self.timeout = timeout
        self.max_size = max_size
        self.port = port
        self._user_agent = user_agent.encode("ascii")
        trust = self._trust(trust_root)
        endpoints = _PolicyHostEndpoints(reactor, trust, host_override or {}, timeout)
        self._endpoints = endpoints
        # Agent never follows redirects (that is RedirectAgent); its pool
        # is non-persistent, so no connection outlives a fetch.
        self._agent = Agent.usingEndpointFactory(reactor, endpoints)

    async def _resolve_then_fetch(self, url: str, host: str) -> Policy:
        if self._resolve_host is not None:
            try:
                addresses = await self._resolve_host(host)
            except Exception as exc:
                raise PolicyError(f"cannot resolve {host}: {exc}", "connect") from None
            if not addresses:
                raise PolicyError(f"{host} has no address", "connect")
            self._endpoints._override[_host_text(host)] = addresses[0]
        return await self._fetch(url, host)

    @staticmethod
    def _trust(trust_root: Any) -> Any:
        if trust_root is None or isinstance(trust_root, (str, os.PathLike)):
            from gateway.tls import trust_root as load_trust_root

            return load_trust_root(os.fspath(trust_root) if trust_root is not None else None)
        return trust_root  # an IOpenSSLTrustRoot (its interface is not public API)

    async def fetch(self, domain: str) -> Policy:
        """Fetch and parse the policy of C{domain}.

        @raise PolicyError: for every way the fetch can fail (see the class
            docstring); C{kind} says which.
        """
        url = policy_url(domain, self.port)
        host = policy_host(domain)
        work = defer.Deferred.fromCoroutine(self._resolve_then_fetch(url, host))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            work.cancel()

        timer = self._clock.callLater(self.timeout, expire)
        try:
            return await work
        except Exception as exc:
            if timed_out:
                raise PolicyError(f"no complete answer from {host} within {self.timeout:g}s", "timeout") from None
            if isinstance(exc, PolicyError):
                raise
            if any(isinstance(cause, defer.CancelledError) for cause in _underlying(exc)):
                raise  # cancelled by our caller, not a failure of the policy host
            raise _transport_error(host, exc) from None
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch(self, url: str, host: str) -> Policy:
        headers = Headers({b"user-agent": [self._user_agent], b"accept": [b"text/plain"]})
        response = await self._agent.request(b"GET", url.encode("ascii"), headers)
        code = response.code
        if 300 <= code < 400:
            response.deliverBody(_Discard())
            location = (response.headers.getRawHeaders(b"location") or [b"?"])[0].decode("latin-1")
            raise PolicyError(f"{host} answered {code} redirect to {location[:200]} (not followed)", "redirect")
        if code != 200:
            response.deliverBody(_Discard())
            raise PolicyError(f"{host} answered HTTP status {code}", "http-status")
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "text/plain":
            response.deliverBody(_Discard())
            shown = content_type[:80] or "none"
            raise PolicyError(f"{host} sent Content-Type {shown}, not text/plain", "content-type")
        if response.length is not UNKNOWN_LENGTH and response.length > self.max_size:
            response.deliverBody(_Discard())
            raise PolicyError(f"policy from {host} is {response.length} bytes, over {self.max_size}", "too-large")
        collector = _CappedBody(self.max_size, host)
        response.deliverBody(collector)
        body = await collector.finished
        try:
            return parse_policy(body)
        except PolicyError as exc:
            raise PolicyError(f"invalid policy from {host}: {exc.reason}", "parse") from None


# -- Discovery and cache update (RFC 8461 §5) ------------------------------------


class PolicyResolver:
    """The policy to apply for a recipient domain, per RFC 8461 §5.

    The decision, in order:

      1. look up the TXT record C{_mta-sts.<domain>};
      2. no usable record (absent, NXDOMAIN, not exactly one STSv1 record,
         malformed) or the look-up fails: apply the cached policy if it has
         not expired, else none — the absence of a record never removes a
         cached policy (§5);
      3. the record's id equals the cached unexpired policy's: apply the
         cached one, no HTTPS;
      4. otherwise fetch; on success cache it (C{expires_at = now +
         max_age}) and apply it; on failure apply the cached unexpired
         policy if any (§5.1), so a failed fetch never downgrades an
         enforce policy, else none.

    A policy in mode C{none} is returned like any other: the caller
    delivers as without a policy.  Concurrent calls for one domain share
    one discovery.  After a failed fetch, the same domain and id are not
    fetched again for C{fetch_retry} seconds (RFC 8461 §3.3 suggests
    rate-limiting fetches), so a dead policy host costs one timeout, not
    one per delivery; the answer meanwhile is as for a failed fetch.

    @param resolver: a twisted.names C{IResolver}.
    @param fetcher: a L{PolicyFetcher}.
    @param cache: an L{IPolicyCache}.
    @param clock: C{seconds()} is "now" for expiry; also bounds the TXT
        look-up by C{dns_timeout}.
    @param refresh_margin: L{refresh_due} refreshes policies expiring
        within this many seconds.
    @param dns_timeout: the longest wait for the TXT look-up, on top of
        the resolver's own timeout.
    @param fetch_retry: seconds before a failed fetch of the same domain
        and id is tried again; 0 retries on every call.
    @param run_in_thread: C{f(*args) -> Deferred} for the cache's blocking
        C{put} and C{delete}; None calls them in the reactor thread.
    @param on_fetch_error: C{f(domain, error)} after each failed fetch,
        with the L{PolicyError} (C{str(error)} is the reason,
        C{error.result_type} the TLS-RPT result type), for TLS-RPT
        counters.  Exceptions it raises are logged and ignored.
    """

    log = Logger()

    def __init__(
        self,
        resolver: IResolver,
        fetcher: PolicyFetcher,
        cache: Any,
        clock: IReactorTime,
        *,
        refresh_margin: float = 86400.0,
        dns_timeout: float = 30.0,
        fetch_retry: float = 300.0,
        run_in_thread: Callable[..., defer.Deferred[Any]] | None = None,
        on_fetch_error: Callable[[str, PolicyError], object] | None = None,
    ) -> None:
        self.resolver = resolver
        self.fetcher = fetcher
        self.cache = cache
        self.clock = clock
        self.refresh_margin = refresh_margin
        self.dns_timeout = dns_timeout
        self.fetch_retry = fetch_retry
        self.run_in_thread = run_in_thread
        self.on_fetch_error = on_fetch_error
        self._inflight: dict[str, list[defer.Deferred[Any]]] = {}
        #: domain -> (policy id, retry at, reason) of the last failed fetch.
        self._failed: dict[str, tuple[str, float, str]] = {}

    async def policy_for(self, domain: str) -> tuple[CachedPolicy | None, str]:
        """The policy to apply to delivery for C{domain}, and a short reason
        for the log (C{"fetched"}, C{"cached, id unchanged"}, C{"no policy:
        no TXT record"}, ...).

        Never raises for DNS or HTTPS failures; an address literal or
        invalid domain has no policy.
        """
        try:
            domain = normalize_domain(domain)
        except PolicyError as exc:
            return None, f"no policy: {exc.reason}"
        waiters = self._inflight.get(domain)
        if waiters is not None:
            waiter: defer.Deferred[tuple[CachedPolicy | None, str]] = defer.Deferred()
            waiters.append(waiter)
            return await waiter
        waiters = self._inflight[domain] = []
        try:
            result = await self._discover(domain)
        except BaseException:
            failure = Failure()
            del self._inflight[domain]
            for waiter in waiters:
                waiter.errback(failure)
            raise
        del self._inflight[domain]
        for waiter in waiters:
            waiter.callback(result)
        return result

    def _cached(self, domain: str, now: float) -> CachedPolicy | None:
        entry = self.cache.get(domain)
        if entry is None or entry.expired(now):
            return None
        return entry

    async def _txt_id(self, domain: str) -> tuple[str | None, str]:
        """The id of the domain's valid STSv1 TXT record, else None and why."""
        name = f"_mta-sts.{domain}"
        try:
            lookup = defer.Deferred.fromCoroutine(lookup_txt(self.resolver, name))
            records = await lookup.addTimeout(self.dns_timeout, self.clock)
        except DNSPermanentError:
            return None, "no TXT record"
        except (DNSTemporaryError, defer.TimeoutError) as exc:
            return None, f"TXT look-up failed: {exc or 'timed out'}"
        policy_id = parse_txt(records)
        if policy_id is not None:
            return policy_id, ""
        if not any(_TXT_STS_PREFIX.match(r) for r in records):
            return None, "no TXT record"
        return None, "no valid STSv1 TXT record"

    async def _discover(self, domain: str) -> tuple[CachedPolicy | None, str]:
        now = self.clock.seconds()
        cached = self._cached(domain, now)
        policy_id, why = await self._txt_id(domain)
        if policy_id is None:
            if cached is not None:
                return cached, f"cached, {why}"
            return None, f"no policy: {why}"
        if cached is not None and cached.policy_id == policy_id:
            return cached, "cached, id unchanged"
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == policy_id and now < failed[1]:
            return self._after_failure(domain, f"{failed[2]} (retry in {failed[1] - now:.0f}s)")
        try:
            entry = await self._fetch_and_store(domain, policy_id)
        except PolicyError as exc:
            return self._after_failure(domain, exc.reason)
        return entry, "fetched"

    def _after_failure(self, domain: str, reason: str) -> tuple[CachedPolicy | None, str]:
        """The answer when no new policy could be had: the cached one if it
        is still valid (read again: time passed during the fetch)."""
        cached = self._cached(domain, self.clock.seconds())
        if cached is not None:
            return cached, f"cached, fetch failed: {reason}"
        return None, f"no policy: fetch failed: {reason}"

    async def _fetch_and_store(self, domain: str, policy_id: str) -> CachedPolicy:
        """Fetch, then cache; reports and re-raises fetch failures."""
        try:
            policy = await self.fetcher.fetch(domain)
        except PolicyError as exc:
            self.log.info("MTA-STS policy fetch for {domain} failed: {reason}",
                          domain=domain, reason=exc.reason, result_type=exc.result_type)
            if self.fetch_retry > 0:
                self._failed[domain] = (policy_id, self.clock.seconds() + self.fetch_retry, exc.reason)
            self._report(domain, exc)
            raise
        self._failed.pop(domain, None)
        now = self.clock.seconds()
        entry = CachedPolicy(domain=domain, policy_id=policy_id, policy=policy,
                             fetched_at=now, expires_at=now + policy.max_age)
        await self._cache_call(self.cache.put, entry)
        self.log.info("MTA-STS policy for {domain}: id={policy_id} mode={mode} max_age={max_age}",
                      domain=domain, policy_id=policy_id, mode=policy.mode.value, max_age=policy.max_age)
        return entry

    def _report(self, domain: str, exc: PolicyError) -> None:
        if self.on_fetch_error is None:
            return
        try:
            self.on_fetch_error(domain, exc)
        except Exception:
            self.log.failure("on_fetch_error hook failed for {domain}", domain=domain)

    async def _cache_call(self, method: Callable[..., Any], *args: Any) -> None:
        """Run a blocking cache method, in a thread when configured; a
        write failure is logged, never raised (the policy still applies
        from memory, and is refetched after a restart)."""
        try:
            if self.run_in_thread is not None:
                await self.run_in_thread(method, *args)
            else:
                method(*args)
        except Exception:
            self.log.failure("MTA-STS cache {method} failed", method=getattr(method, "__name__", "?"))

    async def refresh_due(self) -> None:
        """Refresh cached policies before they expire (RFC 8461 §5.1), and
        drop expired ones.

        For each policy expiring within C{refresh_margin}: look up the TXT
        id (keeping the cached id when that fails or is absent) and fetch
        the policy again, even when the id is unchanged, so its
        C{max_age} restarts.  A failed refresh keeps the cached policy
        until it expires and is reported like any failed fetch.  Domains
        are refreshed one after the other, each bounded by the fetcher's
        timeout.  Never raises for DNS or HTTPS failures.
        """
        now = self.clock.seconds()
        self._failed = {d: f for d, f in self._failed.items() if f[1] > now}
        for entry in list(self.cache.all()):
            if entry.expired(now):
                await self._cache_call(self.cache.delete, entry.domain)
                self.log.info("MTA-STS policy for {domain} expired", domain=entry.domain)
                continue
            if entry.expires_at - now > self.refresh_margin:
                continue
            policy_id, _ = await self._txt_id(entry.domain)
            try:
                await self._fetch_and_store(entry.domain, policy_id or entry.policy_id)
            except PolicyError:
                continue


# -- Diagnostics -----------------------------------------------------------------------


async def check_domain(domain: str, resolver: IResolver, fetcher: PolicyFetcher) -> dict[str, Any]:
    """Everything MTA-STS says about C{domain}, for C{gatewayctl mta-sts}:
    no cache involved, read or written.

    The policy is fetched even when the TXT record is missing or invalid,
    so an admin sees both halves of a half-done set-up.

    @return: a JSON-ready dict: C{domain}, C{txt_name}, C{txt_records}
        (list of str), C{txt_error} (str or None), C{policy_id} (the valid
        record's id or None), C{policy_url}, C{policy} (L{Policy.to_dict}
        or None), C{error} and C{error_kind} and C{result_type} (None
        when the fetch succeeded).
    """
    result: dict[str, Any] = {
        "domain": domain, "txt_name": None, "txt_records": [], "txt_error": None, "policy_id": None,
        "policy_url": None, "policy": None, "error": None, "error_kind": None, "result_type": None,
    }
    try:
        name = normalize_domain(domain)
    except PolicyError as exc:
        result.update(error=exc.reason, error_kind=exc.kind, result_type=exc.result_type)
        return result
    result["domain"] = name
    result["txt_name"] = f"_mta-sts.{name}"
    result["policy_url"] = policy_url(name, fetcher.port)
    try:
        result["txt_records"] = await lookup_txt(resolver, result["txt_name"])
    except DNSPermanentError:
        result["txt_error"] = "no such name (NXDOMAIN)"
    except DNSTemporaryError as exc:
        result["txt_error"] = str(exc)
    else:
        result["policy_id"] = parse_txt(result["txt_records"])
        if result["policy_id"] is None:
            result["txt_error"] = "no valid STSv1 record" if result["txt_records"] else "no TXT record"
    try:
        policy = await fetcher.fetch(name)
    except PolicyError as exc:
        result.update(error=exc.reason, error_kind=exc.kind, result_type=exc.result_type)
    else:
        result["policy"] = policy.to_dict()
    return result
