"""Assembles the running gateway: spool, plugins, TLS and listeners.

Everything that can fail because of the configuration is done in
L{prepare} (called by C{makeService}, before twistd daemonises), so an
admin sees one line naming file and key instead of a traceback in a log.
L{GatewayService} then only listens and stops.

See also: twisted.mail.tap (minus its side effects); Postfix master(8).
"""

from __future__ import annotations

import errno
import functools
import socket
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from gateway.config import ConfigError, GatewayConfig, ListenerConfig, load_config
from gateway.dns import make_resolver
from gateway.pipeline import Pipeline
from gateway.queue import Spool
from gateway.registry import PluginRegistry
from gateway.server import ConnectionLimiter, GatewaySMTPFactory
from gateway.tls import ensure_certificate, server_tls


class StartupError(Exception):
    """Start-up cannot go on; C{str()} is the one line for the admin."""


@dataclass
class Gateway:
    """The validated, built parts of one configuration."""

    config: GatewayConfig
    spool: Spool
    registry: PluginRegistry
    pipelines: dict[str, Pipeline]
    tls_context: Any
    resolver: Any
    run_in_thread: Any
    recovered: dict[str, int] = field(default_factory=dict)
    checker: Any = None
    store: Any = None


def _check_port_free(config: GatewayConfig, listener: ListenerConfig) -> None:
    if listener.port == 0:
        return
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((listener.address, listener.port))
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(config.path, f"[[listener]] {listener.name!r} port",
                          f"cannot listen on {listener.address}:{listener.port}: {reason}") from None
    finally:
        probe.close()


def prepare(config_path: str, reactor: Any) -> Gateway:
    """Load and validate everything; raise L{ConfigError} or L{StartupError}."""
    config = load_config(config_path)
    registry = PluginRegistry(config)
    tls_context = None
    if any(l.tls != "none" for l in config.listeners):
        try:
            ensure_certificate(config.tls.cert, config.tls.key, config.server.hostname)
        except OSError as exc:
            raise ConfigError(config.path, "[tls] cert", f"cannot create a self-signed certificate: {exc}") from None
        try:
            tls_context = server_tls(config.tls.cert, config.tls.key, dict(config.tls.sni))
        except ValueError as exc:
            raise ConfigError(config.path, "[tls] cert", str(exc)) from None
    # Commits fsync in parallel (one thread per message being made durable),
    # so the pool must be larger than Twisted's default of 10.
    reactor.suggestThreadPoolSize(32)
    run_in_thread = functools.partial(threads.deferToThreadPool, reactor, reactor.getThreadPool())
    try:
        spool = Spool(config.queue.path, run_in_thread=run_in_thread, clock=reactor)
        recovered = spool.recover()
    except OSError as exc:
        raise ConfigError(config.path, "[queue] path", f"spool unusable: {exc}") from None
    for listener in config.listeners:
        _check_port_free(config, listener)
    resolver = make_resolver(config.dns, reactor)
    from gateway.store import StoreError, make_store
    try:
        store = make_store(config.store, reactor, run_in_thread)
    except StoreError as exc:
        raise ConfigError(config.path, "[store] backend", str(exc)) from None
    if config.relay.ca_file:
        from gateway.tls import trust_root
        try:
            trust_root(config.relay.ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(config.path, "[relay] ca_file", str(exc)) from None
    built: dict[str, Any] = {}
    pipelines = {
        listener.name: registry.build_pipeline(listener, reactor, resolver, run_in_thread, built, store)
        for listener in config.listeners
    }
    checker = make_checker(config, run_in_thread)
    return Gateway(config, spool, registry, pipelines, tls_context, resolver, run_in_thread, recovered, checker,
                   store)


def make_checker(config: GatewayConfig, run_in_thread: Any) -> Any:
    """The twisted.cred checker for SMTP AUTH: the users file, or a
    C{twisted.cred.strcred} checker named by C{[auth] checker}."""
    from gateway.credentials import UsersFile, UsersFileChecker, UsersFileError

    if config.auth.users_file:
        users = UsersFile(config.auth.users_file)
        try:
            users.users()
        except (OSError, UsersFileError) as exc:
            raise ConfigError(config.path, "[auth] users_file", str(exc)) from None
        return UsersFileChecker(users, run_in_thread)
    if config.auth.checker:
        from twisted.cred import strcred
        try:
            return strcred.makeChecker(config.auth.checker)
        except Exception as exc:
            raise ConfigError(config.path, "[auth] checker", str(exc)) from None
    return None


class GatewayService(service.MultiService):
    """Listens on every configured listener; stops cleanly on SIGTERM.

    @ivar ports: listener name -> the listening port (for tests: the bound
        port number when the config asked for port 0).
    """

    log = Logger()

    def __init__(self, gateway: Gateway, reactor: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = reactor
        config = gateway.config
        self.limiter = ConnectionLimiter(config.limits.max_connections,
                                         config.limits.max_connections_per_ip)
        from gateway.credentials import FailureCounter

        auth = config.auth
        self.auth_failures = FailureCounter(
            reactor, window=auth.failure_window, delay_after=auth.delay_after,
            max_failures=auth.max_failures, delay=auth.failure_delay)
        self.factories = {
            listener.name: GatewaySMTPFactory(
                listener, config, gateway.pipelines[listener.name], gateway.spool, reactor,
                self.limiter, gateway.tls_context, on_queued=self.message_queued,
                checker=gateway.checker, auth_failures=self.auth_failures, resolver=gateway.resolver)
            for listener in config.listeners
        }
        self.ports: dict[str, Any] = {}
        self.queued_observers: list[Any] = []
        self.scheduler = None
        self.mta_sts = None
        if config.relay.enabled:
            from gateway.routing import Router
            from gateway.scheduler import DeliveryScheduler

            router = Router(config, gateway.resolver, tls_default=config.relay.tls,
                            route_tls=dict(config.route_tls, **({"smarthost": config.relay.smarthost_tls}
                                                                 if config.relay.smarthost else {})))
            self.mta_sts = None
            if config.mta_sts.enabled:
                from gateway.stsservice import MTASTS

                self.mta_sts = MTASTS(config, reactor, gateway.resolver, gateway.run_in_thread)
            self.scheduler = DeliveryScheduler(
                config, gateway.spool, router, reactor, reactor, gateway.run_in_thread,
                sts=self.mta_sts.resolver if self.mta_sts else None,
                tls_reports=self.mta_sts.reports if self.mta_sts else None)
            self.queued_observers.append(self.scheduler.message_queued)

    def message_queued(self, queue_id: str) -> None:
        """Called by the listeners after each commit."""
        for observer in self.queued_observers:
            observer(queue_id)

    def privilegedStartService(self) -> None:
        config = self.gateway.config
        for listener in config.listeners:
            factory = self.factories[listener.name]
            try:
                if listener.tls == "implicit":
                    port = self.reactor.listenSSL(listener.port, factory, self.gateway.tls_context,
                                                  interface=listener.address)
                else:
                    port = self.reactor.listenTCP(listener.port, factory, interface=listener.address)
            except CannotListenError as exc:
                for other in self.ports.values():
                    other.stopListening()
                raise SystemExit(
                    f"mailgateway: {config.path}: [[listener]] {listener.name!r} port: "
                    f"cannot listen on {listener.address}:{listener.port}: {exc.socketError}")
            self.ports[listener.name] = port
            bound = port.getHost()
            self.log.info("listener {listener} on {address}:{port} tls={tls} plugins={plugins}",
                          listener=listener.name, address=bound.host, port=bound.port,
                          tls=listener.tls, plugins=",".join(listener.plugins))
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        recovered = self.gateway.recovered
        self.log.info("mailgateway started: spool {path} ({recovered})",
                      path=self.gateway.config.queue.path,
                      recovered=", ".join(f"{k}={v}" for k, v in sorted(recovered.items())) or "clean")
        super().startService()
        if self.scheduler is not None:
            self.scheduler.startService()
            if self.mta_sts is not None:
                self.mta_sts.start(self.scheduler)

    def port_of(self, name: str) -> int:
        """The TCP port a listener is bound to."""
        return self.ports[name].getHost().port

    @defer.inlineCallbacks
    def stopService(self):
        """Stop listening, say goodbye to idle clients, let commits finish."""
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports.values()])
        self.ports.clear()
        protocols = [p for f in self.factories.values() for p in f.open_connections]
        for protocol in protocols:
            protocol.shutdown()
        # Commits in flight finish and are answered before the reactor stops.
        for _ in range(200):
            if not any(p.busy for p in protocols):
                break
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        for protocol in protocols:
            protocol.shutdown()
        # Give the reactor turns to flush the 421s before it drops sockets.
        for _ in range(20):
            if all(p.transport is None or not p.transport.connected for p in protocols):
                break
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        if self.scheduler is not None and self.scheduler.running:
            yield self.scheduler.stopService()
        if self.mta_sts is not None:
            yield self.mta_sts.stop()
        yield defer.maybeDeferred(super().stopService)
        self.log.info("mailgateway stopped")
