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
import os
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


def prepare(config_path: str, reactor: Any, running: Gateway | None = None,
            bound: dict[str, tuple[str, int]] | None = None) -> Gateway:
    """Load and validate everything; raise L{ConfigError} or L{StartupError}.

    @param running: on reload, the gateway in service: its spool (the queue
        path cannot change without a restart) and, when C{[store]} did not
        change, its store are kept; the spool is not recovered again.
    @param bound: on reload, listener name -> (address, port) already
        listening, which the port check must not count as "in use".
    """
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
    if running is not None:
        if config.queue.path != running.config.queue.path:
            raise ConfigError(config.path, "[queue] path", "cannot change on reload; restart the gateway")
        spool, recovered = running.spool, {}
    else:
        try:
            spool = Spool(config.queue.path, run_in_thread=run_in_thread, clock=reactor)
            recovered = spool.recover()
        except OSError as exc:
            raise ConfigError(config.path, "[queue] path", f"spool unusable: {exc}") from None
    in_use = set((bound or {}).values())
    for listener in config.listeners:
        if (listener.address, listener.port) not in in_use:
            _check_port_free(config, listener)
    resolver = make_resolver(config.dns, reactor)
    from gateway.store import StoreError, make_store
    if running is not None and running.store is not None and running.config.store == config.store:
        store = running.store
    else:
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


class ReloadableTLS:
    """A server TLS context factory whose certificate a reload can replace:
    listeners keep this object, new handshakes use the current pair."""

    def __init__(self, current: Any) -> None:
        self.current = current

    def getContext(self) -> Any:
        return self.current.getContext()


def _reloadable_tls() -> Any:
    from twisted.internet.interfaces import IOpenSSLContextFactory
    from zope.interface import classImplements

    classImplements(ReloadableTLS, IOpenSSLContextFactory)
    return ReloadableTLS


_reloadable_tls()


class GatewayService(service.MultiService):
    """Listens on every configured listener, delivers, serves metrics and
    the control socket; reloads on SIGHUP; stops cleanly on SIGTERM.

    @ivar ports: listener name -> the listening port (for tests: the bound
        port number when the config asked for port 0).
    """

    log = Logger()

    def __init__(self, gateway: Gateway, reactor: Any, config_path: str | None = None,
                 install_signals: bool = False) -> None:
        super().__init__()
        from gateway.credentials import FailureCounter
        from gateway.metrics import GatewayMetrics

        self.gateway = gateway
        self.reactor = reactor
        self.config_path = config_path or gateway.config.path
        self.install_signals = install_signals
        self.started_at = reactor.seconds()
        config = gateway.config
        self.metrics = GatewayMetrics()
        self.metrics.watch_queue(gateway.spool, reactor)
        for pipeline in gateway.pipelines.values():
            pipeline.metrics = self.metrics
        self.tls = ReloadableTLS(gateway.tls_context) if gateway.tls_context is not None else None
        self.limiter = ConnectionLimiter(config.limits.max_connections,
                                         config.limits.max_connections_per_ip)
        auth = config.auth
        self.auth_failures = FailureCounter(
            reactor, window=auth.failure_window, delay_after=auth.delay_after,
            max_failures=auth.max_failures, delay=auth.failure_delay)
        self.factories = {listener.name: self._factory(listener) for listener in config.listeners}
        self.ports: dict[str, Any] = {}
        self.queued_observers: list[Any] = []
        self.scheduler = None
        self.mta_sts = None
        self._other_ports: list[Any] = []
        self._log_observer: Any = None
        self.reloads = 0
        if config.relay.enabled:
            from gateway.scheduler import DeliveryScheduler

            if config.mta_sts.enabled:
                from gateway.stsservice import MTASTS

                self.mta_sts = MTASTS(config, reactor, gateway.resolver, gateway.run_in_thread)
            self.scheduler = DeliveryScheduler(
                config, gateway.spool, self._router(config, gateway.resolver), reactor, reactor,
                gateway.run_in_thread,
                sts=self.mta_sts.resolver if self.mta_sts else None,
                tls_reports=self.mta_sts.reports if self.mta_sts else None)
            self.scheduler.metrics = self.metrics
            self.queued_observers.append(self.scheduler.message_queued)

    @staticmethod
    def _router(config: GatewayConfig, resolver: Any) -> Any:
        from gateway.routing import Router

        extra = {"smarthost": config.relay.smarthost_tls} if config.relay.smarthost else {}
        return Router(config, resolver, tls_default=config.relay.tls, route_tls=dict(config.route_tls, **extra))

    def _factory(self, listener: ListenerConfig) -> GatewaySMTPFactory:
        gateway = self.gateway
        return GatewaySMTPFactory(
            listener, gateway.config, gateway.pipelines[listener.name], gateway.spool, self.reactor,
            self.limiter, self.tls, on_queued=self.message_queued, checker=gateway.checker,
            auth_failures=self.auth_failures, resolver=gateway.resolver, metrics=self.metrics)

    def message_queued(self, queue_id: str) -> None:
        """Called by the listeners after each commit."""
        for observer in self.queued_observers:
            observer(queue_id)

    # -- listening ---------------------------------------------------------------

    def _listen(self, listener: ListenerConfig) -> Any:
        factory = self.factories[listener.name]
        if listener.tls == "implicit":
            return self.reactor.listenSSL(listener.port, factory, self.tls, interface=listener.address)
        return self.reactor.listenTCP(listener.port, factory, interface=listener.address)

    def _log_listening(self, listener: ListenerConfig, port: Any) -> None:
        bound = port.getHost()
        self.log.info("listener {listener} on {address}:{port} tls={tls} plugins={plugins}",
                      listener=listener.name, address=bound.host, port=bound.port,
                      tls=listener.tls, plugins=",".join(listener.plugins))

    def privilegedStartService(self) -> None:
        config = self.gateway.config
        for listener in config.listeners:
            try:
                port = self._listen(listener)
            except CannotListenError as exc:
                for other in self.ports.values():
                    other.stopListening()
                raise SystemExit(
                    f"mailgateway: {config.path}: [[listener]] {listener.name!r} port: "
                    f"cannot listen on {listener.address}:{listener.port}: {exc.socketError}")
            self.ports[listener.name] = port
            self._log_listening(listener, port)
        if config.metrics.listen:
            from gateway.config import parse_host_port
            from gateway.metrics import metrics_site

            host, port_number, _ = parse_host_port(config.metrics.listen, 9464, allow_zero=True)
            try:
                port = self.reactor.listenTCP(port_number, metrics_site(self.metrics, config.metrics.path),
                                              interface=host)
            except CannotListenError as exc:
                raise SystemExit(f"mailgateway: {config.path}: [metrics] listen: cannot listen on "
                                 f"{config.metrics.listen}: {exc.socketError}")
            self.metrics_port = port
            self._other_ports.append(port)
            self.log.info("metrics on http://{address}:{port}{path}", address=port.getHost().host,
                          port=port.getHost().port, path=config.metrics.path)
        from gateway import control

        try:
            self._other_ports.append(control.listen(
                self.reactor, control.socket_path(config.queue.path),
                {"status": self.status, "reload": self.reload_command}))
        except OSError as exc:
            raise SystemExit(f"mailgateway: {config.path}: [queue] path: control socket: {exc}")
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        self._start_log()
        recovered = self.gateway.recovered
        self.log.info("mailgateway started: spool {path} ({recovered})",
                      path=self.gateway.config.queue.path,
                      recovered=", ".join(f"{k}={v}" for k, v in sorted(recovered.items())) or "clean")
        super().startService()
        if self.scheduler is not None:
            self.scheduler.startService()
            if self.mta_sts is not None:
                self.mta_sts.start(self.scheduler)
        if self.install_signals:
            import signal

            signal.signal(signal.SIGHUP, lambda *args: self.reactor.callFromThread(self.reload))

    def _start_log(self) -> None:
        from twisted.logger import globalLogPublisher

        from gateway.logs import make_observer

        self._stop_log()
        made = make_observer(self.gateway.config.log)
        if made is not None:
            self._log_observer = made
            globalLogPublisher.addObserver(made[0])

    def _stop_log(self) -> None:
        from twisted.logger import globalLogPublisher

        if self._log_observer is not None:
            observer, stream = self._log_observer
            globalLogPublisher.removeObserver(observer)
            stream.close()
            self._log_observer = None

    def port_of(self, name: str) -> int:
        """The TCP port a listener is bound to."""
        return self.ports[name].getHost().port

    # -- reload ------------------------------------------------------------------

    def reload(self) -> str | None:
        """Read the config again and switch to it; None on success, else the
        one line that says why the old config stays in force.

        New connections get the new listeners, plugins, TLS certificates,
        users and limits; sessions in flight finish under the config they
        started with; deliveries in flight are not interrupted.
        """
        bound = {name: (self.gateway.config.listener(name).address, self.gateway.config.listener(name).port)
                 for name in self.ports}
        try:
            new = prepare(self.config_path, self.reactor, running=self.gateway, bound=bound)
        except (ConfigError, StartupError) as exc:
            self.log.error("reload refused, old config stays in force: {reason}", reason=str(exc))
            return str(exc)
        old = self.gateway
        self.gateway = new
        config = new.config
        for pipeline in new.pipelines.values():
            pipeline.metrics = self.metrics
        if new.tls_context is not None:
            if self.tls is None:
                self.tls = ReloadableTLS(new.tls_context)
            self.tls.current = new.tls_context
        self.limiter.max_total = config.limits.max_connections
        self.limiter.max_per_ip = config.limits.max_connections_per_ip
        failures = self.auth_failures
        failures.window, failures.delay_after = config.auth.failure_window, config.auth.delay_after
        failures.max_failures, failures.delay = config.auth.max_failures, config.auth.failure_delay
        wanted = {listener.name: listener for listener in config.listeners}
        for name in list(self.ports):
            listener = wanted.get(name)
            previous = old.config.listener(name)
            if listener is None or (listener.address, listener.port, listener.tls) != (
                    previous.address, previous.port, previous.tls):
                self.ports.pop(name).stopListening()
                self.log.info("listener {listener} closed (sessions in flight continue)", listener=name)
        for name, listener in wanted.items():
            factory = self.factories.get(name)
            if factory is None:
                self.factories[name] = self._factory(listener)
            else:
                factory.listener = listener
                factory.config = config
                factory.pipeline = new.pipelines[name]
                factory.checker = new.checker
                factory.resolver = new.resolver
                factory.tls_context = self.tls
            if name not in self.ports:
                try:
                    self.ports[name] = self._listen(listener)
                except CannotListenError as exc:
                    self.log.error("reload: cannot listen for {listener}: {reason}", listener=name,
                                   reason=str(exc))
                    continue
                self._log_listening(listener, self.ports[name])
        for name in [n for n in self.factories if n not in wanted]:
            del self.factories[name]
        if self.scheduler is not None:
            self.scheduler.reconfigure(config, self._router(config, new.resolver))
        if old.store is not None and new.store is not old.store:
            # Sessions in flight may still use the old store for a moment.
            self.reactor.callLater(1, lambda: defer.maybeDeferred(old.store.close))
        self.reloads += 1
        self._start_log()
        self.log.info("reloaded {path}: listeners {listeners}", path=self.config_path,
                      listeners=",".join(sorted(self.ports)))
        return None

    def reload_command(self) -> dict[str, Any]:
        """The control socket's C{reload}."""
        error = self.reload()
        return {"ok": error is None, "error": error}

    def status(self) -> dict[str, Any]:
        """What C{gatewayctl status} shows."""
        from gateway import __version__

        config = self.gateway.config
        listeners = []
        for listener in config.listeners:
            port = self.ports.get(listener.name)
            listeners.append({"name": listener.name, "address": listener.address,
                              "port": port.getHost().port if port is not None else None,
                              "tls": listener.tls, "auth": listener.auth, "plugins": list(listener.plugins),
                              "open_connections": len(self.factories[listener.name].open_connections)
                              if listener.name in self.factories else 0})
        return {
            "ok": True, "running": True, "version": __version__, "pid": os.getpid(),
            "uptime": round(self.reactor.seconds() - self.started_at, 1), "config": self.config_path,
            "reloads": self.reloads, "listeners": listeners, "queue": self.gateway.spool.counts(),
            "last_delivery_errors": list(self.scheduler.recent_errors) if self.scheduler else [],
        }

    @defer.inlineCallbacks
    def stopService(self):
        """Stop listening, say goodbye to idle clients, let commits finish."""
        ports = list(self.ports.values()) + self._other_ports
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.ports.clear()
        self._other_ports = []
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
        if self.gateway.store is not None:
            yield defer.maybeDeferred(self.gateway.store.close)
        yield defer.maybeDeferred(super().stopService)
        self.log.info("mailgateway stopped")
        self._stop_log()
