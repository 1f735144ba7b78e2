"""The Runtime: which model versions are loaded, hot swap, and in-process prediction.

``Runtime`` watches its sources (stores and ``.ekb`` files), applies each model's version policy,
loads new versions beside the serving ones (warm-up and golden smoke test included), switches
atomically and unloads the old version after its in-flight requests finish. A version that fails
to load never serves; the model keeps serving what it had and its status says why.

The device agent steers three things per model: a pinned default (``pin``: that version stays the
one clients get and stays loaded, whatever the policy, while a newer one loads beside it for a
shadow check or an older one is brought back), the ``canary`` label (``set_canary``; ``stable`` is
always the default version), and a tap (``set_tap``) that sees each request the default version
answered, for mirroring.

    with Runtime() as rt:
        rt.load("mlp.ekb")
        out = rt.predict("mlp", {"x": np.zeros((2, 4), np.float32)})
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from edgekit_runtime.batching import BatcherClosedError, Outputs
from edgekit_runtime.bundle import BatchingSettings
from edgekit_runtime.config import BatchingOverrides, Config, runtime_settings
from edgekit_runtime.errors import (
    BundleError,
    EdgekitError,
    InvalidInputError,
    NotFoundError,
    SmokeTestError,
    UnavailableError,
)
from edgekit_runtime.metrics import Metrics
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.signing import PublicKey, verify_bundle
from edgekit_runtime.store import Candidate, scan_source

__all__ = ["LABELS", "Gate", "Runtime", "Tap", "VersionStatus"]

log = logging.getLogger("edgekit_runtime")

# TF Serving's ModelVersionStatus states and error codes.
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
#: Version labels (TF Serving's ``/labels/L``): what each one names.
LABELS = {
    "stable": "the serving (default) version",
    "canary": "a version in a shadow check or a health window",
}
#: Called with (the version that answered, the request's inputs, its outputs); must not block.
Tap = Callable[[LoadedModel, dict[str, Any], Outputs], None]
#: Asked before a loaded version switches in, with (model, version, the version's content key, why
#: it failed here or None): returns why it must not serve (it failed elsewhere), or None to serve.
#: ``--workers`` uses it so that no serving process serves a version another one refused.
Gate = Callable[[str, int, str, EdgekitError | None], EdgekitError | None]


def _error_code(e: BaseException) -> str:
    if isinstance(e, SmokeTestError | BundleError):  # a SignatureError is a BundleError
        return "FAILED_PRECONDITION"
    if isinstance(e, InvalidInputError):
        return "INVALID_ARGUMENT"
    if isinstance(e, NotFoundError):
        return "NOT_FOUND"
    return "UNKNOWN"


@dataclass(frozen=True)
class VersionStatus:
    """What happened to one version: TF Serving's state, an error code and message, and details."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""
    origin: str = ""
    detail: str = ""


@dataclass
class _Entry:
    name: str
    # Replaced (never mutated) on every switch, so the request path reads a consistent snapshot.
    versions: dict[int, LoadedModel] = field(default_factory=dict)
    default: LoadedModel | None = None
    status: dict[int, VersionStatus] = field(default_factory=dict)
    failed: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, EdgekitError] = field(default_factory=dict)  # why each failed version failed
    pinned: int | None = None  # the default while set and loaded; kept loaded whatever the policy
    canary: int | None = None
    tap: Tap | None = None

    def pick(self, versions: dict[int, LoadedModel]) -> LoadedModel | None:
        """The default among ``versions``: the pinned one when it is loaded, else the newest."""
        if self.pinned in versions:
            return versions[self.pinned]
        return versions[max(versions)] if versions else None


class Runtime:
    """Loads bundles from stores and files, keeps the right versions serving, predicts.

    Keyword arguments:
        config: serving config (version policies, per-model batching); defaults to an empty one.
        batching: batching overrides applied to every model last (the CLI flags).
        threads: engine threads for every model (overrides profile and config).
        metrics: where to count requests and batches; a fresh registry by default.
        trusted_keys: when given, only versions signed by one of these keys load, however they
            reached the sources (an update, a file drop, the API); None = signatures not checked.
        gate: asked before each loaded version switches in (and told of each that failed); see Gate.
    """

    def __init__(
        self,
        sources: Iterable[str | Path] = (),
        *,
        config: Config | None = None,
        batching: BatchingOverrides | None = None,
        threads: int | None = None,
        metrics: Metrics | None = None,
        trusted_keys: Sequence[PublicKey] | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.config = config or Config()
        self._gate = gate
        self._trusted = list(trusted_keys) if trusted_keys is not None else None
        self._flags = batching
        self._threads = threads
        self.metrics = metrics or Metrics()
        self.metrics.set_queue_source(self.queue_depths)
        self._sources: list[Path] = []
        self._models: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._started = False
        self._idle_source: Callable[[], int] | None = None
        self.problems: list[str] = []
        # What each source offered at the last scan (model names), and its problems: readiness is
        # judged per source, so a source whose only bundle is corrupt keeps the server unready.
        self._offers: dict[Path, set[str]] = {}
        self._source_problems: dict[Path, list[str]] = {}
        for s in sources:
            self.add_source(s)

    def set_idle_source(self, source: Callable[[], int] | None) -> None:
        """Where the batchers' adaptive delay learns how many clients could send a request now: the
        native HTTP server's count of connections with none in flight (see delay.py)."""
        self._idle_source = source

    def idle_clients(self) -> int | None:
        source = self._idle_source
        return None if source is None else source()

    # -- sources and versions -----------------------------------------------------------------

    def add_source(self, path: str | Path) -> Path:
        """Serve what ``path`` offers (a store, a model folder, a version folder or a ``.ekb`` file)."""
        p = Path(path).expanduser()
        if not p.exists():
            msg = f"{p}: no such store directory or bundle file"
            raise NotFoundError(msg)
        if p.is_file() and p.suffix != ".ekb":
            msg = f"{p}: not a bundle (.ekb) nor a store directory"
            raise InvalidInputError(msg)
        with self._lock:
            if p not in self._sources:
                self._sources.append(p)
        return p

    def load(self, path: str | Path) -> list[str]:
        """Add a source and load it now; returns the model names it offers. Raises if one of them fails."""
        p = self.add_source(path)
        self.refresh()
        found, problems = scan_source(p)
        if problems:
            raise BundleError(problems[0])
        names = sorted({c.name for c in found})
        for name in names:
            self.get(name)  # raises UnavailableError naming why the model is not serving
        return names

    def check_settings(self) -> None:
        """Work out every offered version's effective settings now (profile < config < flags), so a
        bad flag or config key is an InvalidInputError at start, not a version that never loads.
        Unreadable bundles are left to loading, which reports them per version."""
        for src in self._sources:
            for cand in scan_source(src)[0]:
                try:
                    manifest = cand.manifest()
                except (OSError, BundleError):
                    continue
                try:
                    runtime_settings(
                        manifest.profile.runtime, self.config, cand.name, flags=self._flags, threads=self._threads
                    )
                except InvalidInputError as e:
                    msg = (
                        f"model {cand.name!r} v{cand.version} ({cand.origin}): {e.message}; its profile has "
                        f"max_batch_size {manifest.profile.runtime.batching.max_batch_size} and allowed_batch_sizes "
                        f"{manifest.profile.runtime.batching.allowed_batch_sizes}: adjust --max-batch-size / "
                        "--allowed-batch-sizes or the config file to match"
                    )
                    raise InvalidInputError(msg) from None

    def refresh(self) -> None:
        """Scan the sources once: load new versions, retry changed failed ones, unload what the policy drops."""
        with self._lock:
            offered: dict[str, dict[int, Candidate]] = {}
            problems: list[str] = []
            for src in self._sources:
                found, probs = scan_source(src)
                problems += probs
                self._offers[src] = {c.name for c in found}
                self._source_problems[src] = probs
                for c in found:
                    offered.setdefault(c.name, {}).setdefault(c.version, c)
            for p in problems:
                if p not in self.problems:
                    log.warning("%s", p)
            self.problems = problems
            for name in sorted(set(offered) | set(self._models)):
                self._sync(name, offered.get(name, {}))
            self._started = True

    def reload(self, name: str | None = None) -> list[VersionStatus]:
        """Rescan now and retry versions that failed before (of ``name``, or of every model)."""
        with self._lock:
            if name is not None and name not in self._models:
                offered = {c.name for s in self._sources for c in scan_source(s)[0]}
                if name not in offered:
                    raise NotFoundError(self._unknown(name))
            for entry in self._models.values():
                if name is None or entry.name == name:
                    entry.failed.clear()
            self.refresh()
            return self.status(name) if name is not None else []

    def _sync(self, name: str, cands: dict[int, Candidate]) -> None:
        entry = self._models.get(name)
        if entry is None:
            entry = self._models[name] = _Entry(name)
        policy = self.config.model(name).version_policy
        while True:
            usable = {v for v, c in cands.items() if entry.failed.get(v) != c.key}
            desired = policy.select(usable)
            if entry.pinned in usable:
                desired.add(entry.pinned)
            to_load = sorted(desired - entry.versions.keys(), reverse=True)
            if not to_load:
                break
            for v in to_load:
                self._load_version(entry, cands[v])
        for v in sorted(entry.versions):
            if v not in desired:
                why = (
                    "not offered by any source any more"
                    if v not in cands
                    else f"outside the version policy ({policy.describe()})"
                )
                self._unload(entry, v, why)

    def _load_version(self, entry: _Entry, cand: Candidate) -> None:
        v = cand.version
        entry.status[v] = VersionStatus(v, LOADING, origin=cand.origin)
        log.info("loading %s v%d from %s", entry.name, v, cand.origin)
        try:
            bundle = cand.read()
            m = bundle.manifest
            if (m.name, m.version) != (entry.name, v):
                msg = f"{cand.origin}: changed while loading (now {m.name} v{m.version})"
                raise BundleError(msg)
            signed = ""
            if self._trusted is not None:
                signed = f"; signed by {verify_bundle(bundle, self._trusted, cand.origin).id}"
            settings = runtime_settings(
                m.profile.runtime, self.config, m.name, flags=self._flags, threads=self._threads
            )
            metrics = self.metrics.for_model(m.name, v)
            lm = LoadedModel.load(bundle, settings, origin=cand.origin, key=cand.key, metrics=metrics)
            lm.batcher.set_on_close(metrics.on_close)  # before the switch: no batch has run yet
            lm.batcher.set_idle_source(self.idle_clients)
        except Exception as e:  # noqa: BLE001 - any failure of one version must leave the rest serving
            err = e if isinstance(e, EdgekitError) else EdgekitError(f"{type(e).__name__}: {e}")
            if self._gate is not None:
                self._gate(entry.name, v, str(cand.key), err)  # the others must not serve it either
            self._failed(entry, cand, err, e)
            return
        if self._gate is not None:
            refused = self._gate(entry.name, v, str(cand.key), None)
            if refused is not None:
                lm.close()
                self._failed(entry, cand, refused, refused)
                return
        self._switch_in(entry, cand, lm, settings.batching, signed)

    def _failed(self, entry: _Entry, cand: Candidate, err: EdgekitError, e: BaseException) -> None:
        v = cand.version
        entry.failed[v] = cand.key
        entry.errors[v] = err
        entry.status[v] = VersionStatus(v, END, _error_code(e), err.message, cand.origin)
        log.error("%s v%d failed to load and will not serve: %s", entry.name, v, err.message)

    def _switch_in(self, entry: _Entry, cand: Candidate, lm: LoadedModel, b: BatchingSettings, signed: str) -> None:
        v = cand.version
        versions = {**entry.versions, v: lm}
        entry.versions = versions
        entry.default = entry.pick(versions)  # the switch: one reference assignment
        detail = lm.smoke + signed + "".join(f"; {n}" for n in lm.notes)
        entry.status[v] = VersionStatus(v, AVAILABLE, origin=cand.origin, detail=detail)
        log.info(
            "serving %s v%d (%s; batching %s max_batch_size=%d timeout=%dus %s threads=%d)",
            entry.name,
            v,
            lm.smoke,
            "on" if b.enabled else "off",
            b.max_batch_size,
            b.batch_timeout_micros,
            b.batch_timeout_policy,
            b.num_batch_threads,
        )

    def _unload(self, entry: _Entry, v: int, why: str) -> None:
        lm = entry.versions[v]
        versions = {k: m for k, m in entry.versions.items() if k != v}
        entry.versions = versions
        entry.default = entry.pick(versions)
        entry.status[v] = replace(entry.status[v], state=UNLOADING)
        lm.close()  # waits for the requests already queued on this version
        entry.status[v] = replace(entry.status[v], state=END, detail=f"unloaded: {why}")
        log.info("unloaded %s v%d: %s", entry.name, v, why)

    # -- what the device agent steers --------------------------------------------------------

    def pin(self, name: str, version: int | None) -> None:
        """Keep ``version`` the default of ``name`` (and loaded, whatever the version policy) until
        unpinned with None; the next ``refresh`` loads it if it is not loaded. Requests in flight
        finish on the version they were given: a switch only changes what the next lookup gets."""
        with self._lock:
            entry = self._models.get(name)
            if entry is None:
                if version is None:
                    return
                entry = self._models[name] = _Entry(name)
            entry.pinned = version
            entry.default = entry.pick(entry.versions)

    def set_canary(self, name: str, version: int | None) -> None:
        """Name ``version`` the model's canary (None: no version holds the label)."""
        with self._lock:
            entry = self._models.get(name)
            if entry is not None:
                entry.canary = version

    def set_tap(self, name: str, tap: Tap | None) -> None:
        """See every request the default version of ``name`` answers (``observe``); None removes it."""
        with self._lock:
            entry = self._models.get(name)
            if entry is not None:
                entry.tap = tap

    def observe(self, model: LoadedModel, inputs: dict[str, Any], outputs: Outputs) -> None:
        """A request to the default version was answered: hand it to the model's tap, if any. Never
        raises: a tap must not fail a reply that is already computed."""
        entry = self._models.get(model.name)
        tap = entry.tap if entry is not None else None
        if tap is None:
            return
        try:
            tap(model, inputs, outputs)
        except Exception:  # mirroring is best effort, the reply is what matters
            log.exception("the request tap of %s failed", model.name)

    def labels(self, name: str) -> dict[str, int]:
        """The labels a version of ``name`` holds now: ``stable`` (the default), ``canary`` if set."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFoundError(self._unknown(name))
        out: dict[str, int] = {}
        default = entry.default
        if default is not None:
            out["stable"] = default.version
        if entry.canary is not None and entry.canary in entry.versions:
            out["canary"] = entry.canary
        return out

    def label(self, name: str, label: str) -> int:
        """The version holding ``label`` now; NotFoundError saying which labels exist otherwise."""
        held = self.labels(name)
        if label in held:
            return held[label]
        now = ", ".join(f"{k} (v{v})" for k, v in held.items()) or "none"
        if label in LABELS:
            what = LABELS[label]
            msg = f"no version of model {name!r} holds the label {label!r} now ({what}); labels held now: {now}"
        else:
            known = "; ".join(f"{k!r}: {what}" for k, what in LABELS.items())
            msg = f"label {label!r} does not exist; the labels are {known}; held now: {now}"
        raise NotFoundError(msg)

    # -- watching -----------------------------------------------------------------------------

    def start(self, *, poll_seconds: float = 2.0) -> None:
        """Load what the sources offer now, then watch them every ``poll_seconds`` (0 = do not watch)."""
        self.refresh()
        if poll_seconds > 0 and self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, args=(poll_seconds,), name="edgekit-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.refresh()
            except Exception:  # the watcher must survive a bad scan
                log.exception("scanning the model sources failed")

    # -- lookups ------------------------------------------------------------------------------

    def _unknown(self, name: str) -> str:
        served = ", ".join(sorted(self._models)) or "none"
        return f"model {name!r} is not served here; served models: {served}"

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The serving version of ``name`` (the pinned one, else the newest loaded; or exactly ``version``)."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFoundError(self._unknown(name))
        if version is None:
            lm = entry.default
            if lm is None:
                raise UnavailableError(f"model {name!r} has no version ready: {self._why(entry)}")
            return lm
        lm = entry.versions.get(version)
        if lm is not None:
            return lm
        st = entry.status.get(version)
        if st is not None and st.state in (START, LOADING):
            raise UnavailableError(f"version {version} of model {name!r} is still loading; retry")
        loaded = ", ".join(str(v) for v in sorted(entry.versions)) or "none"
        why = f" ({st.error_message or st.detail})" if st is not None and (st.error_message or st.detail) else ""
        raise NotFoundError(f"version {version} of model {name!r} is not loaded{why}; loaded versions: {loaded}")

    @staticmethod
    def _why(entry: _Entry) -> str:
        for v in sorted(entry.status, reverse=True):
            st = entry.status[v]
            if st.state in (START, LOADING):
                return f"version {v} is loading"
            if st.error_message:
                return f"version {v} failed: {st.error_message}"
        return "no version found in the sources"

    def models(self) -> list[str]:
        return sorted(self._models)

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """TF Serving's model_version_status: every version this runtime tried, newest first."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFoundError(self._unknown(name))
        items = sorted(entry.status.values(), key=lambda s: -s.version)
        if version is not None:
            items = [s for s in items if s.version == version]
            if not items:
                raise NotFoundError(f"model {name!r} has no version {version}")
        return items

    def readiness(self) -> list[str]:
        """Why this runtime is not ready; empty when it is (Triton's strict readiness).

        Ready means: the sources were scanned and loaded once, every source offers at least one
        model, and every model offered has a version serving. A corrupt bundle, an empty store or a
        model whose every version failed keeps the runtime unready, with the reason here."""
        if not self._started:
            return ["the models are still loading"]
        reasons: list[str] = []
        with self._lock:
            for src in self._sources:
                if not self._offers.get(src):
                    probs = self._source_problems.get(src) or []
                    reasons.append(f"{src} offers no model" + (f" ({probs[0]})" if probs else ""))
            for entry in self._models.values():
                if entry.default is None:
                    reasons.append(f"model {entry.name!r} has no version ready: {self._why(entry)}")
        return reasons

    def is_ready(self) -> bool:
        """True once every source offers a model and every model has a version serving."""
        return not self.readiness()

    def startup_failure(self) -> EdgekitError | None:
        """After the first load: the error to stop on when the sources offered versions and not one
        of them could be served (a server that can serve nothing should say so and exit, as
        Triton's --exit-on-error does). None while anything serves, or when the sources offer
        nothing yet (an empty store a device waits to be filled by an update)."""
        with self._lock:
            if any(e.default is not None for e in self._models.values()):
                return None
            for entry in self._models.values():
                for v, err in sorted(entry.errors.items(), reverse=True):
                    return type(err)(f"nothing to serve: {entry.name} v{v} failed to load: {err.message}")
            for src in self._sources:
                for problem in self._source_problems.get(src, []):
                    return BundleError(f"nothing to serve: {problem}")
        return None

    def queue_depths(self) -> list[tuple[str, str, int]]:
        return [
            (name, str(v), lm.batcher.queue_depth)
            for name, entry in list(self._models.items())
            for v, lm in entry.versions.items()
        ]

    # -- prediction ---------------------------------------------------------------------------

    async def apredict(self, name: str, inputs: dict[str, Any], version: int | None = None) -> Outputs:
        """Predict from a coroutine; ``inputs`` maps input names to arrays with a leading row dimension."""
        for attempt in range(2):
            lm = self.get(name, version)
            try:
                out = await lm.infer_async(inputs)
            except BatcherClosedError:
                if attempt:  # the version unloaded between lookup and enqueue: once more on the new one
                    raise
                continue
            if version is None:
                self.observe(lm, inputs, out)
            return out
        raise AssertionError  # pragma: no cover

    def predict(
        self, name: str, inputs: dict[str, Any], version: int | None = None, *, timeout: float | None = None
    ) -> Outputs:
        """Predict from synchronous code (any thread); blocks until this request's rows are back."""
        for attempt in range(2):
            lm = self.get(name, version)
            try:
                fut, _ = lm.infer_future(inputs)
            except BatcherClosedError:
                if attempt:
                    raise
                continue
            out = lm.finish(fut.result(timeout))
            if version is None:
                self.observe(lm, inputs, out)
            return out
        raise AssertionError  # pragma: no cover

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching, finish in-flight requests, free every engine."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(30)
        with self._lock:
            for entry in self._models.values():
                for v in sorted(entry.versions):
                    self._unload(entry, v, "runtime closed")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)
