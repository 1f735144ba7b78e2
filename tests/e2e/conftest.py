"""Fixtures of the end-to-end tests: ``world`` (a Mosquitto, a hub and devices of the telemetry and
dashboard tests, all stopped after the test) and, shared with tests/hub, a fresh PostgreSQL database
per test (skipped, with the reason, when none is reachable)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_telemetry import World
from tests.hub.conftest import pg_url  # noqa: F401 - a pytest fixture, registered by this import


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()
