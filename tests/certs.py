"""Test certificates: a CA made in the test, and leaf certificates it signs.

Why make them at run time rather than ship PEM files: a shipped
certificate expires and breaks CI a year later, and every test can ask
for exactly the defect it needs (a wrong name, an expiry in the past, no
CA at all).  Keys are EC P-256, so making one costs about a millisecond.

The same pair serves both kinds of test server used in this project:
L{CertKey.server_options} gives a Twisted context factory (for
C{listenSSL}, C{twisted.web}, C{GatewaySMTPFactory}), L{CertKey.server_context}
a stdlib C{ssl.SSLContext} (for aiosmtpd, C{http.server}).  On the client
side L{TestCA.trust_root} gives Twisted's C{IOpenSSLTrustRoot} (for
C{optionsForClientTLS}) and L{TestCA.client_context} a verifying
C{ssl.SSLContext} (for C{smtplib}).

Example::

    ca = TestCA()
    good = ca.issue("mta-sts.example.test")
    wrong = ca.issue("other.example.test")
    late = ca.expired("mta-sts.example.test")
    rogue = self_signed("mta-sts.example.test")
    cert_path, key_path = good.write(tmp_path, "mx")
    ca_path = ca.write(tmp_path / "ca.pem")

Standards: RFC 5280 (certificate profile: basicConstraints, keyUsage,
subjectAltName); RFC 6125 (names checked in subjectAltName only).
See also: tests/httpsserver.py; gateway.tls.ensure_certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl as stdlib_ssl
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl as twisted_ssl

#: How long a good certificate is valid, from a few minutes ago.
VALID_DAYS = 30

#: The name a "wrong name" certificate is issued for.
WRONG_NAME = "wrong-name.invalid"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    """DNS names as dNSName, IP addresses as iPAddress entries."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_builder(subject_key: ec.EllipticCurvePrivateKey, names: tuple[str, ...],
                  not_before: datetime.datetime, not_after: datetime.datetime) -> x509.CertificateBuilder:
    """A server certificate template: CN is the first name, all names in SAN."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
    )


@dataclass(frozen=True)
class CertKey:
    """A certificate, its private key and the intermediates to send with it.

    @ivar cert: the leaf certificate.
    @ivar key: its private key.
    @ivar chain: intermediate certificates, leaf's issuer first (never the
        root: a server does not send the trust anchor).
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def names(self) -> list[str]:
        """The subjectAltName entries, as text."""
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
            [str(v) for v in san.get_values_for_type(x509.IPAddress)]

    def cert_pem(self) -> bytes:
        """The leaf then the chain, PEM, as a server's certificate file holds them."""
        return b"".join(_cert_pem(c) for c in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return _key_pem(self.key)

    def write(self, directory: str | os.PathLike[str], stem: str = "server") -> tuple[Path, Path]:
        """Write C{<stem>.crt} (leaf and chain) and C{<stem>.key} (mode 0600).

        @return: the certificate path and the key path.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.key_pem())
        return cert_path, key_path

    def server_options(self) -> twisted_ssl.CertificateOptions:
        """A Twisted server context factory (TLS 1.2 or later) presenting
        this certificate and its chain: for C{reactor.listenSSL},
        C{twisted.web} or C{ESMTP.ctx}."""
        private = twisted_ssl.PrivateCertificate.loadPEM(_cert_pem(self.cert) + self.key_pem())
        extra = [twisted_ssl.Certificate.loadPEM(_cert_pem(c)).original for c in self.chain]
        options = twisted_ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            extraCertChain=extra,
            raiseMinimumTo=twisted_ssl.TLSVersion.TLSv1_2,
        )
        # Twisted hands pyOpenSSL objects to the context, which newer
        # pyOpenSSL deprecates; build (and cache) the context now, quietly,
        # rather than warn on every test's first connection.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            options.getContext()
        return options

    def server_context(self) -> stdlib_ssl.SSLContext:
        """A stdlib server C{ssl.SSLContext} presenting this certificate:
        for aiosmtpd (C{tls_context=}) or C{http.server}."""
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as directory:
            cert_path, key_path = self.write(directory)
            context.load_cert_chain(str(cert_path), str(key_path))
        return context


class TestCA:
    """A certificate authority that lives for one test run.

    @ivar cert: the self-signed root certificate.
    @ivar key: its private key.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, name: str = "mailgateway Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS + 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    # Issuing

    def issue(self, *names: str, not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> CertKey:
        """A server certificate for C{names} (DNS names or IP addresses),
        signed by this CA.

        @param not_before: default five minutes ago.
        @param not_after: default L{VALID_DAYS} days from now.
        """
        if not names:
            raise ValueError("a certificate needs at least one name")
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _leaf_builder(
            key, names,
            not_before or now - datetime.timedelta(minutes=5),
            not_after or now + datetime.timedelta(days=VALID_DAYS),
        )
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.issuer_name(self.cert.subject).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        return CertKey(builder.sign(self.key, hashes.SHA256()), key)

    def good(self, hostname: str) -> CertKey:
        """A valid certificate for C{hostname}."""
        return self.issue(hostname)

    def wrong_name(self, hostname: str | None = None) -> CertKey:
        """A valid certificate from this CA for a name that is not
        C{hostname} (L{WRONG_NAME}); C{hostname} is only checked to differ."""
        if hostname is not None and hostname.lower() == WRONG_NAME:
            raise ValueError("pick another host name for a wrong-name test")
        return self.issue(WRONG_NAME)

    def expired(self, hostname: str) -> CertKey:
        """A certificate for C{hostname} from this CA whose validity ended
        yesterday."""
        now = _now()
        return self.issue(hostname, not_before=now - datetime.timedelta(days=30),
                          not_after=now - datetime.timedelta(days=1))

    def not_yet_valid(self, hostname: str) -> CertKey:
        """A certificate for C{hostname} from this CA valid from tomorrow."""
        now = _now()
        return self.issue(hostname, not_before=now + datetime.timedelta(days=1),
                          not_after=now + datetime.timedelta(days=VALID_DAYS))

    # Trusting

    def cert_pem(self) -> bytes:
        """The root certificate, PEM."""
        return _cert_pem(self.cert)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the root certificate as a PEM CA file (C{ca_file} in the
        config, C{cafile=} for stdlib); creates parent directories.

        @return: the path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem())
        return path

    def trust_root(self) -> Any:
        """A Twisted C{IOpenSSLTrustRoot} trusting only this CA, for
        C{optionsForClientTLS(trustRoot=...)}."""
        return twisted_ssl.trustRootFromCertificates([twisted_ssl.Certificate.loadPEM(self.cert_pem())])

    def client_context(self) -> stdlib_ssl.SSLContext:
        """A stdlib client C{ssl.SSLContext} that verifies chain and host
        name against this CA only (for C{smtplib}, C{urllib})."""
        context = stdlib_ssl.create_default_context(cadata=self.cert_pem().decode("ascii"))
        context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
        return context


def self_signed(hostname: str, *, days: int = VALID_DAYS) -> CertKey:
    """A certificate for C{hostname} signed by its own key: right name,
    valid dates, no trusted issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = _leaf_builder(key, (hostname,), now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    return CertKey(builder.issuer_name(subject).sign(key, hashes.SHA256()), key)
