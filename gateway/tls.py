"""Server TLS: contexts from PEM files, and a self-signed pair on first start.

The sample config must run without a manual certificate step, so when the
configured certificate or key is missing a self-signed pair for the
server's host name is made (and a warning logged): good enough for
opportunistic STARTTLS between MTAs (RFC 7435), never for submission
clients that verify.  Contexts allow TLS 1.2 and later only.

Standards: RFC 8314 (implicit TLS), RFC 3207 (STARTTLS), RFC 8996 (no
TLS 1.0/1.1), RFC 7525.
See also: twisted.internet.ssl.CertificateOptions.
"""

from __future__ import annotations

import datetime
from typing import Any
import os

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer
from twisted.logger import Logger

from gateway.session import TLSInfo

log = Logger()


def ensure_certificate(cert_path: str, key_path: str, hostname: str) -> bool:
    """Create a self-signed certificate and key when either file is missing.

    Blocking (key generation); called once at start-up, before listening.

    @return: True when a new pair was written.
    """
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    log.warn("no certificate at {cert}: made a self-signed one for {hostname} "
             "(fine for opportunistic STARTTLS; configure [tls] cert/key for submission)",
             cert=cert_path, hostname=hostname)
    return True


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for chunk in data.split(marker):
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            parts.append(chunk[start:] + marker + b"\n")
    return parts


def server_context_factory(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """A server context for the PEM certificate (leaf first, then its chain)
    and key; TLS 1.2 or later.

    @raise ValueError: with a readable reason when the files do not load.
    """
    from OpenSSL import crypto

    try:
        with open(cert_path, "rb") as handle:
            cert_data = handle.read()
        with open(key_path, "rb") as handle:
            key_data = handle.read()
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    certs = _split_pem(cert_data)
    if not certs:
        raise ValueError(f"no PEM certificate in {cert_path}")
    try:
        leaf = crypto.load_certificate(crypto.FILETYPE_PEM, certs[0])
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, c) for c in certs[1:]]
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_data)
    except crypto.Error as exc:
        raise ValueError(f"cannot load certificate or key: {exc}") from None
    try:
        return ssl.CertificateOptions(
            privateKey=key, certificate=leaf, extraCertChain=chain,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as exc:
        raise ValueError(f"certificate and key do not match or are unusable: {exc}") from None


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """A server context factory that picks the certificate by the name the
    client sent in SNI (RFC 6066 §3), falling back to the default pair.

    Twisted asks C{getContext()} for every connection; the servername
    callback then swaps in the matching context during the handshake.
    """

    def __init__(self, default: ssl.CertificateOptions, by_name: dict[str, ssl.CertificateOptions]) -> None:
        self.default = default
        self.by_name = {name: options.getContext() for name, options in by_name.items()}
        self._context = default.getContext()
        self._context.set_tlsext_servername_callback(self._pick)

    def _pick(self, connection: Any) -> None:
        name = connection.get_servername()
        if not name:
            return
        context = self.by_name.get(name.decode("ascii", "replace").lower().rstrip("."))
        if context is not None:
            connection.set_context(context)

    def getContext(self) -> Any:
        return self._context


def server_tls(cert_path: str, key_path: str, sni: dict[str, tuple[str, str]]) -> Any:
    """The server context factory for C{[tls]}: one pair, or one per SNI name."""
    default = server_context_factory(cert_path, key_path)
    if not sni:
        return default
    return SNIContextFactory(default, {name: server_context_factory(c, k) for name, (c, k) in sni.items()})


def tls_info(transport: object) -> TLSInfo | None:
    """What a finished handshake negotiated, or None when not on TLS."""
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return None
    try:
        connection = handle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
    except Exception:
        return None
    if not version or version == "Unknown" or cipher is None:
        return None
    return TLSInfo(version=version, cipher=cipher)


def trust_root(ca_file: str | None) -> Any:
    """The CAs to verify next hops with: a PEM bundle, or the platform's."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as handle:
        data = handle.read()
    certs = [ssl.Certificate.loadPEM(pem) for pem in _split_pem(data)]
    if not certs:
        raise ValueError(f"no PEM certificate in {ca_file}")
    return ssl.trustRootFromCertificates(certs)


def client_context_factory(level: str, hostname: str, trust: Any) -> Any:
    """A client TLS context for one connection.

    C{verify} checks the chain against C{trust} and the name against
    C{hostname} (service-identity, through C{optionsForClientTLS});
    C{may} and C{encrypt} encrypt without checking (RFC 7435
    opportunistic security).  TLS 1.2 or later in every case.
    """
    if level == "verify":
        return VerifyRecorder(ssl.optionsForClientTLS(
            hostname, trustRoot=trust,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}))
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def _client_creator_interface() -> Any:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    return IOpenSSLClientConnectionCreator


@implementer(_client_creator_interface())
class VerifyRecorder:
    """Wraps a verifying client connection creator and remembers OpenSSL's
    certificate verification error (X509_V_ERR_*), so that a failed
    handshake can be reported as expired, untrusted, ... (RFC 8460 §4.3):
    the error text alone only says "certificate verify failed".

    Twisted verifies the chain and the host name in one per-connection
    callback; this wraps that very callback (from C{_sslverify}), so the
    verification itself is unchanged.  Should Twisted's internals move,
    the wrapper steps aside and only the precision of the report suffers.

    @ivar verify_error: the first error code seen, or None.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.verify_error: int | None = None

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = self.inner.clientConnectionForTLS(tls_protocol)
        try:
            from OpenSSL import SSL
            from twisted.internet._sslverify import _verifyCB

            twisted_check = _verifyCB(tls_protocol, self.inner._hostnameIsDnsName, self.inner._hostnameASCII)
        except (ImportError, AttributeError):
            return connection

        def record(conn: Any, cert: Any, errno: int, depth: int, ok: Any) -> bool:
            if not ok and self.verify_error is None:
                self.verify_error = errno
            return twisted_check(conn, cert, errno, depth, ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, record)
        return connection
