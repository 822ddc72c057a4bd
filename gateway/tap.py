"""twistd plugin glue: C{twistd mailgateway --config FILE}.

Everything that depends on the configuration is checked here, before
twistd daemonises, so a bad config ends with one line on the terminal
(file and key) and exit status 1, never a traceback in a log.

See also: twisted/plugins/mailgateway_plugin.py; twisted.mail.tap.
"""

from __future__ import annotations

from twisted.python import usage

from gateway.config import ConfigError


class Options(usage.Options):
    """Command-line options of C{twistd mailgateway}."""

    synopsis = "[-c FILE]"
    longdesc = ("Run the mailgateway SMTP gateway with the TOML configuration FILE "
                "(default: etc/gateway.toml). Use twistd -n to stay in the foreground.")
    optParameters = [
        ["config", "c", "etc/gateway.toml", "The TOML configuration file."],
    ]


def makeService(options: Options):
    """Build the service, or exit with the config error's one line."""
    from twisted.internet import reactor

    from gateway.service import GatewayService, StartupError, prepare

    try:
        gateway = prepare(options["config"], reactor)
    except (ConfigError, StartupError) as exc:
        raise SystemExit(f"mailgateway: {exc}")
    return GatewayService(gateway, reactor, options["config"], install_signals=True)
