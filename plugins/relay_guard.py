"""relay_guard: the open-relay guard (required on every listener).

Decides at RCPT, before any other recipient check, whether the gateway may
take responsibility for a recipient.  It permits:

  - any client, for a recipient in C{[server] local_domains} or
    C{relay_domains} (a leading dot, C{.example.com}, covers subdomains),
    unless the address hides another destination (C{%}, C{!}, a quoted
    C{@}, a source route): such "routed" addresses are never a local
    destination;
  - clients in C{[server] trusted_networks} and authenticated sessions,
    for any recipient.

Anything else gets C{554 5.7.1 Relay access denied}: with no gate saying
yes, the pipeline denies.  It takes no options.

Standards: RFC 5321 §3.6 (relaying), §7.1.
See also: Postfix C{smtpd_relay_restrictions = permit_mynetworks,
permit_sasl_authenticated, reject_unauth_destination}.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IPluginFactory, IRelayGate
from gateway.verdict import CONTINUE, accept, Verdict


@implementer(IRelayGate)
class RelayGuard:
    """Permits local destinations from anyone, everything from trusted or
    authenticated clients; says nothing otherwise (so relay is denied)."""

    def __init__(self, context: Any) -> None:
        server = context.config.server
        self._destinations = server.local_domains | server.relay_domains
        self._networks = server.trusted_networks
        self._hostname = server.hostname.lower().rstrip(".")

    def is_trusted(self, session: Any) -> bool:
        """True for authenticated sessions and clients in trusted_networks."""
        if session.auth_user is not None or session.trusted:
            return True
        address = session.peer_ip
        return any(address in network for network in self._networks
                   if network.version == address.version)

    def is_local_destination(self, mailbox: Any) -> bool:
        """True when C{mailbox} is in a local or relay domain and routes
        nowhere else."""
        from gateway.address import domain_matches
        if mailbox.routed or mailbox.is_literal:
            return False
        if mailbox.local.lower() == "postmaster" and mailbox.domain == self._hostname:
            return True  # RFC 5321 §4.1.1.3: "RCPT TO:<postmaster>" is always ours
        return domain_matches(mailbox.domain, self._destinations)

    def check_relay(self, session: Any, transaction: Any, recipient: Any) -> Verdict:
        if self.is_local_destination(recipient.mailbox):
            transaction.results.add("relay_guard", "local")
            return accept()
        if self.is_trusted(session):
            transaction.results.add("relay_guard", "trusted")
            return accept()
        return CONTINUE


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "relay_guard"
    options_type = None
    description = "Open-relay guard: local domains from anyone, relay only for trusted or authenticated clients."

    @staticmethod
    def build(options: None, context: Any) -> RelayGuard:
        return RelayGuard(context)


factory = _Factory
