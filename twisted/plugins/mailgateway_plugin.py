"""Makes C{twistd mailgateway} available once the package is installed."""

from twisted.application.service import ServiceMaker

mailgateway = ServiceMaker(
    "mailgateway", "gateway.tap", "Pluggable SMTP gateway (see README.md)", "mailgateway"
)
