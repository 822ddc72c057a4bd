"""A real HTTPS server on loopback for tests, with canned answers per path.

Why a real server: MTA-STS policy fetching (RFC 8461 §3.3) is mostly
about what the client must refuse — a certificate for the wrong name, an
expired or self-signed one, a redirect, a body that never ends, a wrong
Content-Type, a server that never answers.  Those are properties of TLS
and HTTP on the wire, so the fetcher is tested against C{twisted.web}
over C{listenSSL} on 127.0.0.1, port 0, with certificates from
L{tests.certs}.

Each path answers with a L{Route}; a test may change L{HTTPSServer.routes}
or swap the certificate (L{HTTPSServer.use}) while the server runs, and
reads back what arrived in L{HTTPSServer.requests} and
L{HTTPSServer.server_names} (SNI).

Example, a fixture for a test module::

    from tests.certs import TestCA
    from tests.httpsserver import HTTPSServer, Route

    @pytest.fixture
    def https():
        ca = TestCA()
        server = HTTPSServer(ca.issue("mta-sts.example.test"))
        server.start()
        yield server
        pytest_twisted.blockon(server.stop())

    server.routes["/.well-known/mta-sts.txt"] = Route(body=b"version: STSv1\\n...")
    server.routes["/moved"] = Route(redirect="https://elsewhere.test/")
    server.routes["/slow"] = Route(hang=True)
    server.routes["/big"] = Route(stream=10**6)     # chunked, no Content-Length

Standards: RFC 9110 §15.4 (redirects), §8.3 (Content-Type); RFC 9112 §7.1
(chunked transfer coding); RFC 6066 §3 (SNI).
See also: tests/certs.py; tests/dnsserver.py (the DNS half of the same idea).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.web import resource, server
from zope.interface import implementer

#: Size of the pieces a streamed body is written in.
CHUNK = 16 * 1024


@dataclass
class Route:
    """What one path answers.

    @ivar status: the HTTP status code (301 by default when C{redirect}).
    @ivar body: the body, sent with a Content-Length.
    @ivar content_type: the Content-Type value; None sends no Content-Type
        header at all.
    @ivar headers: more response headers.
    @ivar redirect: a Location to redirect to (status 301 unless C{status}
        is set to another 3xx).
    @ivar stream: after C{body}, this many more bytes (C{b"x"}) with chunked
        transfer coding and no Content-Length: a body whose size the client
        only learns by counting.
    @ivar hang: never answer (the request stays open until the client or
        L{HTTPSServer.stop} closes the connection).
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    redirect: str | None = None
    stream: int = 0
    hang: bool = False


#: The answer for paths without a route.
NOT_FOUND = Route(status=404, body=b"not found\n")


@dataclass(frozen=True)
class SeenRequest:
    """One request as it arrived.

    @ivar host: the Host header, e.g. C{"mta-sts.example.test:4711"}.
    """

    method: str
    path: str
    host: str | None
    headers: dict[str, list[str]]


class _Canned(resource.Resource):
    """Answers every path from the server's routes."""

    isLeaf = True

    def __init__(self, owner: HTTPSServer) -> None:
        super().__init__()
        self._owner = owner

    def render(self, request: server.Request) -> Any:
        path = request.path.decode("ascii", "replace")
        host = request.getHeader(b"host")
        self._owner._record(SeenRequest(
            method=request.method.decode("ascii", "replace"),
            path=path,
            host=host.decode("ascii", "replace") if host else None,
            headers={k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
                     for k, vs in request.requestHeaders.getAllRawHeaders()},
        ))
        route = self._owner.routes.get(path, NOT_FOUND)
        if route.hang:
            self._owner._hanging.append(request)
            # Fires when the client gives up (only a lost connection can
            # finish a request that is never answered).
            self._owner.hung.append(request.notifyFinish().addErrback(lambda _: None))
            return server.NOT_DONE_YET
        status = route.status
        if route.redirect is not None:
            if not 300 <= status < 400:
                status = 301
            request.setHeader(b"location", route.redirect.encode("ascii"))
        request.setResponseCode(status)
        if route.content_type is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", route.content_type.encode("latin-1"))
        for name, value in route.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        if not route.stream:
            return route.body
        # No Content-Length: twisted.web uses chunked coding for HTTP/1.1.
        if route.body:
            request.write(route.body)
        remaining = route.stream
        while remaining > 0 and not request._disconnected:
            size = min(CHUNK, remaining)
            request.write(b"x" * size)
            remaining -= size
        if not request._disconnected:
            request.finish()
        return server.NOT_DONE_YET


class _TrackingSite(server.Site):
    """A Site that remembers its connections so L{HTTPSServer.stop} can
    close them (stopListening alone leaves them open)."""

    def __init__(self, root: resource.Resource, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol


@implementer(IOpenSSLContextFactory)
class _SwappableContext:
    """A server context factory whose certificate can change between
    connections, and which records the SNI name of each handshake.

    Twisted asks the factory for a context on every connection, so a swap
    applies to the next connection.
    """

    def __init__(self, owner: HTTPSServer, options: Any) -> None:
        self._owner = owner
        self.use(options)

    def use(self, options: Any) -> None:
        # pyOpenSSL forbids changing a context once a connection used it,
        # so the SNI callback is set once, on a context of our own.
        context = options.getContext()
        context.set_tlsext_servername_callback(self._servername)
        self._context = context

    def getContext(self) -> Any:
        return self._context

    def _servername(self, connection: Any) -> None:
        name = connection.get_servername()
        self._owner.server_names.append(name.decode("ascii", "replace") if name else None)


class HTTPSServer:
    """A twisted.web HTTPS server on 127.0.0.1, answering from L{routes}.

    @param certificate: a L{tests.certs.CertKey}, or any Twisted server
        context factory (an object with C{getContext()}).
    @param reactor: default the global reactor (tests only).
    @ivar routes: path (C{"/.well-known/mta-sts.txt"}) -> L{Route}; other
        paths answer 404.
    @ivar requests: every L{SeenRequest}, in order.
    @ivar server_names: the SNI name of every TLS handshake (None when the
        client sent none), in order.
    @ivar hung: one Deferred per request to a C{hang} route, firing with
        None once the client closed that connection.
    @ivar port: the bound port once started.
    """

    __test__ = False

    def __init__(self, certificate: Any, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.routes: dict[str, Route] = {}
        self.requests: list[SeenRequest] = []
        self.server_names: list[str | None] = []
        self._hanging: list[server.Request] = []
        self.hung: list[defer.Deferred[None]] = []
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self._context = _SwappableContext(self, self._options(certificate))
        self._site = _TrackingSite(_Canned(self))
        self._site.displayTracebacks = False
        self._listening: Any = None
        self.port = 0

    @staticmethod
    def _options(certificate: Any) -> Any:
        if hasattr(certificate, "server_options"):
            return certificate.server_options()
        return certificate

    def use(self, certificate: Any) -> None:
        """Present C{certificate} (a L{tests.certs.CertKey} or a context
        factory) from the next connection on."""
        self._context.use(self._options(certificate))

    def serve(self, path: str, body: bytes | str = b"", **route: Any) -> Route:
        """Shorthand: C{routes[path] = Route(body=body, **route)}."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.routes[path] = Route(body=body, **route)
        return self.routes[path]

    def paths(self) -> list[str]:
        """The paths requested so far, in order."""
        return [r.path for r in self.requests]

    def _record(self, seen: SeenRequest) -> None:
        self.requests.append(seen)
        ready = [w for w in self._waiters if len(self.requests) >= w[0]]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, waiter in ready:
            # Next turn of the reactor: the waiting test resumes only after
            # this request has been fully handled (answered or left hanging).
            self._reactor.callLater(0, lambda w=waiter: w.called or w.callback(None))

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> defer.Deferred[None]:
        """A Deferred that fires once C{count} requests have arrived in
        total, or fails with C{TimeoutError} after C{timeout} seconds."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if len(self.requests) >= count:
            waiter.callback(None)
            return waiter
        self._waiters.append((count, waiter))
        return waiter.addTimeout(timeout, self._reactor)

    # Life cycle

    def start(self) -> int:
        """Listen on 127.0.0.1, port 0.

        @return: the port number (also L{port}).
        """
        self._listening = self._reactor.listenSSL(0, self._site, self._context, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and abort open connections, hanging ones included."""
        waits = []
        if self._listening is not None:
            waits.append(defer.maybeDeferred(self._listening.stopListening))
            self._listening = None
        for protocol in list(self._site.connections):
            transport = getattr(protocol, "transport", None)
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()
        self._hanging.clear()
        for _, waiter in self._waiters:
            if not waiter.called:
                waiter.cancel()
        self._waiters.clear()
        return defer.gatherResults(waits)

    @property
    def address(self) -> str:
        """C{"127.0.0.1:PORT"}."""
        return f"127.0.0.1:{self.port}"
