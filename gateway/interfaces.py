"""Every zope.interface contract of the gateway.

A plugin module exposes one instance providing L{IPluginFactory}; the
object its C{build()} returns provides only the stage interfaces it cares
about (L{IConnectCheck}, L{IRcptCheck}, ...).  The runner asks
C{IRcptCheck.providedBy(plugin)} once per listener, so a plugin never pays
for a stage it does not implement.

Every check method returns a L{gateway.verdict.Verdict} or a Deferred
firing with one.  A check must not block: DNS goes through the resolver in
the context, slow work through C{context.run_in_thread}.

Standards: RFC 5321 §3 (the stages of a transaction).
See also: twisted.mail.interfaces; Postfix smtpd restriction lists; Haraka
hooks.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from twisted.plugin import IPlugin


class IPluginFactory(IPlugin):
    """Discovered with C{getPlugins(IPluginFactory, plugins)}: one
    module-level instance per plugin module."""

    name = Attribute("Config name, e.g. C{'relay_guard'}; unique across all plugin folders.")
    options_type = Attribute(
        "A frozen dataclass type for the C{[plugins.<name>]} table. Its fields are the "
        "options; unknown keys and wrong types are config errors."
    )
    description = Attribute("One line for C{gatewayctl plugins list}.")

    def build(options, context):
        """Return the plugin object.

        @param options: an instance of C{options_type}.
        @param context: a L{gateway.registry.PluginContext}: C{clock}
            (IReactorTime), C{resolver} (IResolver or None), C{config}
            (the whole L{gateway.config.GatewayConfig}), C{run_in_thread}
            and C{name}.  Never use the global reactor.
        """


class IConnectCheck(Interface):
    """Runs after a connection is accepted, before the 220 greeting."""

    def check_connect(session):
        """@return: a Verdict (or Deferred of one).  A REJECT or TEMPFAIL
        answers the greeting with its reply and closes."""


class IHeloCheck(Interface):
    """Runs on HELO/EHLO."""

    def check_helo(session, name):
        """@param name: the HELO/EHLO argument as sent."""


class IMailCheck(Interface):
    """Runs on MAIL FROM after syntax checks."""

    def check_mail(session, transaction, sender):
        """@param sender: a L{gateway.address.Mailbox} or None for C{<>}."""


class IRelayGate(Interface):
    """Decides whether a recipient may be relayed; runs at RCPT before any
    L{IRcptCheck}.

    Denies by default: unless a gate answers ACCEPT, the recipient gets
    C{554 5.7.1 Relay access denied}.  An ACCEPT in another stage never
    opens relay (Postfix C{smtpd_relay_restrictions}).
    """

    def check_relay(session, transaction, recipient):
        """@param recipient: a L{gateway.session.Recipient} (not yet added
        to the transaction)."""


class IRcptCheck(Interface):
    """Runs on RCPT TO after the relay gate permitted the recipient."""

    def check_rcpt(session, transaction, recipient):
        """@param recipient: a L{gateway.session.Recipient}."""


class IHeadersCheck(Interface):
    """Runs once the header block of the message has been received."""

    def check_headers(session, transaction, headers):
        """@param headers: an C{email.message.Message} holding the headers
        only (no body).  A rejection is answered at the end of DATA."""


class IMessageCheck(Interface):
    """Runs at the end of DATA, with the message spooled but not committed."""

    def check_message(session, transaction, message):
        """@param message: a L{gateway.pipeline.MessageView}: C{headers},
        C{size} and C{open()} returning a binary file over the spooled
        content.  Stream it; heavy work goes to C{run_in_thread}."""


class IQueuedObserver(Interface):
    """Told after a message was committed to the queue; its result is ignored."""

    def message_queued(session, transaction, queue_id):
        """@param queue_id: the id in the 250 reply."""


STAGE_INTERFACES = {
    "connect": (IConnectCheck, "check_connect"),
    "helo": (IHeloCheck, "check_helo"),
    "mail": (IMailCheck, "check_mail"),
    "relay": (IRelayGate, "check_relay"),
    "rcpt": (IRcptCheck, "check_rcpt"),
    "headers": (IHeadersCheck, "check_headers"),
    "message": (IMessageCheck, "check_message"),
    "queued": (IQueuedObserver, "message_queued"),
}
"""Stage name -> (interface, method name), in transaction order."""


class IStateStore(Interface):
    """Shared state for policy plugins (rate limits, greylisting, DNSBL
    cache): counters with expiry, sets and key/value with a TTL.

    Every method returns a Deferred; a store that cannot answer (Redis down,
    time-out) errbacks with L{gateway.store.StoreError}, and each plugin
    decides, per its C{on_store_error} option, to fail open or closed.
    Keys are plain strings; the store adds its configured prefix.
    """

    def incr(key, amount=1, ttl=None):
        """Add C{amount} to the counter C{key} (created at 0) and return the
        new value.  @param ttl: seconds; set when the key is created."""

    def get(key):
        """The bytes stored under C{key}, or None."""

    def set(key, value, ttl=None):
        """Store bytes C{value} under C{key}, expiring after C{ttl} seconds."""

    def delete(key):
        """Remove C{key}."""

    def sadd(key, member, ttl=None):
        """Add C{member} to the set C{key}; True when it was new."""

    def sismember(key, member):
        """True when C{member} is in the set C{key}."""

    def close():
        """Release connections (called at shutdown)."""
