# -*- test-case-name: tests.test_dkim -*-
"""dkim_sign: DKIM-sign mail from authenticated and trusted clients.

Put it on the submission listeners (and on any listener that takes mail
from C{[server] trusted_networks}), last in the plugin list.  It signs a
message when the client is authenticated or in C{trusted_networks} and the
author domain (the one address in From:) has a key.  Mail from any other
client passes unsigned: the gateway never signs what the internet sends it.

Keys are files, found by name (no list in the config), and picked up with
the next message (no reload)::

    <keys_dir>/<domain>/<selector>.rsa.key       signs rsa-sha256
    <keys_dir>/<domain>/<selector>.ed25519.key   signs ed25519-sha256

Every key of the domain signs, so an RSA and an Ed25519 key give two
DKIM-Signature fields (dual signing, RFC 8463 §6): verifiers that know
Ed25519 use both, the others ignore it and use the RSA one.
C{gatewayctl dkim keygen DOMAIN SELECTOR [--algorithm rsa|ed25519]} makes a
key (mode 0600) and prints the TXT record to publish;
C{gatewayctl dkim show [DOMAIN]} prints the keys and records in use.

What is signed: the message as the client sent it, header fields and body,
with c=relaxed/relaxed by default.  Of the C{headers} list, each field
present is signed (every instance), and From: is signed once more than it
occurs ("oversigning"), so a second From: added later breaks the signature.
The DKIM-Signature is prepended to the message, above the client's header
fields.  The gateway's own Received:, and the Date: and Message-ID: the
submission listener adds when the client left them out, are added after
signing and are not signed: clients should send Date: and Message-ID:
themselves (every mail program does), or those fields are not covered.

A key file of the author domain that cannot be read or is not a key
gives C{451 4.3.0} and a logged traceback (fail closed), never mail that
silently goes out unsigned.

Refused on submission listeners: a message from a client that would be
signed, with no From:, several From: fields, or a From: with several
addresses or no valid domain, gets C{550 5.6.0} (for example C{Message
must have exactly one From: header}): DMARC judges exactly one author
domain, and a receiver would.  On other listeners (trusted internal
servers relaying) such a message is passed on unsigned.

Options (C{[plugins.dkim_sign]}):

  - C{keys_dir} (default C{"var/dkim"}; relative to the working directory):
    where the keys live.
  - C{headers}: the fields to sign when present.  Default: From, Sender,
    Reply-To, To, Cc, Subject, Date, Message-ID, In-Reply-To, References,
    MIME-Version, Content-Type, Content-Transfer-Encoding, Content-ID,
    Content-Description, List-Id, List-Unsubscribe, List-Unsubscribe-Post,
    Resent-Date, Resent-From, Resent-To, Resent-Cc, Resent-Message-ID.  It
    must contain From; Received, Return-Path, Bcc, Resent-Bcc, Comments,
    Keywords and DKIM-Signature are refused (RFC 6376 §5.4).
  - C{oversign_from} (default true): sign From: one extra time.
  - C{canonicalization} (default C{"relaxed/relaxed"}): header/body, each
    C{simple} or C{relaxed}.
  - C{subdomains} (default false): with no key for the author domain, sign
    with the key of its nearest parent domain that has one (d=example.com
    for From: a@news.example.com; DMARC's relaxed alignment accepts that).

Cost: dkimpy takes the message as bytes, so the body is read into memory
in the worker thread (the reactor never waits: the signing runs through
C{context.run_in_thread}).  Measured for a 20 MiB message (Python 3.11,
dkimpy 1.1.8, peak of Python allocations while signing): 45 MiB for a
typical one (a base64 attachment), 0.8 s with one RSA key and 1.3 s with
RSA and Ed25519; 118 MiB at worst (every line ending in white space, which
relaxed canonicalization rewrites line by line), 1.2 s and 2.1 s.  About
2.2 to 6 times the message size, per message being signed at the same
time; C{[server] max_message_size} bounds it.

Standards: RFC 6376 (DKIM), RFC 8463 (Ed25519-SHA256), RFC 8301 (no
rsa-sha1, RSA keys of 1024 bits or more), RFC 7489 §3.1 (author domain),
RFC 8058 §4 (sign List-Unsubscribe-Post).
See also: plugins/dkim_verify.py, plugins/dmarc.py, gateway/dkimkeys.py;
OpenDKIM's KeyTable/SigningTable (the configuration this file convention
replaces).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.dkimkeys import DEFAULT_KEYS_DIR, AuthorError, KeyStore, SigningKey, author_domain, read_for_dkim
from gateway.interfaces import IMessageCheck, IPluginFactory
from gateway.verdict import CONTINUE, Verdict, cont, reject

NAME = "dkim_sign"

#: Signed when present (RFC 6376 §5.4.1, plus Message-ID and the MIME fields).
SIGNED_HEADERS = (
    "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-ID", "Content-Description", "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post",
    "Resent-Date", "Resent-From", "Resent-To", "Resent-Cc", "Resent-Message-ID",
)

#: Never signed: changed or added in transit, or secret (RFC 6376 §5.4).
UNSIGNABLE = frozenset({"return-path", "received", "comments", "keywords", "bcc", "resent-bcc",
                        "dkim-signature"})

CANONICALIZATIONS = ("simple", "relaxed")


@dataclass(frozen=True)
class Options:
    """C{[plugins.dkim_sign]}; see the module docstring."""

    keys_dir: str = DEFAULT_KEYS_DIR
    headers: tuple[str, ...] = SIGNED_HEADERS
    oversign_from: bool = True
    canonicalization: str = "relaxed/relaxed"
    subdomains: bool = False

    def __post_init__(self) -> None:
        lowered = [name.lower() for name in self.headers]
        for name in lowered:
            if not name or any(c in name for c in ": \t\r\n") or not name.isascii() or not name.isprintable():
                raise ValueError(f"headers: {name!r} is not a header field name")
        if "from" not in lowered:
            raise ValueError("headers: must contain From (RFC 6376 §5.4)")
        refused = sorted(set(lowered) & UNSIGNABLE)
        if refused:
            raise ValueError(f"headers: {refused[0]} must not be signed (RFC 6376 §5.4)")
        parts = self.canonicalization.lower().split("/")
        if len(parts) != 2 or any(part not in CANONICALIZATIONS for part in parts):
            raise ValueError(f"canonicalization: use header/body, each simple or relaxed; "
                             f"got {self.canonicalization!r}")

    @property
    def canonicalize(self) -> tuple[bytes, bytes]:
        """The (header, body) pair for dkimpy."""
        header, body = self.canonicalization.lower().split("/")
        return header.encode(), body.encode()


def signed_header_names(headers: Sequence[tuple[bytes, bytes]], options: Options) -> list[bytes]:
    """The h= list for a message: each configured field once per instance
    present, in the configured order, then From once more when
    oversigning (a name listed more often than it occurs signs the absence
    of one more, RFC 6376 §5.4.2).

    @param headers: the message's fields as dkimpy parsed them.
    """
    present = Counter(name.lower() for name, _ in headers)
    names: list[bytes] = []
    for name in dict.fromkeys(h.lower().encode("ascii") for h in options.headers):
        names.extend([name] * present[name])
    if options.oversign_from:
        names.append(b"from")
    return names


def sign_message(message: Any, keys: Sequence[SigningKey], options: Options) -> tuple[tuple[str, str], ...]:
    """One DKIM-Signature per key, as (name, value) for C{add_headers}.

    Each signature covers only the message's own fields and body, never
    another signature made here, so they verify independently.

    @param message: a C{dkim.DKIM} over the message (L{read_for_dkim}).
    @return: the fields in key order; values keep dkimpy's folding (so they
        verify with simple header canonicalization too).
    """
    include = signed_header_names(message.headers, options)
    out = []
    for key in keys:
        raw = message.sign(key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                           signature_algorithm=key.signature_algorithm.encode("ascii"),
                           canonicalize=options.canonicalize, include_headers=include)
        name, _, value = raw.decode("ascii").partition(":")
        out.append((name, value.strip()))
    return tuple(out)


@implementer(IMessageCheck)
class DKIMSigner:
    """Signs at the end of DATA, in a worker thread.

    @ivar store: the L{KeyStore} over C{keys_dir}.
    """

    log = Logger()

    def __init__(self, options: Options, context: Any, store: KeyStore | None = None) -> None:
        from plugins.relay_guard import RelayGuard

        self.options = options
        self.store = store if store is not None else KeyStore(options.keys_dir)
        self._guard = RelayGuard(context)
        self._run_in_thread = context.run_in_thread
        self._config = context.config

    def check_message(self, session: Any, transaction: Any, message: Any) -> Verdict | defer.Deferred:
        if not self._guard.is_trusted(session):
            transaction.results.add(NAME, "skip", "client neither authenticated nor trusted")
            return CONTINUE
        try:
            domain = author_domain(message.headers)
        except AuthorError as exc:
            if not self._is_submission(session):
                # Relayed mail from trusted servers is passed on unsigned:
                # refusing it is the submission port's job (RFC 6409 §8).
                transaction.results.add(NAME, "skip", str(exc))
                return CONTINUE
            transaction.results.add(NAME, "refused", str(exc))
            return reject(550, "5.6.0", str(exc))
        return defer.Deferred.fromCoroutine(self._sign(transaction, message.open, domain))

    async def _sign(self, transaction: Any, open_message: Callable[[], Any], domain: str) -> Verdict:
        import dkim

        try:
            fields = await self._run_in_thread(self.sign_spooled, open_message, domain)
        except dkim.MessageFormatError as exc:
            transaction.results.add(NAME, "refused", str(exc))
            return reject(550, "5.6.0", "Malformed header section, cannot DKIM-sign the message")
        if not fields:
            transaction.results.add(NAME, "skip", f"no key for {domain}")
            return CONTINUE
        transaction.results.add(NAME, "pass", " ".join(_tag(value, "d") + "/" + _tag(value, "s")
                                                      for _, value in fields))
        return cont(add_headers=fields)

    def _is_submission(self, session: Any) -> bool:
        try:
            return self._config.listener(session.listener).submission
        except KeyError:
            return True

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys of C{domain}, or with C{subdomains} those of its
        nearest parent that has some (never the top-level domain)."""
        keys = self.store.keys_for(domain)
        if keys or not self.options.subdomains:
            return keys
        labels = domain.split(".")
        for start in range(1, len(labels) - 1):
            keys = self.store.keys_for(".".join(labels[start:]))
            if keys:
                return keys
        return ()

    def sign_spooled(self, open_message: Callable[[], Any], domain: str) -> tuple[tuple[str, str], ...]:
        """Read the spooled message and sign it (runs in a worker thread)."""
        keys = self.keys_for(domain)
        if not keys:
            return ()
        with open_message() as handle:
            message = read_for_dkim(handle)
        return sign_message(message, keys, self.options)


def _tag(value: str, tag: str) -> str:
    """One tag of a DKIM-Signature value (for the log line)."""
    for part in value.replace("\r\n", "").split(";"):
        name, _, text = part.partition("=")
        if name.strip() == tag:
            return text.strip()
    return "?"


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = NAME
    options_type = Options
    description = "DKIM-sign mail from authenticated and trusted clients (RSA and Ed25519, dual signing)."

    @staticmethod
    def build(options: Options, context: Any) -> DKIMSigner:
        store = KeyStore(options.keys_dir)
        if not os.path.isdir(store.keys_dir):
            DKIMSigner.log.warn("dkim_sign: keys_dir {path} does not exist: nothing is signed until "
                                "a key is made (gatewayctl dkim keygen)", path=store.keys_dir)
        return DKIMSigner(options, context, store)


factory = _Factory
