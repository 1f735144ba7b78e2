"""One model's update on the device, as a persisted state machine: download in chunks, verify, install,
smoke-test by loading it beside the serving version, switch, or refuse and stay on what serves.

States (the rollout status shows them): ``downloading`` -> ``verifying`` -> ``installing`` ->
``testing`` -> (``watching``, during a health window) -> ``succeeded``, or ``failed`` /
``rolled_back`` with a reason a user can act on.

The health window: after the switch the new version's server error rate and p95 latency on this
device are compared with the previous version's figures here; with at least MIN_REQUESTS requests
in the window, an error rate over the previous one plus ERROR_MARGIN, or a p95 over LATENCY_FACTOR
times the previous p95, puts the previous version back by itself and reports ``rolled_back`` with
the figures. The machine is plain
logic over a job record: the Agent feeds it events (a desired version, a chunk, a clock tick) and
publishes the chunk requests it returns, so tests can drive it without a broker.

What "verify" checks before anything touches the store: the file's sha256 (the desired state's),
the bundle itself (member names, sizes, model hash: ``read_bundle``), that it is the desired
model and version, that it was built for this device's profile, the signature against the trusted
keys, and that its input and output signature (names, dtypes, non-batch dims) is the serving
version's unless the deployment allows a change: existing clients would break.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit_runtime.agent.download import Download, DownloadError
from edgekit_runtime.agent.protocol import MAX_WINDOW, Artifact, Chunk, ChunkRequest, DesiredModel
from edgekit_runtime.bundle import Bundle, Manifest, read_bundle
from edgekit_runtime.errors import BundleError, EdgekitError
from edgekit_runtime.metrics import Figures
from edgekit_runtime.runtime import AVAILABLE, Runtime
from edgekit_runtime.signing import PublicKey, verify_bundle
from edgekit_runtime.store import install_bundle
from edgekit_runtime.tensors import TensorSpec

__all__ = ["Job", "Updater", "signature_change"]

log = logging.getLogger("edgekit_runtime.agent")

DOWNLOADING, VERIFYING, INSTALLING, TESTING = "downloading", "verifying", "installing", "testing"
WATCHING, SUCCEEDED, FAILED, ROLLED_BACK = "watching", "succeeded", "failed", "rolled_back"
ACTIVE_STATES = (DOWNLOADING, VERIFYING, INSTALLING, TESTING, WATCHING)
MIN_REQUESTS = 20
ERROR_MARGIN = 0.05
LATENCY_FACTOR = 2.0
#: Chunks asked for at once (the device's one outstanding window).
WINDOW = 8
#: Ask again for what is missing when nothing arrived for this long (a broker restart, a hub restart).
RETRY_SECONDS = 3.0


@dataclass
class Job:
    """One model's update, as kept in the agent's state file."""

    model: str
    version: int
    artifact: dict[str, Any]
    state: str = DOWNLOADING
    reason: str = ""
    rollout: str = ""
    allow_signature_change: bool = False
    previous: int | None = None
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    done_chunks: int = 0
    health_window: float = 0.0
    switched_at: float = 0.0
    baseline: dict[str, Any] = field(default_factory=dict)  # the previous version's figures at the switch
    watch_from: dict[str, Any] = field(default_factory=dict)  # the new version's figures at the switch

    @property
    def art(self) -> Artifact:
        return Artifact.model_validate(self.artifact)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_key(spec: TensorSpec) -> tuple[str, str, tuple[int, ...]]:
    return spec.name, spec.dtype, tuple(spec.shape[1:])


def signature_change(new: Manifest, serving: Manifest | None) -> str:
    """How the new version's inputs/outputs differ from the serving version's; "" when they do not
    (or nothing serves). The batch dimension may differ: it is not part of what clients send."""
    if serving is None:
        return ""
    changes = []
    for what, before, after in (("inputs", serving.inputs, new.inputs), ("outputs", serving.outputs, new.outputs)):
        a = [_shape_key(s) for s in before]
        b = [_shape_key(s) for s in after]
        if a != b:
            changes.append(f"{what} {_describe(a)} -> {_describe(b)}")
    return "; ".join(changes)


def _describe(keys: list[tuple[str, str, tuple[int, ...]]]) -> str:
    return "[" + ", ".join(f"{n} {d}{list(s)}" for n, d, s in keys) + "]"


class Updater:
    """Runs the update jobs of one device. Not thread-safe: the Agent calls it from one thread."""

    def __init__(
        self,
        runtime: Runtime,
        store: Path,
        downloads: Path,
        *,
        profile: str = "",
        trusted_keys: list[PublicKey] | None = None,
        jobs: dict[str, Job] | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.downloads = downloads
        self.profile = profile
        self.trusted = trusted_keys
        self.jobs: dict[str, Job] = dict(jobs or {})
        self._dl: dict[str, Download] = {}
        self._asked: dict[str, tuple[set[int], float]] = {}

    # -- events -------------------------------------------------------------------------------

    def want(self, model: str, desired: DesiredModel) -> list[ChunkRequest]:
        """The hub wants ``desired`` for ``model``: start (or keep) the job that gets it there."""
        job = self.jobs.get(model)
        sha = desired.artifact.sha256 if desired.artifact is not None else None
        same = job is not None and (job.version, job.artifact.get("sha256")) == (desired.version, sha)
        if job is not None and same and job.state != FAILED:
            return self._requests(job) if job.state == DOWNLOADING else []  # the same job again
        try:
            active: int | None = self.runtime.get(model).version
        except EdgekitError:
            active = None
        if active == desired.version:
            done = Job(model, desired.version, {}, SUCCEEDED, "already serving", desired.rollout, previous=active)
            self.jobs[model] = done
            return []
        if desired.artifact is None:
            why = "the desired state names no artifact to fetch"
            self.jobs[model] = Job(model, desired.version, {}, FAILED, why, desired.rollout)
            return []
        self._forget(model)
        job = Job(
            model,
            desired.version,
            desired.artifact.model_dump(),
            rollout=desired.rollout,
            allow_signature_change=desired.allow_signature_change,
            previous=active,
            health_window=desired.health_window_s,
        )
        self.jobs[model] = job
        log.info("update %s v%d: downloading %d bytes", model, job.version, desired.artifact.size)
        return self._requests(job)

    def chunk(self, chunk: Chunk) -> list[ChunkRequest]:
        """A chunk arrived: store it, ask for the next window, finish the job when the file is whole."""
        jobs = (j for j in self.jobs.values() if j.state == DOWNLOADING and j.artifact.get("sha256") == chunk.artifact)
        job = next(jobs, None)
        if job is None:
            return []  # for another artifact, or a late duplicate: harmless
        if chunk.error:
            return self._fail(job, f"the hub cannot serve the artifact: {chunk.error}")
        dl = self._download(job)
        if dl is None:
            return []
        try:
            dl.write(chunk.index, chunk.data)
        except DownloadError as e:
            return self._fail(job, e.message)
        job.done_chunks = dl.done
        job.updated = time.time()
        asked, _ = self._asked.get(job.model, (set(), 0.0))
        asked.discard(chunk.index)
        if dl.complete:
            self._finish(job, dl)
            return []
        return self._requests(job) if not asked else []

    def tick(self) -> list[ChunkRequest]:
        """Ask again for missing chunks when nothing came for a while (lost messages, restarts)."""
        out: list[ChunkRequest] = []
        now = time.monotonic()
        for job in self.jobs.values():
            if job.state == WATCHING:
                self._watch(job)
            if job.state != DOWNLOADING:
                continue
            asked, at = self._asked.get(job.model, (set(), 0.0))
            if not asked or now - at > RETRY_SECONDS:
                out += self._requests(job, again=True)
        return out

    def resume(self) -> list[ChunkRequest]:
        """After a restart: finish what was interrupted. A download resumes from the chunks on disk;
        an install or test that was cut short is judged by what the runtime serves now."""
        out: list[ChunkRequest] = []
        for job in self.jobs.values():
            if job.state in (VERIFYING, DOWNLOADING):
                job.state = DOWNLOADING
                out += self._requests(job)
            elif job.state in (INSTALLING, TESTING):
                self._judge(job)
            elif job.state == WATCHING:  # the counters restarted with the process: watch from now
                job.watch_from = _dump(self.runtime.metrics.figures(job.model, job.version))
        return out

    # -- steps --------------------------------------------------------------------------------

    def _download(self, job: Job) -> Download | None:
        dl = self._dl.get(job.model)
        if dl is None:
            try:
                dl = Download(self.downloads, job.art)
            except DownloadError as e:
                self._fail(job, e.message)
                return None
            self._dl[job.model] = dl
        return dl

    def _requests(self, job: Job, *, again: bool = False) -> list[ChunkRequest]:
        dl = self._download(job)
        if dl is None:
            return []
        if dl.complete:
            self._finish(job, dl)
            return []
        job.done_chunks = dl.done
        asked, _ = self._asked.get(job.model, (set(), 0.0))
        if asked and not again:
            return []
        missing = dl.missing(min(WINDOW, MAX_WINDOW))
        self._asked[job.model] = (set(missing), time.monotonic())
        art = job.art
        return [ChunkRequest(artifact=art.sha256, chunk_size=art.chunk_size, chunks=missing)]

    def _finish(self, job: Job, dl: Download) -> None:
        job.state = VERIFYING
        try:
            path = dl.verify()
        except DownloadError as e:
            self._dl.pop(job.model, None)
            job.state = DOWNLOADING  # starts over from chunk 0 on the next tick
            job.reason = e.message
            return
        try:
            self._check(job, path)
        except EdgekitError as e:
            dl.discard()
            self._dl.pop(job.model, None)
            self._fail(job, e.message)
            return
        job.state = INSTALLING
        try:
            installed = install_bundle(path, self.store)
        except BundleError as e:
            self._fail(job, e.message)
            return
        finally:
            dl.discard()
            self._dl.pop(job.model, None)
        log.info("update %s v%d: installed %s; testing", job.model, job.version, installed)
        job.state = TESTING
        self.runtime.refresh()  # loads it beside the serving version: warm-up and golden samples
        self._judge(job)

    def _check(self, job: Job, path: Path) -> Bundle:
        """Everything about the file that can be known before it touches the store."""
        bundle = read_bundle(path)
        m = bundle.manifest
        if (m.name, m.version) != (job.model, job.version):
            msg = f"the artifact is {m.name} v{m.version}, not the desired {job.model} v{job.version}"
            raise BundleError(msg)
        if self.profile and m.profile.name != self.profile:
            msg = f"the bundle was built for profile {m.profile.name!r}, this device is {self.profile!r}"
            raise BundleError(msg)
        if self.trusted is not None:
            verify_bundle(bundle, self.trusted, f"{job.model} v{job.version}")
        if not job.allow_signature_change:
            try:
                serving: Manifest | None = self.runtime.get(job.model).manifest
            except EdgekitError:
                serving = None
            change = signature_change(m, serving)
            if change:
                msg = f"the signature changes ({change}): clients would break; deploy with --allow-signature-change"
                raise BundleError(msg)
        return bundle

    def _judge(self, job: Job) -> None:
        """Succeeded when the runtime serves the new version; else failed with the runtime's reason,
        and the version is taken out of the store so the old one keeps serving."""
        try:
            serving = self.runtime.get(job.model).version
        except EdgekitError:
            serving = None
        if serving == job.version:
            job.reason = ""
            job.updated = time.time()
            log.info("update %s v%d: serving", job.model, job.version)
            self._clean(job)
            if job.health_window > 0 and job.previous is not None:
                job.state = WATCHING
                job.switched_at = time.time()
                job.baseline = _dump(self.runtime.metrics.figures(job.model, job.previous))
                job.watch_from = _dump(self.runtime.metrics.figures(job.model, job.version))
            else:
                job.state = SUCCEEDED
            return
        statuses = self.runtime.status(job.model) if job.model in self.runtime.models() else []
        status = next((s for s in statuses if s.version == job.version), None)
        why = status.error_message if status is not None and status.error_message else "the new version did not load"
        shutil.rmtree(self.store / job.model / str(job.version), ignore_errors=True)
        self.runtime.refresh()
        self._fail(job, why)

    def _watch(self, job: Job) -> None:
        """During the health window: roll back when the new version does worse than the old did."""
        now = self.runtime.metrics.figures(job.model, job.version)
        seen = now.since(_load(job.watch_from))
        before = _load(job.baseline)
        worse = ""
        if seen.requests >= MIN_REQUESTS:
            if seen.error_rate > before.error_rate + ERROR_MARGIN:
                worse = (
                    f"server error rate {seen.error_rate:.1%} over {seen.requests:.0f} requests against "
                    f"{before.error_rate:.1%} for v{job.previous}"
                )
            p95, old95 = seen.quantile(0.95), before.quantile(0.95)
            enough = before.requests >= MIN_REQUESTS
            if not worse and enough and p95 is not None and old95 is not None and p95 > LATENCY_FACTOR * old95:
                worse = f"p95 latency {p95 * 1e3:.1f} ms against {old95 * 1e3:.1f} ms for v{job.previous}"
        if worse:
            self._roll_back(job, f"health window: {worse}")
        elif time.time() - job.switched_at >= job.health_window:
            job.state = SUCCEEDED
            job.updated = time.time()
            log.info("update %s v%d: health window passed (%d requests)", job.model, job.version, seen.requests)

    def _roll_back(self, job: Job, reason: str) -> None:
        """Put the previous version back: the new one leaves the store, the runtime loads the old."""
        shutil.rmtree(self.store / job.model / str(job.version), ignore_errors=True)
        self.runtime.refresh()
        try:
            serving = self.runtime.get(job.model).version
        except EdgekitError:
            serving = None
        job.state = ROLLED_BACK
        job.reason = reason if serving == job.previous else f"{reason}; v{job.previous} did not load back either"
        job.updated = time.time()
        log.warning("update %s v%d rolled back to v%s: %s", job.model, job.version, job.previous, job.reason)

    def _clean(self, job: Job) -> None:
        """Keep the new version and the one before it (for going back); remove older ones that are
        not loaded, so updates do not fill the device's disk."""
        loaded = {s.version for s in self.runtime.status(job.model) if s.state == AVAILABLE}
        keep = {job.version, job.previous, *loaded}
        folder = self.store / job.model
        for d in folder.iterdir() if folder.is_dir() else ():
            if d.name.isdigit() and int(d.name) not in keep:
                shutil.rmtree(d, ignore_errors=True)
                log.info("update %s: removed v%s from the store (older than v%s)", job.model, d.name, job.previous)

    def _fail(self, job: Job, reason: str) -> list[ChunkRequest]:
        job.state = FAILED
        job.reason = reason
        job.updated = time.time()
        self._forget(job.model)
        log.warning("update %s v%d failed: %s", job.model, job.version, reason)
        return []

    def _forget(self, model: str) -> None:
        self._asked.pop(model, None)
        self._dl.pop(model, None)

    def progress(self, model: str) -> dict[str, int] | None:
        job = self.jobs.get(model)
        if job is None or not job.artifact:
            return None
        return {"chunks": job.done_chunks, "of": job.art.chunks}

    def active(self) -> bool:
        return any(j.state in ACTIVE_STATES for j in self.jobs.values())

    def state(self) -> dict[str, Any]:
        return {m: j.to_dict() for m, j in self.jobs.items()}

    @staticmethod
    def restore(raw: dict[str, Any]) -> dict[str, Job]:
        """Jobs from the agent's state file; an unreadable one is dropped with a warning."""
        jobs: dict[str, Job] = {}
        for m, d in raw.items():
            try:
                jobs[m] = Job(**d)
            except TypeError:
                log.warning("update job of %s unreadable in the agent state; the hub will send it again", m)
        return jobs


def _dump(f: Figures) -> dict[str, Any]:
    return {"requests": f.requests, "server_errors": f.server_errors, "buckets": [list(b) for b in f.buckets]}


def _load(d: dict[str, Any]) -> Figures:
    if not d:
        return Figures(0.0, 0.0, ())
    buckets = tuple((float(a), float(b)) for a, b in d["buckets"])
    return Figures(float(d["requests"]), float(d["server_errors"]), buckets)
