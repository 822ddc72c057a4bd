"""Fixtures: start the real gateway in-process on 127.0.0.1 (port 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import base_config, write_config


@pytest.fixture
def start_gateway(tmp_path: Path) -> Callable[..., Any]:
    """Start a gateway from a config dict; returns the running service.

    The service is stopped after the test (bounded by pytest-timeout).
    """
    from gateway.service import GatewayService, prepare

    services = []

    def start(doc: dict[str, Any] | None = None, **sections: Any):
        if doc is None:
            doc = base_config(tmp_path, **sections)
        path = write_config(tmp_path, doc)
        service = GatewayService(prepare(str(path), reactor), reactor)
        service.startService()
        services.append(service)
        return service

    yield start
    for service in services:
        pytest_twisted.blockon(service.stopService())
