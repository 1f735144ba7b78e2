"""Fixtures the end-to-end tests share with tests/hub: a fresh PostgreSQL database per test (skipped,
with the reason, when none is reachable)."""

from tests.hub.conftest import pg_url  # noqa: F401 - a pytest fixture, registered by this import
