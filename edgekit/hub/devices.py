"""The fleet's devices as the hub knows them: list, look up, label. Transport-free.

Devices register themselves on first contact (the MQTT link, next slice, calls
``Tx.register_device`` and ``Tx.report_model``); the operator changes their labels here.
"""

from __future__ import annotations

import re

from edgekit.hub.store import DeviceRecord, Store
from edgekit_runtime.errors import InvalidInputError, NotFoundError

__all__ = ["Devices", "check_label", "parse_label_changes"]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_VALUE = re.compile(r"^[A-Za-z0-9._:/@+-]{0,128}$")


def check_label(key: str, value: str | None) -> None:
    """Label keys are 1-63 of letters, digits and ``._/-``; values up to 128 of those and ``:@+``,
    never ``,`` or ``=`` or spaces, so that ``--to KEY=VALUE`` selectors parse unambiguously."""
    if not _KEY.match(key):
        msg = f"label key {key!r}: use 1-63 letters, digits and ._/- starting with a letter or digit"
        raise InvalidInputError(msg)
    if value is not None and not _VALUE.match(value):
        msg = f"label {key}={value!r}: a value is up to 128 letters, digits and ._:/@+- (no spaces, commas or '=')"
        raise InvalidInputError(msg)


def parse_label_changes(items: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """``KEY=VALUE`` sets a label, ``KEY-`` removes it (as kubectl label does)."""
    changes: dict[str, str | None] = {}
    for item in items:
        value: str | None
        if "=" in item:
            key, value = item.split("=", 1)
        elif item.endswith("-"):
            key, value = item[:-1], None
        else:
            msg = f"{item!r}: give KEY=VALUE to set a label or KEY- to remove it"
            raise InvalidInputError(msg)
        check_label(key, value)
        changes[key] = value
    return changes


class Devices:
    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self) -> list[DeviceRecord]:
        with self.store.read() as tx:
            return tx.devices()

    def get(self, device_id: str) -> DeviceRecord:
        with self.store.read() as tx:
            found = tx.device(device_id)
        if found is None:
            raise NotFoundError(self._unknown(device_id))
        return found

    def label(self, device_id: str, changes: dict[str, str | None]) -> DeviceRecord:
        if not changes:
            msg = "no label given: KEY=VALUE sets one, KEY- removes one"
            raise InvalidInputError(msg)
        for key, value in changes.items():
            check_label(key, value)
        with self.store.begin() as tx:
            if not tx.set_labels(device_id, changes):
                raise NotFoundError(self._unknown(device_id))
            found = tx.device(device_id)
        assert found is not None
        return found

    @staticmethod
    def _unknown(device_id: str) -> str:
        return f"no device {device_id!r} has registered with the hub; `edgekit devices` lists those that did"
