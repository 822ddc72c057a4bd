# -*- test-case-name: tests.test_access,tests.e2e.test_policy_filters -*-
"""access: allow or refuse by client address or name, HELO, sender and recipient (access lists).

An access list is an ordered list of rules, each C{PATTERN ACTION [text]}.
The rules of one type are tried in order and the first that matches
decides, like a firewall: put the specific entries before the general
ones.  (Postfix access(5) tries its lookup keys from the most specific to
the least; with an ordered list the admin says the order.)

Types and patterns:

  - C{client}: an address or network (C{192.0.2.7}, C{192.0.2.0/24},
    C{2001:db8::/32}), or a host name matched against the client's
    I{verified} reverse name (C{session.peer_name}, set when C{[dns]
    reverse_lookup} is on and the PTR name resolves back to the client):
    C{example.com} matches C{example.com} and every name under it,
    C{.example.com} only the names under it.  A client without a verified
    name never matches a name pattern.
  - C{helo}: a name as for C{client} (matched against the HELO/EHLO
    argument), or an address or network, which matches a HELO given as an
    address literal (C{[192.0.2.7]}) or a bare address.
  - C{sender}, C{recipient}: C{user@example.com} (that address),
    C{user@} (that local part in any domain), C{example.com} (the domain
    and its subdomains), C{@example.com} (the domain only),
    C{.example.com} (subdomains only); for C{sender},
    C{<>} matches the null sender of bounces.  Case never matters; domains
    may be written in Unicode.

Actions (case-insensitive):

  - C{OK}: accept this stage; the plugins after C{access} in the same
    stage are skipped.  An OK never opens relay: the relay decision is
    made by C{relay_guard} before this plugin runs.
  - C{REJECT [text]}: C{550 5.7.1}, e.g. C{Sender address rejected:
    text} (default text "Access denied").
  - C{DEFER [text]}: C{451 4.7.1} (default text "Access temporarily
    denied").
  - C{4NN [text]} or C{5NN [text]}: that reply code with status
    C{4.7.1} or C{5.7.1}.
  - C{DUNNO}: stop looking in this list (later, more general rules do not
    apply) and let the checks go on, e.g. C{boss@example.com DUNNO} before
    C{example.com REJECT}.

When the lists are checked (C{delay_reject}, as Postfix's
C{smtpd_delay_reject}):

  - C{true} (the default): every list is checked at RCPT TO, in the order
    client, helo, sender, recipient.  The client sees the reason in a
    reply to a command it can act on, and an C{OK} for a client, HELO or
    sender skips the RCPT checks listed after C{access} (a DNSBL, say).
    DUNNO moves on to the next list; OK, REJECT and DEFER end the stage.
  - C{false}: each list at its own command: C{client} before the greeting
    (a rejection replaces the 220 and closes), C{helo} at HELO/EHLO,
    C{sender} at MAIL FROM, C{recipient} at RCPT TO.

Rules come from the config lists and from C{file}, whose lines read
C{TYPE PATTERN ACTION [text]} (C{#} starts a comment line; blank lines are
ignored).  The config's rules of a type come before the file's.  The file
is checked for changes (modification time, size, inode) at most every
C{check_interval} seconds, in a thread, and read again in that thread
when it changed: only building the plugin (at start-up and on reload)
reads it on the reactor thread.  A file that is missing or broken then
stops the start-up (or refuses the reload); one that becomes broken
later is logged once and the last good rules stay in force.

Options (C{[plugins.access]}):

  - C{client}, C{helo}, C{sender}, C{recipient}: lists of rules.
  - C{file = ""}: a rules file (relative paths are relative to the
    working directory).
  - C{check_interval = 1.0}: seconds between checks of the file; 0 checks
    before every decision.
  - C{delay_reject = true}: see above.

Example::

    [plugins.access]
    client = ["192.0.2.0/24 REJECT Known spam source",
              "mail.partner.example OK"]
    helo = ["localhost REJECT You are not localhost"]
    sender = ["boss@example.com DUNNO", "example.com REJECT Spoofed sender", "<> OK"]
    recipient = ["noreply@example.test REJECT This address receives no mail",
                 "abuse@ OK"]
    file = "/etc/mailgateway/access"

and C{/etc/mailgateway/access}::

    # TYPE      PATTERN              ACTION  [text]
    client      203.0.113.0/24       DEFER   Under investigation
    sender      @spam.example        REJECT
    recipient   old@example.test     550     User has moved

Put C{access} before the plugins that an C{OK} should skip, e.g.
C{plugins = ["relay_guard", "access", "dnsbl", "spf"]}.

Standards: RFC 5321 §4.1.1.1-3 (HELO, MAIL, RCPT), §4.2.2 (reply codes);
RFC 3463 (X.7.1).
See also: Postfix access(5), check_client_access, check_helo_access,
check_sender_access, check_recipient_access, smtpd_delay_reject;
plugins/relay_guard.py (relay, which C{OK} never opens).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import alsoProvides, implementer, provider

from gateway.interfaces import IConnectCheck, IHeloCheck, IMailCheck, IPluginFactory, IRcptCheck
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, Verdict, accept

#: The list types, in the order they are checked at RCPT with delay_reject.
KINDS = ("client", "helo", "sender", "recipient")

#: The named actions.
ACTIONS = ("OK", "REJECT", "DEFER", "DUNNO")

#: What the reply says was refused, per list type.
_SUBJECT = {
    "client": "Client host rejected",
    "helo": "Helo command rejected",
    "sender": "Sender address rejected",
    "recipient": "Recipient address rejected",
}

@dataclass(frozen=True)
class Rule:
    """One parsed access rule.

    @ivar kind: C{client}, C{helo}, C{sender} or C{recipient}.
    @ivar pattern: the pattern as written (for logs and results).
    @ivar action: C{OK}, C{REJECT}, C{DEFER}, C{DUNNO} or a reply code
        such as C{"554"}.
    @ivar text: the reply text, or C{""} for the default.
    @ivar matches: a predicate over the value being checked.
    """

    kind: str
    pattern: str
    action: str
    text: str
    matches: Callable[[Any], bool] = field(compare=False, repr=False)


def _domain_pattern(text: str) -> tuple[str, bool]:
    """(canonical domain, subdomains only) for C{example.com} or
    C{.example.com}.

    @raise ValueError: not a valid domain.
    """
    from gateway.address import canonical_domain

    only_below = text.startswith(".")
    name = text[1:] if only_below else text
    if name.endswith("."):
        name = name[:-1]
    return canonical_domain(name), only_below


def _domain_matches(domain: str | None, pattern: str, only_below: bool) -> bool:
    """C{domain} is C{pattern} (unless only_below) or a name under it."""
    if not domain:
        return False
    if domain == pattern:
        return not only_below
    return domain.endswith("." + pattern)


def _name_text(name: str | None) -> str | None:
    """A host name from the session as a comparable canonical domain, or None."""
    if not name:
        return None
    from gateway.address import canonical_domain

    text = name[:-1] if name.endswith(".") else name
    try:
        return canonical_domain(text)
    except ValueError:
        return text.lower()


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network an address or CIDR pattern names, or None."""
    inner = text
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
    try:
        return ipaddress.ip_network(inner, strict=False)
    except ValueError:
        return None


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in C{192.0.2.1}, C{[192.0.2.1]} or C{[IPv6:...]}, or None."""
    if not text:
        return None
    inner = text
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_network(address: Any, network: Any) -> bool:
    return address is not None and address.version == network.version and address in network


def _host_matcher(kind: str, pattern: str) -> Callable[[Any], bool]:
    """For C{client} (value: (ip, name)) and C{helo} (value: the HELO text)."""
    network = _network(pattern)
    if network is not None:
        if kind == "client":
            return lambda value: _in_network(value[0], network)
        return lambda value: _in_network(_address(value), network)
    if pattern.startswith("["):
        raise ValueError(f"invalid address literal {pattern!r}")
    domain, only_below = _domain_pattern(pattern)
    if kind == "client":
        return lambda value: _domain_matches(value[1], domain, only_below)
    return lambda value: _domain_matches(_name_text(value), domain, only_below)


def _mailbox_matcher(kind: str, pattern: str) -> Callable[[Any], bool]:
    """For C{sender} and C{recipient}; the value is a Mailbox or None (C{<>})."""
    if pattern == "<>":
        if kind != "sender":
            raise ValueError("<> (the null sender) is a sender pattern")
        return lambda mailbox: mailbox is None
    local, at, domain_text = pattern.rpartition("@")
    if not at:
        domain, only_below = _domain_pattern(pattern)
        return lambda mailbox: mailbox is not None and _domain_matches(mailbox.domain, domain, only_below)
    if not local and not domain_text:
        raise ValueError(f"empty address pattern {pattern!r}")
    local = local.lower()
    if not domain_text:
        return lambda mailbox: mailbox is not None and mailbox.local.lower() == local
    domain, only_below = _domain_pattern(domain_text)
    if not local:
        # "@example.com": the domain itself, as in the file example.
        return lambda mailbox: mailbox is not None and mailbox.domain == domain
    if only_below:
        raise ValueError(f"a full address cannot start its domain with a dot: {pattern!r}")
    return lambda mailbox: (mailbox is not None and mailbox.domain == domain
                            and mailbox.local.lower() == local)


def parse_rule(kind: str, text: str) -> Rule:
    """Parse one C{PATTERN ACTION [text]} rule of type C{kind}.

    @raise ValueError: naming what is wrong.
    """
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"unknown type {kind!r} (use {', '.join(KINDS)})")
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError(f"{text.strip()!r}: expected PATTERN ACTION [text]")
    pattern, action = parts[0], parts[1].upper()
    reply_text = parts[2].strip() if len(parts) > 2 else ""
    if action not in ACTIONS:
        if not (len(action) == 3 and action.isdigit() and action[0] in "45"):
            raise ValueError(f"{text.strip()!r}: unknown action {parts[1]!r} "
                             f"(use OK, REJECT, DEFER, DUNNO or a 4NN/5NN code)")
    if reply_text and action in ("OK", "DUNNO"):
        raise ValueError(f"{text.strip()!r}: {action} takes no text")
    try:
        if kind in ("client", "helo"):
            matcher = _host_matcher(kind, pattern)
        else:
            matcher = _mailbox_matcher(kind, pattern)
    except ValueError as exc:
        raise ValueError(f"{text.strip()!r}: bad {kind} pattern: {exc}") from None
    return Rule(kind, pattern, action, _printable(reply_text), matcher)


def parse_file(text: str, source: str = "<file>") -> dict[str, tuple[Rule, ...]]:
    """Rules from the lines of an access file, C{TYPE PATTERN ACTION [text]}.

    @return: type -> rules in file order.
    @raise ValueError: naming the file and line.
    """
    rules: dict[str, list[Rule]] = {kind: [] for kind in KINDS}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split(None, 1)
        kind, rest = fields[0], fields[1] if len(fields) > 1 else ""
        try:
            rule = parse_rule(kind, rest)
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from None
        rules[rule.kind].append(rule)
    return {kind: tuple(found) for kind, found in rules.items()}


def _read_file(path: str) -> tuple[tuple[int, int, int], dict[str, tuple[Rule, ...]]]:
    """Stat, read and parse C{path} (blocking: run it in a thread)."""
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        data = handle.read()
    text = data.decode("utf-8", "replace")
    return (info.st_mtime_ns, info.st_size, info.st_ino), parse_file(text, path)


def _reload_if_changed(path: str, stamp: tuple[int, int, int] | None) -> Any:
    """None when C{path} still has C{stamp}, else what L{_read_file} gives
    (blocking: run it in a thread)."""
    info = os.stat(path)
    if (info.st_mtime_ns, info.st_size, info.st_ino) == stamp:
        return None
    return _read_file(path)


def _record(results: Any, plugin: str, result: str, detail: str) -> None:
    """Add a result once (RCPT checks repeat for every recipient)."""
    for seen in results:
        if (seen.plugin, seen.result, seen.detail) == (plugin, result, detail):
            return
    results.add(plugin, result, detail)


def _printable(text: str, limit: int = 200) -> str:
    """Reply-safe text: printable ASCII, at most C{limit} characters."""
    cleaned = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


@dataclass(frozen=True)
class Options:
    """C{[plugins.access]}.

    @ivar client: client rules, C{"PATTERN ACTION [text]"}.
    @ivar helo: HELO rules.
    @ivar sender: MAIL FROM rules.
    @ivar recipient: RCPT TO rules.
    @ivar file: a rules file, C{"TYPE PATTERN ACTION [text]"} per line.
    @ivar check_interval: seconds between checks of the file for changes.
    @ivar delay_reject: check every list at RCPT (True) or each at its
        own command (False).
    """

    client: tuple[str, ...] = ()
    helo: tuple[str, ...] = ()
    sender: tuple[str, ...] = ()
    recipient: tuple[str, ...] = ()
    file: str = ""
    check_interval: float = 1.0
    delay_reject: bool = True

    def __post_init__(self) -> None:
        for kind in KINDS:
            for text in getattr(self, kind):
                try:
                    parse_rule(kind, text)
                except ValueError as exc:
                    raise ValueError(f"{kind}: {exc}") from None
        if self.check_interval < 0:
            raise ValueError(f"check_interval must not be negative; got {self.check_interval!r}")

    def rules(self) -> dict[str, tuple[Rule, ...]]:
        """The config's rules by type."""
        return {kind: tuple(parse_rule(kind, text) for text in getattr(self, kind)) for kind in KINDS}


@implementer(IRcptCheck)
class AccessList:
    """The C{access} plugin.

    With C{delay_reject = false}, L{build} also declares L{IConnectCheck},
    L{IHeloCheck} and L{IMailCheck} on the object, so each list runs at
    its own stage; otherwise only RCPT is taken part in.
    """

    log = Logger()

    def __init__(self, options: Options, context: Any) -> None:
        from twisted.internet import defer

        self._defer = defer
        self.options = options
        self._name = context.name
        self._clock = context.clock
        self._run_in_thread = context.run_in_thread
        self._config_rules = options.rules()
        self._file_rules: dict[str, tuple[Rule, ...]] = {kind: () for kind in KINDS}
        self._path = os.path.abspath(options.file) if options.file else ""
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._loading: Any = None
        self._waiting: list[Any] = []
        self._last_problem = ""
        if self._path:
            from gateway.config import ConfigError

            try:
                self._stamp, self._file_rules = _read_file(self._path)
            except OSError as exc:
                raise ConfigError(context.config.path, f"[plugins.{self._name}] file",
                                  f"cannot read {self._path}: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise ConfigError(context.config.path, f"[plugins.{self._name}] file", str(exc)) from None
            self._next_check = self._clock.seconds() + options.check_interval

    # -- the rules in force --------------------------------------------------

    def rules(self, kind: str) -> tuple[Rule, ...]:
        """The rules of C{kind} in force: the config's, then the file's."""
        return self._config_rules[kind] + self._file_rules[kind]

    def refresh(self) -> Any:
        """Check the file when it is due.

        @return: None when the rules in force may be used now, else a
            Deferred that fires (never errbacks) once the file was checked
            and, if it changed, read again.
        """
        if not self._path:
            return None
        if self._loading is None:
            now = self._clock.seconds()
            if now < self._next_check:
                return None
            self._next_check = now + self.options.check_interval
            loading = self._defer.maybeDeferred(self._run_in_thread, _reload_if_changed, self._path, self._stamp)
            loading.addCallbacks(self._loaded, self._load_failed)
            if loading.called:
                return None
            self._loading = loading
        waiter = self._defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def _loaded(self, result: Any) -> None:
        if result is not None:
            self._stamp, self._file_rules = result
            self.log.info("access rules reloaded from {path}", path=self._path)
        self._last_problem = ""
        self._wake()

    def _load_failed(self, failure: Any) -> None:
        problem = failure.getErrorMessage()
        if problem != self._last_problem:
            self.log.error("access file {path} not (re)loaded, keeping the rules in force: {reason}",
                       path=self._path, reason=problem)
            self._last_problem = problem
        self._wake()

    def _wake(self) -> None:
        self._loading = None
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    # -- deciding -----------------------------------------------------------

    def first_match(self, kind: str, value: Any) -> Rule | None:
        """The first rule of C{kind} in force that matches C{value}, or None."""
        for rule in self.rules(kind):
            try:
                if rule.matches(value):
                    return rule
            except (ValueError, AttributeError):
                continue
        return None

    def _verdict(self, rule: Rule, shown: str) -> Verdict:
        action = rule.action
        if action == "DUNNO":
            return CONTINUE
        if action == "OK":
            return accept()
        if action == "REJECT":
            code, status, text = 550, "5.7.1", rule.text or "Access denied"
        elif action == "DEFER":
            code, status, text = 451, "4.7.1", rule.text or "Access temporarily denied"
        else:
            code = int(action)
            status = f"{action[0]}.7.1"
            text = rule.text or ("Access denied" if code >= 500 else "Access temporarily denied")
        text = f"{_SUBJECT[rule.kind]}: {text}"
        if shown:
            text = f"{shown}: {text}"
        reply = Reply(code, status, text)
        return Verdict(Action.REJECT if code >= 500 else Action.TEMPFAIL, reply)

    def _values(self, session: Any, transaction: Any, kind: str, **given: Any) -> tuple[Any, str]:
        """(the value rules of C{kind} match, its form for the reply)."""
        if kind == "client":
            return (_address(session.peer), _name_text(session.peer_name)), ""
        if kind == "helo":
            helo = given.get("helo", session.helo) or ""
            return helo, f"<{_printable(helo, 100)}>"
        if kind == "sender":
            sender = given.get("sender", transaction.sender if transaction is not None else None)
            return sender, f"<{_printable(str(sender) if sender is not None else '', 100)}>"
        recipient = given["recipient"]
        return recipient.mailbox, f"<{_printable(recipient.address, 100)}>"

    def _run(self, kinds: tuple[str, ...], session: Any, transaction: Any, **given: Any) -> Any:
        pending = self.refresh()
        if pending is None:
            return self._check(kinds, session, transaction, given)
        return pending.addCallback(lambda _: self._check(kinds, session, transaction, given))

    def _check(self, kinds: tuple[str, ...], session: Any, transaction: Any, given: dict[str, Any]) -> Verdict:
        results = transaction.results if transaction is not None else session.results
        for kind in kinds:
            value, shown = self._values(session, transaction, kind, **given)
            rule = self.first_match(kind, value)
            if rule is None:
                continue
            _record(results, self._name, rule.action.lower(), f"{kind} {rule.pattern}")
            verdict = self._verdict(rule, shown)
            if verdict.is_final:
                return verdict
            # DUNNO: this list has spoken; go on with the next one.
        return CONTINUE

    # -- the stages ------------------------------------------------------------

    def check_connect(self, session: Any) -> Any:
        return self._run(("client",), session, None)

    def check_helo(self, session: Any, name: str) -> Any:
        return self._run(("helo",), session, None, helo=name)

    def check_mail(self, session: Any, transaction: Any, sender: Any) -> Any:
        return self._run(("sender",), session, transaction, sender=sender)

    def check_rcpt(self, session: Any, transaction: Any, recipient: Any) -> Any:
        kinds = KINDS if self.options.delay_reject else ("recipient",)
        return self._run(kinds, session, transaction, recipient=recipient)


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "access"
    options_type = Options
    description = "Access lists: OK/REJECT/DEFER/DUNNO by client address or name, HELO, sender and recipient."

    @staticmethod
    def build(options: Options, context: Any) -> AccessList:
        plugin = AccessList(options, context)
        if not options.delay_reject:
            alsoProvides(plugin, IConnectCheck, IHeloCheck, IMailCheck)
        return plugin


factory = _Factory
