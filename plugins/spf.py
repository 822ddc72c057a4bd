# -*- test-case-name: tests.test_spf,tests.e2e.test_spf -*-
"""spf: check that the client may send for the sender's domain (SPF, RFC 7208).

At MAIL FROM, the client's address is checked against the SPF policy of
the MAIL FROM domain.  For the null sender C{<>} (bounces) the HELO name
is checked instead, as C{postmaster@<helo>} (RFC 7208 §2.4).  With
C{check_helo} (the default) the HELO name is also checked first for every
other sender (§2.3): a HELO C{fail} is conclusive and acted on like a
MAIL FROM C{fail}; any other HELO result leaves the decision to the MAIL
FROM check.

Clients that the relay guard trusts are not checked: authenticated
sessions, sessions marked trusted, and clients in C{[server]
trusted_networks}.  They are recorded as C{spf=skip}.

What happens per result is set per option, each one of C{"reject"},
C{"tempfail"} or C{"accept"}:

  - C{fail = "reject"}: C{550 5.7.23} with the domain's explanation;
  - C{softfail}, C{neutral}, C{none} C{= "accept"};
  - C{temperror = "tempfail"}: C{451 4.7.24};
  - C{permerror = "reject"}: C{550 5.7.24} (set it to C{"accept"} to only
    record the broken policy in the header).

A rejection of C{softfail}, C{neutral} or C{none} uses C{5.7.23}; a
C{"tempfail"} of any result uses the same status with a 4 (RFC 7372).
Every message let through carries a C{Received-SPF:} header field
(RFC 7208 §9.1); the result is also left for Authentication-Results and
DMARC in C{transaction.notes["spf"]} as C{{"result", "domain",
"identity" ("mailfrom" or "helo"), "ip"}} and in the transaction's results.
With C{mode = "warn"} nothing is refused, but the header is still added.

Results are kept in memory for C{cache_ttl} seconds (default 60) per
client address, sender and HELO name; temporary errors are never kept.
DNS goes through the gateway's resolver, each query bounded by C{[dns]
timeout}; the plugin's C{timeout} bounds the whole evaluation.

Example::

    [plugins.spf]
    fail = "reject"
    softfail = "accept"
    permerror = "accept"
    cache_ttl = 60

Standards: RFC 7208 (SPF) §2.3, §2.4, §8, §9.1; RFC 7372 §3.2 (5.7.23,
5.7.24).
See also: gateway.spf (the evaluator); Postfix policyd-spf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IMailCheck, IPluginFactory
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, Verdict, cont

#: What an option may say to do with a result.
ACTIONS = ("reject", "tempfail", "accept")

#: The SPF results that have an option, in RFC order.
CONFIGURABLE = ("fail", "softfail", "neutral", "none", "temperror", "permerror")

#: Enhanced status subjects (RFC 7372 §3.2): "validation failed" for the
#: policy results, "validation error" for the error results.
_SUBJECT = {"fail": "7.23", "softfail": "7.23", "neutral": "7.23", "none": "7.23",
            "temperror": "7.24", "permerror": "7.24"}


@dataclass(frozen=True)
class Options:
    """C{[plugins.spf]}.

    @ivar fail: action for C{fail}: C{"reject"}, C{"tempfail"} or C{"accept"}.
    @ivar softfail: action for C{softfail}.
    @ivar neutral: action for C{neutral}.
    @ivar none: action for C{none} (no SPF record).
    @ivar temperror: action for C{temperror} (DNS timeout, SERVFAIL).
    @ivar permerror: action for C{permerror} (a broken record).
    @ivar check_helo: also check the HELO identity when MAIL FROM is not
        null (the null sender is always checked through HELO).
    @ivar cache_ttl: seconds a result is reused; 0 turns the cache off.
    @ivar cache_size: at most this many cached results.
    """

    fail: str = "reject"
    softfail: str = "accept"
    neutral: str = "accept"
    none: str = "accept"
    temperror: str = "tempfail"
    permerror: str = "reject"
    check_helo: bool = True
    cache_ttl: float = 60.0
    cache_size: int = 10000

    def __post_init__(self) -> None:
        for result in CONFIGURABLE:
            value = getattr(self, result)
            if value not in ACTIONS:
                raise ValueError(f"{result} must be one of {', '.join(map(repr, ACTIONS))}; got {value!r}")
        if self.cache_ttl < 0:
            raise ValueError(f"cache_ttl must not be negative; got {self.cache_ttl!r}")
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be at least 1; got {self.cache_size!r}")


def _printable(text: str, limit: int = 300) -> str:
    """C{text} with control characters replaced, cut to C{limit}."""
    cleaned = "".join(c if c >= " " and c != "\x7f" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def _header_value(text: str) -> str:
    """A dot-atom when C{text} is one, else an RFC 5322 quoted-string."""
    atext = "!#$%&'*+-/=?^_`{|}~"
    if text and all(part and all(c.isascii() and (c.isalnum() or c in atext) for c in part)
                    for part in text.split(".")):
        return text
    return '"' + _printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """Text safe inside an RFC 5322 comment."""
    return _printable(text).replace("\\", "/").replace("(", "[").replace(")", "]")


def received_spf(result: Any, *, identity: str, ip: str, sender: str, helo: str, receiver: str) -> str:
    """The value of a C{Received-SPF:} field (RFC 7208 §9.1).

    @param result: an L{gateway.spf.SPFResult}.
    @param identity: C{"mailfrom"} or C{"helo"}.
    @param sender: the identity checked (C{postmaster@helo} for HELO).
    @return: one folded value: result, comment, then the key-value pairs.
    """
    who = f"domain of {sender}"
    comments = {
        "pass": f"{who} designates {ip} as permitted sender",
        "fail": f"{who} does not designate {ip} as permitted sender",
        "softfail": f"transitioning {who} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by {who}",
        "none": f"{who} does not designate permitted sender hosts",
        "temperror": f"error in processing during lookup of {who}: {result.detail}",
        "permerror": f"{who} has a broken SPF policy: {result.detail}",
    }
    pairs = [("client-ip", ip), ("envelope-from", sender), ("helo", helo),
             ("receiver", receiver), ("identity", identity)]
    if result.mechanism:
        pairs.append(("mechanism", result.mechanism))
    if result.result in ("temperror", "permerror") and result.detail:
        pairs.append(("problem", result.detail))
    values = "; ".join(f"{key}={_header_value(value)}" for key, value in pairs)
    return f"{result.result} ({_comment(receiver)}: {_comment(comments[result.result])})\r\n\t{values};"


@implementer(IMailCheck)
class SPFCheck:
    """The C{spf} plugin: one per configuration, shared by listeners."""

    def __init__(self, options: Options, context: Any) -> None:
        from gateway.spf import check_host

        self.options = options
        self._check_host = check_host
        self._name = context.name
        self._clock = context.clock
        self._resolver = context.resolver
        server = context.config.server
        self._networks = server.trusted_networks
        self._receiver = server.hostname.rstrip(".").lower()
        self._cache: dict[tuple[str, str, str], tuple[float, Any]] = {}

    def is_trusted(self, session: Any) -> bool:
        """The relay guard's notion: authenticated, marked trusted, or in
        C{trusted_networks}."""
        if session.auth_user is not None or session.trusted:
            return True
        address = session.peer_ip
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks if network.version == address.version)

    def check_mail(self, session: Any, transaction: Any, sender: Any) -> Verdict | Any:
        if self.is_trusted(session):
            why = "authenticated" if session.auth_user is not None else "trusted"
            transaction.results.add(self._name, "skip", why)
            return CONTINUE
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._check(session, transaction, sender))

    async def _check(self, session: Any, transaction: Any, sender: Any) -> Verdict:
        ip = session.peer
        helo = session.helo or ""
        helo_sender = f"postmaster@{helo}"
        if sender is None:
            identity, domain, checked = "helo", helo, helo_sender
            result = await self.evaluate(ip, helo, helo_sender, helo)
        else:
            identity = ""
            if self.options.check_helo and helo:
                helo_result = await self.evaluate(ip, helo, helo_sender, helo)
                if helo_result.result == "fail" and self.options.fail != "accept":
                    identity, domain, checked, result = "helo", helo, helo_sender, helo_result
            if not identity:
                identity, domain = "mailfrom", sender.domain
                checked = f"{sender.local}@{sender.domain}"
                result = await self.evaluate(ip, domain, checked, helo)
        transaction.notes[self._name].update(
            {"result": result.result, "domain": domain, "identity": identity, "ip": ip})
        transaction.results.add(self._name, result.result, f"{identity}={domain}")
        header = received_spf(result, identity=identity, ip=ip, sender=checked, helo=helo,
                              receiver=self._receiver)
        return self.verdict(result, domain, (("Received-SPF", header),))

    def verdict(self, result: Any, domain: str, headers: tuple[tuple[str, str], ...]) -> Verdict:
        """The verdict the options give C{result}, carrying C{headers}
        (kept in C{mode = "warn"} too, where a refusal becomes CONTINUE)."""
        action = getattr(self.options, result.result, "accept")
        if action == "accept":
            return cont(add_headers=headers)
        domain = _printable(domain, 100)
        if result.result == "fail":
            text = f"SPF fail: {_printable(result.explanation or f'{domain} does not permit this client')}"
        elif result.result in ("temperror", "permerror"):
            kind = "temporary" if result.result == "temperror" else "permanent"
            text = f"SPF {kind} error for {domain}: {_printable(result.detail or 'unknown problem', 200)}"
        else:
            text = f"SPF {result.result} for {domain}: sender not authorised"
        subject = _SUBJECT[result.result]
        if action == "reject":
            return Verdict(Action.REJECT, Reply(550, f"5.{subject}", text), add_headers=headers)
        return Verdict(Action.TEMPFAIL, Reply(451, f"4.{subject}", text), add_headers=headers)

    async def evaluate(self, ip: str, domain: str, sender: str, helo: str) -> Any:
        """check_host() through the cache.

        @return: an L{gateway.spf.SPFResult}.
        """
        from gateway.spf import SPFResult

        key = (ip, sender, helo.lower())
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        if self._resolver is None:
            return SPFResult("temperror", domain=domain, detail="no DNS resolver configured")
        result = await self._check_host(ip, domain, sender, helo, self._resolver,
                                        receiver=self._receiver, clock=self._clock)
        if self.options.cache_ttl > 0 and result.result != "temperror":
            self._remember(key, result, now + self.options.cache_ttl)
        return result

    def _remember(self, key: tuple[str, str, str], result: Any, expires: float) -> None:
        if len(self._cache) >= self.options.cache_size:
            now = self._clock.seconds()
            for old in [k for k, (until, _) in self._cache.items() if until <= now]:
                del self._cache[old]
            while len(self._cache) >= self.options.cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (expires, result)


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "spf"
    options_type = Options
    description = "SPF (RFC 7208): check the client against the MAIL FROM and HELO domains' policies."

    @staticmethod
    def build(options: Options, context: Any) -> SPFCheck:
        return SPFCheck(options, context)


factory = _Factory
