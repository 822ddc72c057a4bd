"""Finds plugins, validates their options and builds each listener's pipeline.

Plugins are found the Twisted way, C{getPlugins(IPluginFactory, plugins)},
over the built-in C{plugins} package and the folders named in
C{[server] plugin_dirs}.  A name in a listener's list that no factory
provides stops start-up, as does an option the plugin does not declare: a
misspelt check must never be silently off.

Options common to every plugin (C{mode}, C{timeout}) are taken out of the
table here; the rest must match the fields of the plugin's
C{options_type} dataclass.

See also: twisted.plugin (C{getPlugins}, C{pluginPackagePaths});
STYLE.md "The plugins/ package hazard".
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface.verify import verifyObject

import plugins as builtin_plugins
from gateway.config import ConfigError, GatewayConfig, ListenerConfig, parse_duration
from gateway.interfaces import STAGE_INTERFACES, IPluginFactory
from gateway.pipeline import Pipeline, PluginSlot

log = Logger()

COMMON_OPTIONS = ("mode", "timeout")


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin's C{build()} gets instead of globals.

    @ivar name: the plugin's config name.
    @ivar clock: an IReactorTime for timers.
    @ivar resolver: a twisted.names IResolver, or None when DNS is not set up.
    @ivar config: the whole validated L{GatewayConfig}.
    @ivar run_in_thread: C{f(*args) -> Deferred} for blocking or heavy work.
    @ivar store: the shared-state store (L{gateway.interfaces.IStateStore}),
        or None where none was set up (unit tests).
    """

    name: str
    clock: IReactorTime
    resolver: Any
    config: GatewayConfig
    run_in_thread: Callable[..., Any]
    store: Any = None


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """A plugin's validated options plus the runner's common ones."""

    options: Any
    mode: str = "enforce"
    timeout: float | None = None


def add_plugin_dirs(directories: tuple[str, ...]) -> None:
    """Extend the C{plugins} package path with the configured folders.

    Only folders named in the config are added (never a stray
    C{<sys.path>/plugins}), each once.
    """
    for directory in directories:
        directory = os.path.abspath(directory)
        if directory not in builtin_plugins.__path__:
            builtin_plugins.__path__.append(directory)
            log.info("plugin folder added: {path}", path=directory)


def discover(config: GatewayConfig) -> dict[str, Any]:
    """All plugin factories visible with C{config}'s plugin folders, by name."""
    add_plugin_dirs(config.server.plugin_dirs)
    found: dict[str, Any] = {}
    for factory in getPlugins(IPluginFactory, builtin_plugins):
        name = getattr(factory, "name", None)
        if not isinstance(name, str):
            continue
        found.setdefault(name, factory)
    return found


def _check_type(value: Any, hint: Any) -> Any:
    """Check and convert one option value against a type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else "bad value")
    if origin in (list, tuple, frozenset):
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        items = [_check_type(v, item_hint) for v in value]
        return origin(items) if origin is not list else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint in (int, str, bool):
        if isinstance(value, bool) and hint is not bool:
            raise ValueError(f"expected {hint.__name__}, got a boolean")
        if not isinstance(value, hint):
            raise ValueError(f"expected {hint.__name__}, got {value!r}")
        return value
    return value


def build_options(factory: Any, table: Mapping[str, Any], path: str) -> PluginSettings:
    """Validate a C{[plugins.NAME]} table against the factory's options type."""
    name = factory.name
    where = f"[plugins.{name}]"
    values = dict(table)
    mode = values.pop("mode", "enforce")
    if mode not in ("enforce", "warn"):
        raise ConfigError(path, f"{where} mode", f"must be \"enforce\" or \"warn\"; got {mode!r}")
    timeout = None
    if "timeout" in values:
        try:
            timeout = parse_duration(values.pop("timeout"))
        except ValueError as exc:
            raise ConfigError(path, f"{where} timeout", str(exc)) from None
    options_type = getattr(factory, "options_type", None)
    if options_type is None:
        if values:
            raise ConfigError(path, f"{where} {sorted(values)[0]}", "unknown key (this plugin takes no options)")
        return PluginSettings(None, mode, timeout)
    hints = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(path, f"{where} {key}", "unknown key")
        try:
            kwargs[key] = _check_type(value, hints.get(key, Any))
        except ValueError as exc:
            raise ConfigError(path, f"{where} {key}", str(exc)) from None
    try:
        options = options_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, where, str(exc)) from None
    return PluginSettings(options, mode, timeout)


class PluginRegistry:
    """The validated plugins of one configuration.

    Construction discovers the factories and validates every configured
    name and every C{[plugins.NAME]} table, raising L{ConfigError}; after
    that, L{build_pipeline} cannot fail on configuration grounds.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.factories = discover(config)
        self.settings: dict[str, PluginSettings] = {}
        for listener in config.listeners:
            for name in listener.plugins:
                if name not in self.factories:
                    raise ConfigError(
                        config.path, f"[[listener]] {listener.name!r} plugins",
                        f"no plugin named {name!r} (known: {', '.join(sorted(self.factories))})")
        for name, table in config.plugin_tables.items():
            if name not in self.factories:
                raise ConfigError(config.path, f"[plugins.{name}]", f"no plugin named {name!r}")
        used = {name for listener in config.listeners for name in listener.plugins}
        for name in sorted(used | set(config.plugin_tables)):
            table = config.plugin_tables.get(name, {})
            self.settings[name] = build_options(self.factories[name], table, config.path)

    def build_pipeline(self, listener: ListenerConfig, clock: IReactorTime, resolver: Any,
                       run_in_thread: Callable[..., Any], built: dict[str, Any] | None = None,
                       store: Any = None) -> Pipeline:
        """Build (or reuse from C{built}) the listener's plugins, in order.

        @param built: a cache shared by the listeners, so that one plugin
            object (and its state) serves every listener that names it.
        """
        built = {} if built is None else built
        slots = []
        for name in listener.plugins:
            settings = self.settings[name]
            if name not in built:
                context = PluginContext(name, clock, resolver, self.config, run_in_thread, store)
                plugin = self.factories[name].build(settings.options, context)
                for interface, _ in STAGE_INTERFACES.values():
                    if interface.providedBy(plugin):
                        verifyObject(interface, plugin)
                built[name] = plugin
            timeout = settings.timeout if settings.timeout is not None else self.config.limits.plugin_timeout
            slots.append(PluginSlot(name, built[name], settings.mode, timeout))
        return Pipeline(listener.name, slots, clock, self.config.server.soft_bounce)

    def describe(self, name: str) -> str:
        """The first line of the plugin's description or module docstring."""
        factory = self.factories[name]
        text = getattr(factory, "description", "") or ""
        return text.strip().splitlines()[0] if text.strip() else ""
