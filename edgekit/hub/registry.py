"""The registry: push, list and delete bundles, over the store and the artifact files.
Transport-free: the HTTP API and tests call the same methods.

Push rules (docs/hub.md): a bundle is checked whole before anything is kept (``read_bundle``:
member names, size cap, model hash; then its signature against the hub's trusted keys). Bundles
of one name and version may differ in profile; a second, different upload of the same name,
version and profile is a conflict, the same bytes again an idempotent success.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from edgekit.hub.artifacts import Artifacts
from edgekit.hub.errors import ConflictError
from edgekit.hub.store import BundleRecord, Store
from edgekit_runtime.bundle import read_bundle, sha256_file
from edgekit_runtime.errors import EdgekitError, NotFoundError, SignatureError
from edgekit_runtime.signing import PublicKey, verify_bundle

__all__ = ["PushResult", "Registry", "iso_time"]


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PushResult:
    bundle: BundleRecord
    created: bool  # False: these exact bytes were on the hub already


def _named(error: EdgekitError, path: Path, where: str) -> EdgekitError:
    """The same error with the upload's temporary path replaced by the name the user knows it by."""
    if str(path) not in error.message:
        return error
    return type(error)(error.message.replace(str(path), where))


class Registry:
    def __init__(
        self,
        store: Store,
        artifacts: Artifacts,
        trusted: Sequence[PublicKey],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.trusted = tuple(trusted)
        self.clock = clock

    def push(self, upload: Path, *, where: str = "upload") -> PushResult:
        """Check the bundle file ``upload`` and keep it; the file is the registry's from here on
        (moved to its address or removed, whatever happens)."""
        try:
            return self._push(upload, where)
        finally:
            upload.unlink(missing_ok=True)

    def _push(self, upload: Path, where: str) -> PushResult:
        if not self.trusted:
            msg = (
                f"{where}: this hub trusts no signing key, so it refuses every push; start it with "
                "`edgekit hub serve --trust-key PUB` (the .pub file of `edgekit keys generate`)"
            )
            raise SignatureError(msg)
        try:
            bundle = read_bundle(upload)
            key = verify_bundle(bundle, self.trusted, where)
        except EdgekitError as e:
            raise _named(e, upload, where) from None
        m = bundle.manifest
        rec = BundleRecord(
            name=m.name,
            version=m.version,
            profile=m.profile.name,
            sha256=sha256_file(upload),
            size_bytes=upload.stat().st_size,
            format=m.format,
            quantization=m.quantization,
            model_size_bytes=m.model_size_bytes,
            signer=key.id,
            uploaded_at=self.clock(),
            manifest=m.model_dump(mode="json"),
        )
        for attempt in (1, 2):
            try:
                return self._keep(upload, rec, where)
            except IntegrityError:
                # Another push of the same name/version/profile committed between our check and
                # insert (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises): look again, once.
                if attempt == 2:
                    raise
        raise AssertionError  # pragma: no cover

    def _keep(self, upload: Path, rec: BundleRecord, where: str) -> PushResult:
        new_file = False
        try:
            with self.store.begin() as tx:
                existing = tx.bundle(rec.name, rec.version, rec.profile)
                if existing is not None:
                    if existing.sha256 == rec.sha256:
                        return PushResult(existing, created=False)
                    msg = (
                        f"{where}: {rec.name} v{rec.version} for profile {rec.profile} is already on the hub with "
                        f"other content (sha256 {existing.sha256[:12]}, pushed {iso_time(existing.uploaded_at)}); "
                        "a pushed version never changes: give this one a new version"
                    )
                    raise ConflictError(msg)
                new_file = self.artifacts.adopt(upload, rec.sha256)
                tx.add_bundle(rec)
        except BaseException:
            if new_file:
                self.artifacts.remove(rec.sha256)
            raise
        return PushResult(rec, created=True)

    def bundles(self, name: str | None = None) -> list[BundleRecord]:
        """Every bundle (of one model with ``name``); NotFoundError when that model has none."""
        with self.store.read() as tx:
            found = tx.bundles(name)
        if name is not None and not found:
            msg = f"no model {name!r} on the hub; `edgekit models` lists what was pushed"
            raise NotFoundError(msg)
        return found

    def delete(self, name: str, version: int) -> list[BundleRecord]:
        """Remove every profile's bundle of ``name`` v``version``; refused while a device runs it or
        a rollout targets it."""
        with self.store.begin() as tx:
            found = tx.bundles(name, version)
            if not found:
                others = sorted({b.version for b in tx.bundles(name)})
                have = f"it has v{', v'.join(map(str, others))}" if others else "`edgekit models` lists what was pushed"
                msg = f"no {name} v{version} on the hub; {have}"
                raise NotFoundError(msg)
            running = tx.devices_running(name, version)
            if running:
                shown = ", ".join(running[:5]) + (f" and {len(running) - 5} more" if len(running) > 5 else "")
                msg = (
                    f"{name} v{version} runs on {len(running)} device(s) ({shown}); "
                    "deploy another version to them before deleting it"
                )
                raise ConflictError(msg)
            rollouts = tx.rollouts_targeting(name, version)
            if rollouts:
                msg = (
                    f"{name} v{version} is the target of rollout {', '.join(rollouts)}; "
                    "wait until it ends or cancel it (`edgekit rollout cancel ID`)"
                )
                raise ConflictError(msg)
            gone = tx.delete_bundles(name, version)
            kept = tx.referenced()
        for b in gone:
            if b.sha256 not in kept:
                self.artifacts.remove(b.sha256)
        return gone

    def sweep(self) -> list[str]:
        """At start: remove what a crash left (unfinished uploads, files no row names)."""
        with self.store.begin() as tx:
            referenced = tx.referenced()
        return self.artifacts.sweep(referenced)
