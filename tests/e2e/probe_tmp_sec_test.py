import pytest_twisted
from tests.e2e.test_security import *
from tests.e2e.test_security import run_gateway  # noqa

@pytest_twisted.ensureDeferred
async def test_probe(run_gateway, tmp_path):
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")
    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            a = wire.cmd("AUTH PLAIN " + "A" * (AUTH_RESPONSE_LIMIT + 8))
            b = wire.cmd("AUTH PLAIN " + "A" * (AUTH_RESPONSE_LIMIT - 11))
            c = wire.cmd("AUTH PLAIN " + b64("alicesecret"))
            d = wire.cmd("AUTH")
            e = wire.auth_plain()
            f = wire.cmd("RSET"); g = wire.cmd("EHLO x"); h = (wire.cmd("MAIL FROM:<alice@example.test>"), wire.cmd("RCPT TO:<x@other.example>"))
            return a, b, c, d, e, f, g, h
    for x in await in_thread(talk): print(x)
