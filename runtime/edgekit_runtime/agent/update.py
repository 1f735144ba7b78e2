"""One model's update on the device, as a persisted state machine: download in chunks, verify, install,
smoke-test by loading it beside the serving version, shadow-check it on live traffic, switch, or
refuse and stay on what serves; and going back to an older version on request.

States (the rollout status shows them): ``downloading`` -> ``verifying`` -> ``installing`` ->
``testing`` (golden samples, then the shadow check if asked for) -> (``watching``, during a health
window) -> ``succeeded``, or ``failed`` / ``rolled_back`` with a reason a user can act on.

Going back (a desired version older than the active one): when that version is still in the store
(the agent keeps the one before the active one) it is loaded beside the serving one and pinned
as the default, then the newer versions leave the store; otherwise it is downloaded, verified and
installed first, then switched to the same way. A version leaves the store by an atomic rename to
a hidden name (the folder fsynced) before it is deleted, so a kill -9 at any point leaves only
whole versions where the runtime looks.

The shadow check (``shadow_s`` > 0, see ``shadow.py``): after the golden samples pass, the new
version stays loaded beside the serving one, which stays pinned as the default, while a share of
live requests is mirrored to it; at the end of the window the answers are compared (with the
golden samples when no live request came) and, below ``min_agreement``, the new version is removed.

The health window: after the switch the new version's server error rate and p95 latency on this
device are compared with the previous version's figures here; with at least MIN_REQUESTS requests
in the window, an error rate over the previous one plus ERROR_MARGIN, or a p95 over LATENCY_FACTOR
times the previous p95 and at least LATENCY_MARGIN_S slower, puts the previous version back by
itself and reports ``rolled_back`` with the figures. The machine is plain
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
from edgekit_runtime.agent.shadow import Shadow, describe
from edgekit_runtime.bundle import Bundle, Manifest, fsync_dir, read_bundle
from edgekit_runtime.errors import BundleError, EdgekitError
from edgekit_runtime.metrics import Figures
from edgekit_runtime.runtime import AVAILABLE, Runtime
from edgekit_runtime.signing import PublicKey, verify_bundle
from edgekit_runtime.store import install_bundle, read_installed
from edgekit_runtime.tensors import TensorSpec

__all__ = ["Job", "Updater", "signature_change"]

log = logging.getLogger("edgekit_runtime.agent")

DOWNLOADING, VERIFYING, INSTALLING, TESTING = "downloading", "verifying", "installing", "testing"
WATCHING, SUCCEEDED, FAILED, ROLLED_BACK = "watching", "succeeded", "failed", "rolled_back"
ACTIVE_STATES = (DOWNLOADING, VERIFYING, INSTALLING, TESTING, WATCHING)
MIN_REQUESTS = 20
ERROR_MARGIN = 0.05
LATENCY_FACTOR = 2.0
#: ... and at least this much slower (seconds): the histogram's buckets are coarse (1 ms, then
#: 2.5 ms), so one bucket step under load alone would be "twice as slow" (a demo on a busy machine
#: rolled a healthy device back so).
LATENCY_MARGIN_S = 0.010
#: Chunks asked for at once (the device's one outstanding window).
WINDOW = 8
#: Ask again for what is missing when no chunk of the window arrived for this long (a broker restart,
#: a hub restart). Counted from the last chunk that arrived, not from the request: a busy broker may
#: take longer than this to deliver a whole window, and asking again then only doubles its load.
RETRY_SECONDS = 3.0
#: A whole download whose sha256 is wrong is fetched again this many times (a chunk damaged on the
#: device's disk), then the update fails: the hub's copy itself is bad, and fetching it forever
#: would never end.
VERIFY_RETRIES = 1
#: A version on its way out of the store: ``STORE/MODEL/.VERSION.ID.removed`` (hidden: not a version).
REMOVED = ".removed"


def health_verdict(seen: Figures, before: Figures, previous: int | None) -> str:
    """Why the new version does worse than the previous one did (``seen``: its figures in the health
    window; ``before``: the previous version's), or "" when it does not (or too few requests)."""
    if seen.requests < MIN_REQUESTS:
        return ""
    if seen.error_rate > before.error_rate + ERROR_MARGIN:
        return (
            f"server error rate {seen.error_rate:.1%} over {seen.requests:.0f} requests against "
            f"{before.error_rate:.1%} for v{previous}"
        )
    p95, old95 = seen.quantile(0.95), before.quantile(0.95)
    if before.requests < MIN_REQUESTS or p95 is None or old95 is None:
        return ""
    if p95 > LATENCY_FACTOR * old95 and p95 - old95 >= LATENCY_MARGIN_S:  # one coarse bucket step is not
        return f"p95 latency {p95 * 1e3:.1f} ms against {old95 * 1e3:.1f} ms for v{previous}"
    return ""


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
    verify_failures: int = 0  # whole downloads whose sha256 was not the desired one
    health_window: float = 0.0
    switched_at: float = 0.0
    baseline: dict[str, Any] = field(default_factory=dict)  # the previous version's figures at the switch
    watch_from: dict[str, Any] = field(default_factory=dict)  # the new version's figures at the switch
    back: bool = False  # going back to an older version than the active one
    shadow_s: float = 0.0
    min_agreement: float | None = None
    shadow_until: float = 0.0  # unix time the shadow window ends; 0 when none runs
    shadow: dict[str, Any] | None = None  # the shadow check's figures (ReportedModel.shadow)

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
        self._shadows: dict[str, Shadow] = {}

    # -- events -------------------------------------------------------------------------------

    def want(self, model: str, desired: DesiredModel) -> list[ChunkRequest]:
        """The hub wants ``desired`` for ``model``: start (or keep) the job that gets it there."""
        job = self.jobs.get(model)
        sha = desired.artifact.sha256 if desired.artifact is not None else None
        same = job is not None and (job.version, job.artifact.get("sha256")) == (desired.version, sha)
        if job is not None and same and job.state != FAILED:
            return self._requests(job) if job.state == DOWNLOADING else []  # the same job again
        if job is not None:
            self._abandon(job)
        active = self._serving(model)
        if active == desired.version:
            done = Job(model, desired.version, {}, SUCCEEDED, "already serving", desired.rollout, previous=active)
            self.jobs[model] = done
            return []
        back = active is not None and desired.version < active
        if back and (self._folder(model, desired.version) / "manifest.json").is_file():
            why = f"going back to v{desired.version} from disk"
            job = Job(model, desired.version, {}, TESTING, why, desired.rollout, previous=active, back=True)
            self.jobs[model] = job
            log.info("update %s: %s (v%s serves)", model, why, active)
            self._go_back(job, installed=False)
            return []
        if desired.artifact is None:
            why = "the desired state names no artifact to fetch"
            if back:
                why = f"v{desired.version} is not on this device any more and {why}"
            self.jobs[model] = Job(model, desired.version, {}, FAILED, why, desired.rollout)
            return []
        job = Job(
            model,
            desired.version,
            desired.artifact.model_dump(),
            rollout=desired.rollout,
            allow_signature_change=desired.allow_signature_change,
            previous=active,
            health_window=desired.health_window_s,
            back=back,
            shadow_s=desired.shadow_s,
            min_agreement=desired.min_agreement,
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
        if chunk.index in asked:  # progress on the window: the re-ask clock counts from here
            asked.discard(chunk.index)
            self._asked[job.model] = (asked, time.monotonic())
        if dl.complete:
            self._finish(job, dl)
            return []
        return self._requests(job) if not asked else []

    def tick(self) -> list[ChunkRequest]:
        """Ask again for missing chunks when nothing came for a while (lost messages, restarts)."""
        out: list[ChunkRequest] = []
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.state == WATCHING:
                self._watch(job)
            if job.state == TESTING and job.shadow_until:
                self._shadow_tick(job)
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
        self._sweep()
        for job in list(self.jobs.values()):
            if job.state in (VERIFYING, DOWNLOADING):
                job.state = DOWNLOADING
                out += self._requests(job)
            elif job.state in (INSTALLING, TESTING) and job.back:
                self._go_back(job, installed=True)
            elif job.state == TESTING and job.shadow_until:
                self._restart_shadow(job)
            elif job.state in (INSTALLING, TESTING):
                self._judge(job)
            elif job.state == WATCHING:  # the counters restarted with the process: watch from now
                job.watch_from = _dump(self.runtime.metrics.figures(job.model, job.version))
                self.runtime.set_canary(job.model, job.version)
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
            job.verify_failures += 1
            if job.verify_failures > VERIFY_RETRIES:  # the same bytes again: the hub's copy is bad
                self._fail(job, f"{e.message} (downloaded {job.verify_failures} times)")
                return
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
        if job.back or any(v > job.version for v in self._on_disk(job.model)):
            self._go_back(job, installed=True)  # older than what the store holds: switch to it on purpose
            return
        shadow = job.shadow_s > 0 and job.previous is not None
        if shadow:
            self.runtime.pin(job.model, job.previous)  # the new version loads beside it, not in its place
        self.runtime.refresh()  # loads it beside the serving version: warm-up and golden samples
        if shadow:
            self._start_shadow(job)
        else:
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
                self.runtime.set_canary(job.model, job.version)
            else:
                job.state = SUCCEEDED
                self.runtime.set_canary(job.model, None)
            return
        why = self._load_error(job.model, job.version) or "the new version did not load"
        self._remove(job.model, job.version)
        self.runtime.refresh()
        self._fail(job, why)

    def _load_error(self, model: str, version: int) -> str:
        statuses = self.runtime.status(model) if model in self.runtime.models() else []
        status = next((s for s in statuses if s.version == version), None)
        return status.error_message if status is not None else ""

    def _serving(self, model: str) -> int | None:
        try:
            return self.runtime.get(model).version
        except EdgekitError:
            return None

    # -- going back ---------------------------------------------------------------------------

    def _go_back(self, job: Job, *, installed: bool) -> None:
        """Serve ``job.version``, older than what serves and in the store: it loads beside the serving
        version pinned as the default (so it serves the moment it passes its golden samples), then
        the newer versions leave the store. Each step leaves the store serving a whole version, so
        it is safe to run again after a crash (``resume``). When it does not load, the newer
        version keeps serving (and a version downloaded for this leaves the store again)."""
        model, version = job.model, job.version
        job.state = TESTING
        job.back = True
        self.runtime.set_canary(model, None)
        self.runtime.pin(model, version)
        try:
            self.runtime.refresh()
            if self._serving(model) == version:
                for newer in sorted((v for v in self._on_disk(model) if v > version), reverse=True):
                    self._remove(model, newer)
                    log.info("update %s: removed v%d from the store (going back to v%d)", model, newer, version)
                self.runtime.refresh()
        finally:
            self.runtime.pin(model, None)
        if self._serving(model) == version:
            job.state = SUCCEEDED
            job.reason = ""
            job.updated = time.time()
            log.info("update %s: back on v%d", model, version)
            return
        why = self._load_error(model, version) or f"v{version} did not load"
        if installed and job.artifact:
            self._remove(model, version)
        self.runtime.refresh()
        self._fail(job, f"going back to v{version}: {why}; v{self._serving(model)} keeps serving")

    def _folder(self, model: str, version: int) -> Path:
        return self.store / model / str(version)

    def _on_disk(self, model: str) -> list[int]:
        folder = self.store / model
        return sorted(int(d.name) for d in folder.iterdir() if d.name.isdigit()) if folder.is_dir() else []

    def _remove(self, model: str, version: int) -> None:
        """Take a version out of the store: an atomic rename to a hidden name, the folder fsynced,
        then the delete; a crash in between leaves a hidden folder, swept at the next start."""
        folder = self._folder(model, version)
        if not folder.exists():
            return
        gone = folder.with_name(f".{version}.{time.time_ns()}{REMOVED}")
        try:
            folder.rename(gone)
            fsync_dir(folder.parent)
        except OSError as e:
            log.warning("update %s: could not take v%d out of the store: %s", model, version, e)
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(gone, ignore_errors=True)

    def _sweep(self) -> None:
        """Delete what a crash left half-done: hidden ``*.removed`` folders (a version on its way
        out) and ``.VERSION.*.part`` folders (an install cut short: install_bundle renames a whole,
        fsynced folder into place, so a .part one never served). Runs at start, before any install."""
        if not self.store.is_dir():
            return
        for model in self.store.iterdir():
            if model.is_dir() and not model.name.startswith("."):
                for d in (*model.glob(f".*{REMOVED}"), *model.glob(".*.part")):
                    if d.is_dir():
                        log.info("removing %s, left by an interrupted update", d)
                        shutil.rmtree(d, ignore_errors=True)

    # -- the shadow check ---------------------------------------------------------------------

    def _start_shadow(self, job: Job) -> None:
        """The new version loaded beside the pinned serving one: mirror live requests to it."""
        assert job.previous is not None
        try:
            self.runtime.get(job.model, job.version)
        except EdgekitError:
            self.runtime.pin(job.model, None)
            self._judge(job)  # it did not load: fails with the runtime's reason and leaves the store
            return
        sh = Shadow(self.runtime, job.model, serving=job.previous, candidate=job.version)
        self._shadows[job.model] = sh
        self.runtime.set_tap(job.model, sh.offer)
        self.runtime.set_canary(job.model, job.version)
        job.shadow_until = time.time() + job.shadow_s
        job.state = TESTING
        self._shadow_progress(job, sh)
        log.info("update %s v%d: shadow check beside v%d for %g s", job.model, job.version, job.previous, job.shadow_s)

    def _restart_shadow(self, job: Job) -> None:
        """After a restart the runtime's first load served the newest version: pin the previous one
        again and start the window over (what was compared before the restart is lost)."""
        if job.previous is None:
            self._judge(job)
            return
        self.runtime.pin(job.model, job.previous)
        self.runtime.refresh()
        if self._serving(job.model) != job.previous:
            self.runtime.pin(job.model, None)
            self._judge(job)
            return
        self._start_shadow(job)

    def _shadow_progress(self, job: Job, sh: Shadow) -> None:
        res = sh.result()
        job.shadow = res
        left = max(0.0, job.shadow_until - time.time())
        errors = f", {sh.errors} failed on v{job.version}" if sh.errors else ""
        dropped = f", {sh.dropped} dropped (queue full)" if sh.dropped else ""
        so_far = f" ({describe(res)} so far)" if res["requests"] else ""
        job.reason = (
            f"shadow check of v{job.version} beside v{job.previous}: {res['requests']} live requests compared"
            f"{so_far}{errors}{dropped}; {left:.0f} s of {job.shadow_s:g} s left"
        )

    def _shadow_tick(self, job: Job) -> None:
        sh = self._shadows.get(job.model)
        if sh is None:  # restored from the state file without a resume (cannot happen in the Agent)
            self._restart_shadow(job)
            return
        self._shadow_progress(job, sh)
        if time.time() >= job.shadow_until:
            self._end_shadow(job, sh)

    def _stop_shadow(self, model: str) -> Shadow | None:
        sh = self._shadows.pop(model, None)
        self.runtime.set_tap(model, None)
        if sh is not None:
            sh.close()
        return sh

    def _end_shadow(self, job: Job, sh: Shadow) -> None:
        """The window is over: switch, or remove the new version when it agrees too little."""
        self._stop_shadow(job.model)
        res = sh.result()
        errors = sh.errors
        where = f"over {res['requests']} live requests"
        if res["requests"] == 0:
            golden: dict[str, Any] = {}
            try:
                golden = read_installed(self._folder(job.model, job.version)).golden_inputs
                res = sh.golden(golden) if golden else res
            except (EdgekitError, OSError) as e:
                log.warning("update %s v%d: shadow check on the golden samples failed: %s", job.model, job.version, e)
            n = next((len(a) for a in golden.values()), 0) if res["source"] == "golden" else 0
            where = f"on the {n} golden samples (no live request reached v{job.previous} in the window)"
        job.shadow = res if res["requests"] or res["source"] == "golden" else None
        job.shadow_until = 0.0
        errs = f" ({errors} failed on v{job.version})" if errors else ""
        figures = f"{describe(res)} {where}{errs}"
        low = job.min_agreement
        if low is not None and res["metric"] == "top1" and res["value"] < low:
            self._remove(job.model, job.version)
            self.runtime.refresh()  # the new version unloads; the pinned previous one kept serving
            self.runtime.pin(job.model, None)
            self._fail(job, f"shadow check: {figures} against v{job.previous}, below the minimum {low:.1%}")
            return
        log.info("update %s v%d: shadow check passed: %s; switching", job.model, job.version, figures)
        self.runtime.pin(job.model, None)  # the switch: the newest loaded version is the default now
        self.runtime.refresh()  # the policy unloads the previous version once its requests finish
        self._judge(job)

    def _abandon(self, job: Job) -> None:
        """A new desired state replaces ``job``: a new version still in its shadow check leaves."""
        self._forget(job.model)
        if self._stop_shadow(job.model) is not None or (job.state == TESTING and job.shadow_until):
            self._remove(job.model, job.version)
            self.runtime.refresh()
            self.runtime.pin(job.model, None)
            job.shadow_until = 0.0
        self.runtime.set_canary(job.model, None)

    def _watch(self, job: Job) -> None:
        """During the health window: roll back when the new version does worse than the old did."""
        now = self.runtime.metrics.figures(job.model, job.version)
        seen = now.since(_load(job.watch_from))
        before = _load(job.baseline)
        worse = health_verdict(seen, before, job.previous)
        if worse:
            self._roll_back(job, f"health window: {worse}")
        elif time.time() - job.switched_at >= job.health_window:
            job.state = SUCCEEDED
            job.updated = time.time()
            self.runtime.set_canary(job.model, None)
            log.info("update %s v%d: health window passed (%d requests)", job.model, job.version, seen.requests)

    def _roll_back(self, job: Job, reason: str) -> None:
        """Put the previous version back: the new one leaves the store, the runtime loads the old."""
        self._remove(job.model, job.version)
        self.runtime.refresh()
        self.runtime.set_canary(job.model, None)
        serving = self._serving(job.model)
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
                self._remove(job.model, int(d.name))
                log.info("update %s: removed v%s from the store (older than v%s)", job.model, d.name, job.previous)

    def _fail(self, job: Job, reason: str) -> list[ChunkRequest]:
        self.runtime.set_canary(job.model, None)
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
