"""Shared fixtures: small real models, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto of this test's own, on a free port (port 1883 is the machine's)."""
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()
