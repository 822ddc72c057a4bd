# -*- test-case-name: tests.test_dkim -*-
"""dkim_verify: check every DKIM signature on incoming mail (MX listener).

It never rejects: it records one result per DKIM-Signature field for the
plugins after it (C{dmarc}, which needs a passing DKIM domain, and the
Authentication-Results writer) and for the transaction's log line.  Put it
before C{dmarc} in the MX listener's plugin list.

How it stays off the reactor: the key records (TXT at
C{<s>._domainkey.<d>}) are fetched first through the gateway's
twisted.names resolver, all at once; then dkimpy verifies in a worker
thread (C{context.run_in_thread}), getting the prefetched records through
its C{dnsfunc} parameter, so it never does DNS itself.

Results (C{transaction.notes["dkim"]}, a list in signature order, each a
dict with C{result}, C{domain} (d=), C{selector} (s=), C{algorithm} (a=),
C{reason} and C{header_b} (the first 12 characters of b=, RFC 6008)):

  - C{pass}: the signature verifies;
  - C{fail}: it does not (the body or a signed header changed);
  - C{permerror}: it cannot be used: malformed or expired signature, no
    key record, a revoked or unusable key, a key of another type than a=,
    RSA below C{min_rsa_bits}, or rsa-sha1 (RFC 8301 forbids accepting it);
  - C{temperror}: the key could not be fetched (timeout, SERVFAIL).

A message without signatures gets C{notes["dkim"] = []} and the log result
C{none}.  Only the first C{max_signatures} fields are checked (default 5,
RFC 6376 §6.1 lets a verifier limit them; the rest are left out).

Cost: like C{dkim_sign}, the body is read into memory in the worker: for
a 20 MiB message a peak of 41 MiB (base64 attachment) to 114 MiB (every
line ending in white space), 0.5 to 1 s per signature.

Options (C{[plugins.dkim_verify]}): C{max_signatures} (5),
C{min_rsa_bits} (1024).

Standards: RFC 6376 §6 (verification), RFC 8463 (Ed25519-SHA256), RFC 8301
(rsa-sha1 and short keys), RFC 8601 §2.7.1 (result names).
See also: plugins/dmarc.py, plugins/dkim_sign.py; gateway.dkimkeys.lookup_txt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.dkimkeys import MIN_RSA_BITS, lookup_txt, raw_values, read_for_dkim, record_name
from gateway.dns import DNSTemporaryError
from gateway.interfaces import IMessageCheck, IPluginFactory
from gateway.verdict import CONTINUE, Verdict

NAME = "dkim_verify"

#: A key record that could not be fetched (the look-up may succeed later).
TEMPERROR = None


@dataclass(frozen=True)
class Options:
    """C{[plugins.dkim_verify]}; see the module docstring."""

    max_signatures: int = 5
    min_rsa_bits: int = MIN_RSA_BITS

    def __post_init__(self) -> None:
        if self.max_signatures < 1:
            raise ValueError("max_signatures: must be at least 1")
        if self.min_rsa_bits < MIN_RSA_BITS:
            raise ValueError(f"min_rsa_bits: RFC 8301 requires at least {MIN_RSA_BITS}")


def signature_tags(value: str) -> dict[str, str]:
    """The tags of a DKIM-Signature value; C{{}} when it does not parse."""
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        tags = parse_tag_value(value.encode("utf-8", "surrogateescape"))
    except (InvalidTagValueList, ValueError):
        return {}
    return {k.decode("ascii", "replace"): v.decode("utf-8", "replace") for k, v in tags.items()}


def key_name(tags: Mapping[str, str]) -> str | None:
    """The key record's name for a signature's tags, or None when d= or s=
    is missing or not a domain (nothing to look up)."""
    from gateway.dkimkeys import DKIMKeyError, check_domain

    domain, selector = tags.get("d", "").strip(), tags.get("s", "").strip()
    if not domain or not selector:
        return None
    try:
        return record_name(check_domain(domain), selector.lower())
    except DKIMKeyError:
        return None


def verify_message(message: Any, records: Mapping[str, list[bytes] | None], options: Options) -> list[dict[str, str]]:
    """Verify the first C{max_signatures} signatures (runs in a thread).

    @param message: a C{dkim.DKIM} over the message (L{read_for_dkim}).
    @param records: key record name -> TXT records, or L{TEMPERROR}.
    @return: one result dict per signature, in header order.
    """
    count = sum(1 for name, _ in message.headers if name.lower() == b"dkim-signature")
    return [_verify_one(message, index, records) for index in range(min(count, options.max_signatures))]


def _verify_one(message: Any, index: int, records: Mapping[str, list[bytes] | None]) -> dict[str, str]:
    import dkim

    raw = [v for n, v in message.headers if n.lower() == b"dkim-signature"][index]
    tags = signature_tags(raw.decode("utf-8", "surrogateescape"))
    result = {"result": "permerror", "domain": tags.get("d", "").strip().lower(),
              "selector": tags.get("s", "").strip(), "algorithm": tags.get("a", "").strip().lower(),
              "reason": "", "header_b": "".join(tags.get("b", "").split())[:12]}

    def outcome(name: str, reason: str) -> dict[str, str]:
        result.update(result=name, reason=reason)
        return result

    try:
        message.verify_headerprep(index)
    except dkim.DKIMException as exc:
        return outcome("permerror", f"bad signature: {exc}")
    if result["algorithm"] == "rsa-sha1":
        return outcome("permerror", "rsa-sha1 is not accepted (RFC 8301)")
    name = key_name(tags)
    found = records.get(name, TEMPERROR) if name else []
    if found is TEMPERROR:
        return outcome("temperror", f"key record {name} could not be fetched")
    if not found:
        return outcome("permerror", f"no key record at {name}")
    record = next((r for r in found if b"p=" in r), found[0])
    try:
        _, bits, key_type, _ = dkim.evaluate_pk(name.encode("ascii"), record)
    except dkim.DKIMException as exc:
        return outcome("permerror", f"unusable key: {exc}")
    if not result["algorithm"].startswith(key_type.decode("ascii") + "-"):
        return outcome("permerror", f"{key_type.decode('ascii')} key for a={result['algorithm']}")
    if key_type == b"rsa" and bits < message.minkey:
        return outcome("permerror", f"RSA key of {bits} bits, below {message.minkey}")

    def dnsfunc(query: bytes, timeout: float = 5) -> bytes:
        return record

    try:
        verified = message.verify(index, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return outcome("fail", "body hash mismatch")
        return outcome("permerror", f"bad signature: {exc}")
    except dkim.DKIMException as exc:
        return outcome("permerror", str(exc))
    if verified:
        return outcome("pass", "")
    return outcome("fail", "signature does not verify")


def overall(results: list[dict[str, str]]) -> str:
    """One word for the log line: C{pass} when any signature passed, else
    the first result, C{none} without signatures."""
    if not results:
        return "none"
    if any(r["result"] == "pass" for r in results):
        return "pass"
    return results[0]["result"]


@implementer(IMessageCheck)
class DKIMVerifier:
    """Prefetches key records on the reactor, verifies in a thread."""

    def __init__(self, options: Options, context: Any) -> None:
        self.options = options
        self._resolver = context.resolver
        self._run_in_thread = context.run_in_thread

    def check_message(self, session: Any, transaction: Any, message: Any) -> Verdict | defer.Deferred:
        values = raw_values(message.headers, "DKIM-Signature")[:self.options.max_signatures]
        if not values:
            transaction.notes["dkim"] = []
            transaction.results.add(NAME, "none")
            return CONTINUE
        names = {key_name(signature_tags(value)) for value in values} - {None}
        return defer.Deferred.fromCoroutine(self._verify(transaction, message.open, sorted(names)))

    async def _verify(self, transaction: Any, open_message: Callable[[], Any], names: list[str]) -> Verdict:
        records = await self.fetch_keys(names)
        results = await self._run_in_thread(self.verify_spooled, open_message, records)
        transaction.notes["dkim"] = results
        transaction.results.add(NAME, overall(results), " ".join(
            f"{r['domain']}/{r['selector']}={r['result']}" for r in results))
        return CONTINUE

    async def fetch_keys(self, names: list[str]) -> dict[str, list[bytes] | None]:
        """The TXT records of every key name, looked up concurrently;
        L{TEMPERROR} for a look-up that failed temporarily."""
        lookups = [defer.Deferred.fromCoroutine(lookup_txt(self._resolver, name)) for name in names]
        answers = await defer.DeferredList(lookups, consumeErrors=True)
        records: dict[str, list[bytes] | None] = {}
        for name, (succeeded, value) in zip(names, answers):
            if succeeded:
                records[name] = value
            else:
                value.trap(DNSTemporaryError)
                records[name] = TEMPERROR
        return records

    def verify_spooled(self, open_message: Callable[[], Any],
                       records: Mapping[str, list[bytes] | None]) -> list[dict[str, str]]:
        """Read the spooled message and verify it (runs in a worker thread)."""
        import dkim

        try:
            with open_message() as handle:
                message = read_for_dkim(handle, minkey=self.options.min_rsa_bits)
        except dkim.MessageFormatError as exc:
            return [{"result": "permerror", "domain": "", "selector": "", "algorithm": "",
                     "reason": f"malformed header section: {exc}", "header_b": ""}]
        return verify_message(message, records, self.options)


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = NAME
    options_type = Options
    description = "Verify DKIM signatures (RSA and Ed25519) and record the results for dmarc."

    @staticmethod
    def build(options: Options, context: Any) -> DKIMVerifier:
        return DKIMVerifier(options, context)


factory = _Factory
