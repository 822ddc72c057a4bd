# -*- test-case-name: tests.test_dmarc -*-
"""dmarc: apply the author domain's DMARC policy to incoming mail (RFC 7489).

Put it on the MX listener after C{dkim_verify} (and after C{spf}, when
installed): it reads their results.  The message passes DMARC when a DKIM
signature that passed (C{transaction.notes["dkim"]}) or an SPF check that
passed (C{transaction.notes["spf"]}, C{{"result": "pass", "domain": ...}})
is aligned with the From: domain: the same domain with C{adkim=s}/C{aspf=s}
(strict), the same organisational domain with C{r} (relaxed, the default).
The organisational domain comes from the Public Suffix List shipped with
the C{publicsuffixlist} package (never downloaded at run time).

The policy is looked up at C{_dmarc.<From domain>}, then, when there is
none, at C{_dmarc.<organisational domain>}, whose C{sp=} then applies.
When the message fails:

  - C{p=reject}: C{550 5.7.1 Message rejected by the DMARC policy of
    <domain>: ...}; nothing is queued.  With C{reject_action = "tag"} it
    is tagged instead.
  - C{p=quarantine}: tagged (a header field, below).  Holding the message
    in the queue needs queue support that does not exist yet; with
    C{quarantine_action = "reject"} it is refused like p=reject.
  - C{p=none}: tagged.

C{pct=} is honoured: a failing message not in the sampled percentage gets
the next lower policy (reject becomes quarantine, quarantine becomes none,
RFC 7489 §6.6.4).  The tag is a header field, C{X-DMARC-Result: fail
(p=quarantine dis=quarantine) header.from=example.org} by default, for the
internal server to file or score on; it is only added on failure (the
Authentication-Results writer reports every result).

Authenticated sessions and clients in C{[server] trusted_networks} are not
checked (their mail is ours).  A message with several From: fields or
addresses is refused with C{550 5.6.0} (one could be checked while the
reader sees the other), unless C{reject_multiple_from = false}; one without
From: gets the result C{none}.

Results, in C{transaction.notes["dmarc"]}: C{result} (C{pass}, C{fail},
C{none}: no policy, C{temperror}: the policy could not be fetched,
C{permerror}: a broken record or From:), C{policy} (the published p= or sp=
that applies), C{domain} (the From: domain), C{disposition} (what was
done: C{none}, C{quarantine} (tagged) or C{reject}), C{policy_domain},
C{reason}, C{dkim_aligned}, C{spf_aligned}.

Options (C{[plugins.dmarc]}): C{reject_action} (C{"reject"} or C{"tag"}),
C{quarantine_action} (C{"tag"} or C{"reject"}), C{tag_header}
(C{"X-DMARC-Result"}), C{reject_multiple_from} (true).  The common C{mode =
"warn"} logs the rejections instead (the notes still say what the policy
asked).  Not done: aggregate and failure reports (rua=, ruf=) and the np=
tag of RFC 9091.

Standards: RFC 7489 §3.1 (alignment), §3.2 (organisational domain), §6.3
(tags), §6.6 (receiver actions), RFC 8601 §2.7 (result names).
See also: plugins/dkim_verify.py; gateway.dkimkeys (author domain, TXT
look-ups); OpenDMARC.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.dkimkeys import AmbiguousAuthorError, AuthorError, author_domain, lookup_txt, raw_values
from gateway.dns import DNSTemporaryError
from gateway.interfaces import IMessageCheck, IPluginFactory
from gateway.verdict import CONTINUE, Verdict, cont, reject

NAME = "dmarc"
POLICIES = ("none", "quarantine", "reject")
ACTIONS = ("reject", "tag")
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


class DMARCRecordError(ValueError):
    """A DMARC record that cannot be used (RFC 7489 §6.6.3); C{str()} says why."""


@dataclass(frozen=True)
class Options:
    """C{[plugins.dmarc]}; see the module docstring."""

    reject_action: str = "reject"
    quarantine_action: str = "tag"
    tag_header: str = "X-DMARC-Result"
    reject_multiple_from: bool = True

    def __post_init__(self) -> None:
        for key in ("reject_action", "quarantine_action"):
            if getattr(self, key) not in ACTIONS:
                raise ValueError(f"{key}: must be \"reject\" or \"tag\"; got {getattr(self, key)!r}")
        if not _HEADER_NAME.fullmatch(self.tag_header):
            raise ValueError(f"tag_header: not a header field name: {self.tag_header!r}")


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    """The tags of a DMARC record that matter to a receiver.

    @ivar policy: p=.
    @ivar subdomain_policy: sp=, or None when absent.
    @ivar adkim: C{"r"} (relaxed) or C{"s"} (strict).
    @ivar aspf: C{"r"} or C{"s"}.
    @ivar pct: 0-100.
    """

    policy: str
    subdomain_policy: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The DMARC outcome for one message (what goes into the notes)."""

    result: str
    domain: str | None
    policy: str | None = None
    disposition: str = "none"
    policy_domain: str | None = None
    reason: str = ""
    dkim_aligned: bool = False
    spf_aligned: bool = False

    def as_note(self) -> dict[str, Any]:
        """The dict stored in C{transaction.notes["dmarc"]}."""
        return {"result": self.result, "policy": self.policy, "domain": self.domain,
                "disposition": self.disposition, "policy_domain": self.policy_domain,
                "reason": self.reason, "dkim_aligned": self.dkim_aligned, "spf_aligned": self.spf_aligned}


def is_dmarc_record(text: str) -> bool:
    """True for a TXT string that starts with C{v=DMARC1}; others at
    C{_dmarc.} names are ignored (RFC 7489 §6.6.3 step 3)."""
    return _VERSION.match(text) is not None


def parse_record(text: str) -> DMARCRecord:
    """Parse a DMARC record.

    Unknown tags and malformed optional tags are ignored (their defaults
    apply, RFC 7489 §6.3).  A missing or invalid p= (or an invalid sp=)
    makes the record p=none when it has a rua= tag, and unusable otherwise
    (§6.6.3 step 6).

    @raise DMARCRecordError: not a DMARC record, or no usable policy.
    """
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        name, equals, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if index == 0 and (name != "v" or value != "DMARC1"):
            raise DMARCRecordError("does not start with v=DMARC1")
        if equals and name:
            tags.setdefault(name, value)
    policy = tags.get("p", "").lower()
    subdomain = tags["sp"].lower() if "sp" in tags else None
    if policy not in POLICIES or (subdomain is not None and subdomain not in POLICIES):
        if "mailto:" not in tags.get("rua", "").lower():
            raise DMARCRecordError("no valid p= tag (and no rua=)")
        policy, subdomain = "none", None
    pct = tags.get("pct", "100")
    return DMARCRecord(
        policy=policy, subdomain_policy=subdomain,
        adkim=tags.get("adkim", "r").lower() if tags.get("adkim", "r").lower() in ("r", "s") else "r",
        aspf=tags.get("aspf", "r").lower() if tags.get("aspf", "r").lower() in ("r", "s") else "r",
        pct=int(pct) if pct.isdigit() and 0 <= int(pct) <= 100 else 100,
    )


def organizational_domain(domain: str, psl: Any) -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix plus
    one label; a public suffix itself is its own.

    @param psl: a C{publicsuffixlist.PublicSuffixList}.
    """
    return psl.privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: str, organization: Callable[[str], str]) -> bool:
    """Whether an authenticated domain (DKIM d=, SPF domain) is aligned
    with the author domain: equal for C{mode="s"}, with the same
    organisational domain for C{"r"} (RFC 7489 §3.1).  Both are compared
    in lower case without a trailing dot."""
    identifier = identifier.lower().rstrip(".")
    author = author.lower().rstrip(".")
    if not identifier or not author:
        return False
    if identifier == author:
        return True
    return mode == "r" and organization(identifier) == organization(author)


def evaluate(domain: str, record: DMARCRecord, policy_domain: str, dkim: Sequence[Mapping[str, Any]],
             spf: Mapping[str, Any] | None, organization: Callable[[str], str],
             rng: Any) -> Evaluation:
    """Judge one message against its policy (pure: no I/O).

    @param domain: the From: domain.
    @param policy_domain: where the record was found (the From: domain, or
        its organisational domain, which makes sp= apply).
    @param dkim: C{notes["dkim"]} (only C{pass} results count).
    @param spf: C{notes["spf"]}, or None.
    @param rng: an object with C{random()} for the pct= sample.
    """
    dkim_aligned = any(r.get("result") == "pass" and aligned(str(r.get("domain", "")), domain, record.adkim,
                                                             organization) for r in dkim)
    spf_aligned = bool(spf) and spf.get("result") == "pass" and aligned(
        str(spf.get("domain") or ""), domain, record.aspf, organization)
    policy = record.policy
    if policy_domain != domain and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    if dkim_aligned or spf_aligned:
        return Evaluation("pass", domain, policy, "none", policy_domain,
                          "aligned " + " and ".join(n for n, ok in (("DKIM", dkim_aligned), ("SPF", spf_aligned)) if ok),
                          dkim_aligned, spf_aligned)
    disposition = policy
    if policy != "none" and record.pct < 100 and rng.random() * 100 >= record.pct:
        disposition = POLICIES[POLICIES.index(policy) - 1]
    return Evaluation("fail", domain, policy, disposition, policy_domain,
                      f"no aligned DKIM signature or SPF pass for {domain}", False, False)


@implementer(IMessageCheck)
class DMARCPolicy:
    """Looks the policy up on the reactor (twisted.names) and applies it.

    @param psl: a C{PublicSuffixList} (built once; loading it takes a
        moment).
    @param rng: an object with C{random()} for pct= (tests inject one).
    """

    def __init__(self, options: Options, context: Any, psl: Any = None, rng: Any = None) -> None:
        from plugins.relay_guard import RelayGuard

        if psl is None:
            from publicsuffixlist import PublicSuffixList

            psl = PublicSuffixList()
        self.options = options
        self.psl = psl
        self.rng = rng if rng is not None else random.Random()
        self._resolver = context.resolver
        self._guard = RelayGuard(context)

    def organization(self, domain: str) -> str:
        """L{organizational_domain} with this plugin's list."""
        return organizational_domain(domain, self.psl)

    def check_message(self, session: Any, transaction: Any, message: Any) -> Verdict | defer.Deferred:
        if self._guard.is_trusted(session):
            transaction.results.add(NAME, "skip", "authenticated or trusted client")
            return CONTINUE
        try:
            domain = author_domain(message.headers)
        except AuthorError as exc:
            if not raw_values(message.headers, "From"):
                return self._record(transaction, Evaluation("none", None, reason="no From: field"))
            if self.options.reject_multiple_from and isinstance(exc, AmbiguousAuthorError):
                transaction.results.add(NAME, "refused", str(exc))
                return reject(550, "5.6.0", str(exc))
            return self._record(transaction, Evaluation("permerror", None, reason=str(exc)))
        return defer.Deferred.fromCoroutine(self._check(transaction, domain))

    async def _check(self, transaction: Any, domain: str) -> Verdict:
        try:
            found = await self.discover(domain)
        except DNSTemporaryError as exc:
            return self._record(transaction, Evaluation("temperror", domain, reason=str(exc)))
        except DMARCRecordError as exc:
            return self._record(transaction, Evaluation("permerror", domain, reason=str(exc)))
        if found is None:
            return self._record(transaction, Evaluation("none", domain, reason="no DMARC record"))
        record, policy_domain = found
        evaluation = evaluate(domain, record, policy_domain, transaction.notes.get("dkim") or (),
                              transaction.notes.get("spf"), self.organization, self.rng)
        return self._apply(transaction, evaluation)

    async def discover(self, domain: str) -> tuple[DMARCRecord, str] | None:
        """The record for C{domain} and where it was found: at
        C{_dmarc.<domain>}, else at the organisational domain's.

        @raise DNSTemporaryError: a look-up failed temporarily.
        @raise DMARCRecordError: several records at one name, or a broken one.
        """
        for candidate in dict.fromkeys((domain, self.organization(domain))):
            texts = [t.decode("utf-8", "replace") for t in await lookup_txt(self._resolver, f"_dmarc.{candidate}")]
            records = [t for t in texts if is_dmarc_record(t)]
            if len(records) > 1:
                raise DMARCRecordError(f"{len(records)} DMARC records at _dmarc.{candidate}")
            if records:
                return parse_record(records[0]), candidate
        return None

    def _apply(self, transaction: Any, evaluation: Evaluation) -> Verdict:
        action = {"reject": self.options.reject_action, "quarantine": self.options.quarantine_action,
                  "none": "tag"}[evaluation.disposition]
        if evaluation.result == "fail" and action == "reject":
            evaluation = replace(evaluation, disposition="reject")
            self._record(transaction, evaluation)
            return reject(550, "5.7.1", f"Message rejected by the DMARC policy of {evaluation.policy_domain}: "
                                        f"{evaluation.reason}")
        if evaluation.result == "fail":
            evaluation = replace(evaluation, disposition="quarantine" if evaluation.disposition != "none" else "none")
            self._record(transaction, evaluation)
            tag = (f"fail (p={evaluation.policy} dis={evaluation.disposition}) "
                   f"header.from={evaluation.domain}")
            return cont(add_headers=((self.options.tag_header, tag),))
        return self._record(transaction, evaluation)

    def _record(self, transaction: Any, evaluation: Evaluation) -> Verdict:
        transaction.notes["dmarc"] = evaluation.as_note()
        detail = f"header.from={evaluation.domain or '-'}"
        if evaluation.policy is not None:
            detail += f" p={evaluation.policy} dis={evaluation.disposition}"
        transaction.results.add(NAME, evaluation.result, detail)
        return CONTINUE


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = NAME
    options_type = Options
    description = "Apply the From: domain's DMARC policy (reject, quarantine by tag, none) with SPF/DKIM alignment."

    @staticmethod
    def build(options: Options, context: Any) -> DMARCPolicy:
        from twisted.logger import Logger

        for listener in context.config.listeners:
            if NAME in listener.plugins and "dkim_verify" not in listener.plugins[:listener.plugins.index(NAME)]:
                Logger().warn("dmarc on listener {listener} has no dkim_verify before it: only SPF can "
                              "align there", listener=listener.name)
        return DMARCPolicy(options, context)


factory = _Factory
