# -*- test-case-name: tests.test_dkim -*-
"""DKIM keys on disk, their DNS records, and what the DKIM and DMARC plugins share.

Why keys are found by file name instead of being listed in the config: a
plugin's options are simple values, and a key is a secret that belongs in a
file of mode 0600 anyway.  The file name carries everything the signer needs
to know, so adding, rotating or retiring a key is a file operation that the
running gateway sees on the next message, without a reload::

    <keys_dir>/<domain>/<selector>.<algorithm>.key

C{domain} is the signing domain (d=) in its canonical A-label form,
C{selector} the selector (s=) and C{algorithm} C{rsa} (signs rsa-sha256) or
C{ed25519} (signs ed25519-sha256).  Every such file for a domain signs, so an
RSA and an Ed25519 key in the same folder give two signatures (RFC 8463 §6).
A key file is a PEM private key, PKCS#8 (C{openssl genpkey}) or PKCS#1 (for
RSA, C{openssl genrsa}, C{opendkim-genkey}); a file that holds the base64
Ed25519 seed written by dkimpy's C{dknewkey} is read too.  Other files in the
folders are ignored.

The module also holds the two pieces C{dkim_sign}, C{dkim_verify} and
C{dmarc} all need: the author domain of a message (RFC 5322 From:) and a TXT
look-up through twisted.names that follows CNAMEs (DKIM key records are often
CNAMEs to a mail provider).  It keeps its heavy imports (cryptography,
dkimpy) inside the functions that need them.

Standards: RFC 6376 §3.1 (selectors), §3.6.1 and §3.6.2.2 (the key record
and its TXT form), RFC 8463 (Ed25519 keys, dual signing), RFC 8301 §3.2 (RSA
keys of at least 1024 bits; 2048 recommended), RFC 7489 §3.1 (author
domain), RFC 5322 §3.6.2 (From:), RFC 1035 §3.3.14 (character-strings of at
most 255 octets).
See also: plugins/dkim_sign.py, plugins/dkim_verify.py, plugins/dmarc.py;
opendkim-genkey(8); gateway.dns (the other twisted.names look-ups).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from gateway.address import canonical_domain

#: Where keys live when C{[plugins.dkim_sign] keys_dir} is not set.
DEFAULT_KEYS_DIR = "var/dkim"

#: Key type (the k= of the record and the file name) -> signature algorithm (a=).
ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}

#: RSA key sizes gatewayctl makes and the signer accepts (RFC 8301 §3.2).
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096
DEFAULT_RSA_BITS = 2048

#: A TXT character-string holds at most this many octets (RFC 1035 §3.3.14).
TXT_CHUNK = 255

#: The longest CNAME chain L{lookup_txt} follows.

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
KEY_FILE = re.compile(rf"(?P<selector>{_LABEL}(?:\.{_LABEL})*)\.(?P<algorithm>rsa|ed25519)\.key")


class DKIMKeyError(Exception):
    """A key file cannot be used, or a domain or selector is not valid;
    C{str()} says which and why."""


class AuthorError(ValueError):
    """The message has no single author domain (RFC 5322 From:); C{str()}
    is the text for the SMTP reply."""


class AmbiguousAuthorError(AuthorError):
    """Several From: fields, or several addresses in one: more than one
    domain could be taken for the author's."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One private key, as the signer uses it.

    @ivar domain: the signing domain (d=), canonical A-label form.
    @ivar selector: the selector (s=).
    @ivar algorithm: C{"rsa"} or C{"ed25519"} (the record's k=).
    @ivar path: the key file.
    @ivar private: the key in the form dkimpy's C{sign} takes: PKCS#8 PEM
        for RSA, the base64 32-octet seed for Ed25519.
    @ivar record: the TXT record to publish (C{v=DKIM1; k=...; p=...}).
    @ivar bits: the key size (256 for Ed25519).
    """

    domain: str
    selector: str
    algorithm: str
    path: str
    private: bytes
    record: str
    bits: int

    @property
    def signature_algorithm(self) -> str:
        """The a= value this key signs with, e.g. C{rsa-sha256}."""
        return ALGORITHMS[self.algorithm]

    @property
    def record_name(self) -> str:
        """Where the record is published: C{<selector>._domainkey.<domain>}."""
        return record_name(self.domain, self.selector)

    def __repr__(self) -> str:  # never print the private key
        return f"SigningKey({self.domain!r}, {self.selector!r}, {self.algorithm!r}, {self.path!r})"


def check_domain(domain: str) -> str:
    """The canonical form of a signing domain; raise L{DKIMKeyError}."""
    try:
        canonical = canonical_domain(domain)
    except ValueError as exc:
        raise DKIMKeyError(f"bad domain {domain!r}: {exc}") from None
    if canonical.startswith("["):
        raise DKIMKeyError(f"bad domain {domain!r}: an address literal cannot sign")
    return canonical


def check_selector(selector: str) -> str:
    """A selector in lower case; raise L{DKIMKeyError} unless it is one or
    more DNS labels (RFC 6376 §3.1), which also keeps it a safe file name."""
    lowered = selector.lower()
    if not _SELECTOR.fullmatch(lowered) or len(lowered) > 200:
        raise DKIMKeyError(f"bad selector {selector!r}: use DNS labels (letters, digits, '-', '.')")
    return lowered


def record_name(domain: str, selector: str) -> str:
    """C{<selector>._domainkey.<domain>} (RFC 6376 §3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def key_path(keys_dir: str, domain: str, selector: str, algorithm: str) -> str:
    """The file of one key under the naming convention."""
    if algorithm not in ALGORITHMS:
        raise DKIMKeyError(f"unknown algorithm {algorithm!r}: use {' or '.join(ALGORITHMS)}")
    return os.path.join(keys_dir, check_domain(domain), f"{check_selector(selector)}.{algorithm}.key")


def generate_key(algorithm: str, bits: int = DEFAULT_RSA_BITS) -> Any:
    """A new private key (a C{cryptography} key object)."""
    if algorithm == "rsa":
        from cryptography.hazmat.primitives.asymmetric import rsa

        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise DKIMKeyError(f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algorithm == "ed25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PrivateKey.generate()
    raise DKIMKeyError(f"unknown algorithm {algorithm!r}: use {' or '.join(ALGORITHMS)}")


def private_key_pem(key: Any) -> bytes:
    """The PKCS#8 PEM form written to key files."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt_record(public_key: Any) -> str:
    """The DKIM key record for a public key: C{v=DKIM1; k=rsa; p=...}.

    For RSA, p= is the base64 DER SubjectPublicKeyInfo (what every signer
    publishes and every verifier reads); for Ed25519 it is the base64 of
    the 32-octet raw public key (RFC 8463 §4.2).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        der = public_key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        der = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        raise DKIMKeyError(f"not an RSA or Ed25519 key: {type(public_key).__name__}")
    return f"v=DKIM1; k={kind}; p={base64.b64encode(der).decode('ascii')}"


def txt_chunks(record: str) -> list[str]:
    """The record cut into character-strings of at most 255 octets; a
    verifier joins them without spaces (RFC 6376 §3.6.2.2)."""
    return [record[i:i + TXT_CHUNK] for i in range(0, len(record), TXT_CHUNK)] or [""]


def zone_line(name: str, record: str) -> str:
    """The record as a zone-file line (BIND syntax), split into
    character-strings, for C{gatewayctl dkim keygen} and C{show}."""
    chunks = [f'"{chunk}"' for chunk in txt_chunks(record)]
    if len(chunks) == 1:
        return f"{name}. IN TXT {chunks[0]}"
    return f"{name}. IN TXT ( " + "\n        ".join(chunks) + " )"


def write_key(keys_dir: str, domain: str, selector: str, algorithm: str,
              bits: int = DEFAULT_RSA_BITS) -> SigningKey:
    """Make a key and write it under C{keys_dir}, mode 0600.

    An existing key is never overwritten: its record may be published, and
    replacing it would break every signature made with it that is still
    being verified.  Use a new selector instead (see the README, "Key
    rotation").

    @raise DKIMKeyError: bad name, or the key file exists.
    """
    path = key_path(keys_dir, domain, selector, algorithm)
    key = generate_key(algorithm, bits)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise DKIMKeyError(f"{path} exists: choose another selector (keys are never overwritten)") from None
    try:
        os.write(fd, private_key_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    return load_key(path)


def load_key(path: str) -> SigningKey:
    """Read one key file named by the convention.

    @raise DKIMKeyError: unreadable, not a key, a key of another algorithm
        than its name says, or an RSA key below 1024 bits.
    """
    match = KEY_FILE.fullmatch(os.path.basename(path))
    if match is None:
        raise DKIMKeyError(f"{path}: not named <selector>.<rsa|ed25519>.key")
    algorithm = match["algorithm"]
    domain = os.path.basename(os.path.dirname(os.path.abspath(path)))
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DKIMKeyError(f"{path}: {exc.strerror or exc}") from None
    key = _parse_private(data, algorithm, path)
    if algorithm == "rsa":
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise DKIMKeyError(f"{path}: RSA key of {bits} bits; at least {MIN_RSA_BITS} (RFC 8301)")
        private = private_key_pem(key)
    else:
        from cryptography.hazmat.primitives import serialization

        bits = 256
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        private = base64.b64encode(raw)
    return SigningKey(domain=domain, selector=match["selector"], algorithm=algorithm, path=path,
                      private=private, record=txt_record(key.public_key()), bits=bits)


def _parse_private(data: bytes, algorithm: str, path: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    expected = rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DKIMKeyError(f"{path}: not a usable PEM private key ({exc})") from None
    elif algorithm == "ed25519":
        try:
            seed = base64.b64decode(data.strip(), validate=True)
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        except (binascii.Error, ValueError):
            raise DKIMKeyError(f"{path}: neither PEM nor a base64 Ed25519 seed") from None
    else:
        raise DKIMKeyError(f"{path}: not a PEM private key")
    if not isinstance(key, expected):
        raise DKIMKeyError(f"{path}: the file name says {algorithm} but it holds a {type(key).__name__}")
    return key


class KeyStore:
    """The signing keys under one folder, read when they change.

    Each call looks at the domain's folder (one directory scan and a stat
    per key file) and reloads only when a file was added, removed or
    changed, so the gateway picks up a new or retired key with the next
    message.  Called from worker threads: the cache is guarded by a lock.

    @ivar keys_dir: the folder (absolute).
    """

    def __init__(self, keys_dir: str) -> None:
        self.keys_dir = os.path.abspath(keys_dir)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple, tuple[SigningKey, ...]]] = {}

    def domains(self) -> list[str]:
        """The domains that have a folder, sorted."""
        try:
            return sorted(e.name for e in os.scandir(self.keys_dir) if e.is_dir())
        except FileNotFoundError:
            return []

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """Every key of C{domain} (canonical form), in file-name order.

        @raise DKIMKeyError: a key file of the domain is unusable (the
            caller fails closed rather than send mail unsigned unnoticed).
        """
        directory = os.path.join(self.keys_dir, domain)
        try:
            entries = [e for e in os.scandir(directory) if KEY_FILE.fullmatch(e.name) and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return ()
        entries.sort(key=lambda e: e.name)
        stamp = tuple((e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size) for e in entries)
        with self._lock:
            cached = self._cache.get(domain)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        keys = tuple(load_key(e.path) for e in entries)
        with self._lock:
            self._cache[domain] = (stamp, keys)
        return keys


# -- what the DKIM and DMARC plugins share --------------------------------


def author_domain(headers: Any) -> str:
    """The domain of the one author address (RFC 5322 From:), canonical.

    Why so strict: DKIM signs for, and DMARC judges, the one domain a
    reader sees.  Two From: fields, or one with two addresses, is the
    classic way to show one domain and have another one checked.

    @param headers: an C{email.message.Message} (the parsed header block).
    @raise AmbiguousAuthorError: several From: fields or addresses.
    @raise AuthorError: no From:, no address or no valid domain; C{str()}
        is the reply text.
    """
    values = raw_values(headers, "From")
    if len(values) != 1:
        error = AmbiguousAuthorError if values else AuthorError
        raise error("Message must have exactly one From: header")
    value = _header_text(values[0])
    addresses = [address for _, address in email.utils.getaddresses([value]) if address]
    if len(addresses) > 1:
        raise AmbiguousAuthorError("From: header must hold exactly one address")
    if not addresses:
        raise AuthorError("From: header holds no address")
    local, at, domain = addresses[0].rpartition("@")
    if not at or not local:
        raise AuthorError("From: address has no domain")
    try:
        canonical = canonical_domain(domain.rstrip(">").strip())
    except ValueError:
        raise AuthorError("From: address has an invalid domain") from None
    if canonical.startswith("["):
        raise AuthorError("From: address has an address literal, not a domain")
    return canonical


def raw_values(headers: Any, name: str) -> list[str]:
    """Every value of field C{name} as stored (C{raw_items}), in order.

    Why not C{get_all}: with the compat32 policy a value holding raw
    8-bit octets comes back as an C{email.header.Header} whose C{str()}
    has lost them.
    """
    wanted = name.lower()
    return [value for key, value in headers.raw_items() if key.lower() == wanted]


def _header_text(value: str) -> str:
    """A stored header value as text: raw UTF-8 octets (SMTPUTF8 messages,
    kept as surrogate escapes by the parser) become characters again."""
    try:
        return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # already text (another parser policy)
        return value


def read_for_dkim(handle: BinaryIO, **options: Any) -> Any:
    """A C{dkim.DKIM} object over a spooled message (call in a thread).

    Why not C{dkim.DKIM(handle.read())}: dkimpy splits a whole message into
    a list of lines to find the header block and joins the body again,
    which costs about three times the message size on top of it.  Here
    only the header block goes through dkimpy's parser (which also rejects
    malformed header lines) and the body is read in one piece.

    @param options: passed to C{dkim.DKIM} (e.g. C{minkey}).
    @raise dkim.MessageFormatError: a malformed header block.
    """
    import dkim

    header_block = bytearray()
    for line in handle:
        header_block += line
        if line in (b"\r\n", b"\n"):
            break
    message = dkim.DKIM(bytes(header_block) or b"\r\n", **options)
    message.body = handle.read()
    return message


async def lookup_txt(resolver: Any, name: str) -> list[bytes]:
    """The TXT records at C{name} (L{gateway.dns.lookup_txt}), except that
    "no such name" also gives C{[]}: for a DKIM key or a DMARC policy it
    means the same as "no TXT record" (nothing published).

    @raise gateway.dns.DNSTemporaryError: the look-up may succeed later.
    """
    from gateway.dns import DNSPermanentError, lookup_txt as dns_lookup_txt

    try:
        return await dns_lookup_txt(resolver, name)
    except DNSPermanentError:
        return []


# -- gatewayctl dkim ----------------------------------------------------------


def add_dkim_commands(subparsers: Any) -> None:
    """Add C{gatewayctl dkim keygen} and C{gatewayctl dkim show}.

    @param subparsers: the object C{add_subparsers()} returned in
        L{gateway.ctl.build_parser}.
    """
    from gateway.ctl import DEFAULT_CONFIG

    dkim = subparsers.add_parser("dkim", help="DKIM signing keys and their DNS records")
    verbs = dkim.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("keygen", help="make a signing key and print the TXT record to publish")
    p.add_argument("domain", help="the signing domain (d=), e.g. example.com")
    p.add_argument("selector", help="the selector (s=), e.g. 2026a")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="rsa",
                   help="rsa (rsa-sha256, the default) or ed25519 (ed25519-sha256)")
    p.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS,
                   help=f"RSA key size ({MIN_RSA_BITS}-{MAX_RSA_BITS}, default {DEFAULT_RSA_BITS})")
    p.set_defaults(func=_cmd_keygen)
    p = verbs.add_parser("show", help="the keys in use and their TXT records")
    p.add_argument("domain", nargs="?", help="only this domain (default: every domain)")
    p.set_defaults(func=_cmd_show)
    for p in verbs.choices.values():
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")


def _keys_dir(config_path: str) -> tuple[str, bool]:
    """C{[plugins.dkim_sign] keys_dir} of the config (validated by the
    plugin's own options type), and whether any listener signs."""
    from gateway.config import load_config
    from gateway.registry import build_options
    from plugins.dkim_sign import factory

    config = load_config(config_path)
    table = config.plugin_tables.get(factory.name, {})
    options = build_options(factory, table, config.path).options
    used = any(factory.name in listener.plugins for listener in config.listeners)
    return os.path.abspath(options.keys_dir), used


def _describe_key(key: SigningKey) -> dict[str, Any]:
    mode = os.stat(key.path).st_mode & 0o777
    return {"domain": key.domain, "selector": key.selector, "algorithm": key.algorithm,
            "signature_algorithm": key.signature_algorithm, "bits": key.bits, "path": key.path,
            "mode": f"{mode:04o}", "name": key.record_name, "record": key.record,
            "zone": zone_line(key.record_name, key.record)}


def _cmd_keygen(args: Any) -> int:
    import json

    keys_dir, used = _keys_dir(args.config)
    try:
        key = write_key(keys_dir, args.domain, args.selector, args.algorithm, args.bits)
    except DKIMKeyError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1
    row = _describe_key(key)
    if args.json:
        print(json.dumps(row, indent=2, sort_keys=True))
        return 0
    print(f"wrote {key.path} ({key.algorithm}, {key.bits} bits, mode {row['mode']})")
    print(f"Publish this TXT record at {key.record_name}:\n")
    print(row["zone"])
    print(f"\nThe same value on one line (for DNS web forms):\n{key.record}\n")
    if used:
        print("The gateway signs with it from the next message on; until the record is published,\n"
              "receivers cannot check that signature (dkim=permerror, no key).")
    else:
        print("It signs once dkim_sign is in a listener's plugins (it is in none now).")
    return 0


def _cmd_show(args: Any) -> int:
    import json

    keys_dir, used = _keys_dir(args.config)
    store = KeyStore(keys_dir)
    if args.domain:
        try:
            domains = [check_domain(args.domain)]
        except DKIMKeyError as exc:
            print(f"gatewayctl: {exc}", file=sys.stderr)
            return 1
    else:
        domains = store.domains()
    rows, problems = [], []
    for domain in domains:
        try:
            rows.extend(_describe_key(key) for key in store.keys_for(domain))
        except DKIMKeyError as exc:
            problems.append(str(exc))
    if args.json:
        print(json.dumps({"keys_dir": keys_dir, "signing": used, "keys": rows, "errors": problems},
                         indent=2, sort_keys=True))
        return 1 if problems else 0
    print(f"keys_dir {keys_dir}" + ("" if used else " (dkim_sign is in no listener's plugins)"))
    if not rows and not problems:
        print(f"no keys{' for ' + domains[0] if args.domain else ''}: "
              "make one with gatewayctl dkim keygen DOMAIN SELECTOR")
    for row in rows:
        warning = "" if row["mode"] in ("0600", "0400") else "  WARNING: readable by others, chmod 600"
        print(f"\n{row['domain']} selector {row['selector']}: {row['signature_algorithm']}, "
              f"{row['bits']} bits, {row['path']} (mode {row['mode']}){warning}")
        print(row["zone"])
    for problem in problems:
        print(f"gatewayctl: {problem}", file=sys.stderr)
    return 1 if problems else 0
