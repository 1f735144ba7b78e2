"""Telemetry end to end, with real processes only: a Mosquitto of the test's own, `edgekit hub serve`
and device processes (`python -m edgekit_runtime serve STORE --broker ... --telemetry-interval ...`)
that serve real HTTP traffic, read back through the CLI as a user reads it (`edgekit fleet --json`,
`edgekit telemetry export`).

Covered: known traffic shows up as exact counts; a broker stopped for several intervals and a hub
stopped longer than the broker would queue for it lose nothing and duplicate nothing (every
sequence number stored once, the request counts exact); a device killed with kill -9 during an
outage keeps its unsent queue; the queue's bound drops the oldest and says how many.

Every wait is bounded and says what it waited for; no test asserts a duration.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa

from edgekit.hub.telemetry import EXPORT_COLUMNS
from edgekit_runtime.bundle import read_bundle
from edgekit_runtime.livestats import output_summary
from edgekit_runtime.signing import sign_bundle
from edgekit_runtime.store import install_bundle
from tests.hub.conftest import EDGEKIT, HubProcess, Keys, edgekit, make_bundle, make_keys
from tests.mqtt import WAIT, Mosquitto, free_port, wait_until

FEATURES = 64
X = np.random.default_rng(3).normal(size=(2, FEATURES)).astype(np.float32)
INTERVAL = "0.5"  # seconds between telemetry messages: several intervals in a few seconds
LONG = 120.0


def with_validation(path: Path, keys: Keys) -> Path:
    """The bundle with what the converter records of validation (the output summary of 2,000 rows
    of the inputs it will see, N(0, 1)), signed again."""
    b = read_bundle(path)
    x = np.random.default_rng(11).normal(size=(2000, FEATURES)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(FEATURES, 10)).astype(np.float32) / 16  # tests/hub onnx_model(1)
    logits = x @ w
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    validation = {"outputs": output_summary({"probs": probs}, "probs")}
    manifest = b.manifest.model_copy(update={"validation": validation})
    b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"", signature=None)
    b = dataclasses.replace(b, signature=sign_bundle(b, keys.private))
    b.write(path)
    return path


class Device:
    """`python -m edgekit_runtime serve STORE --broker ... --device-id ID --telemetry-interval ...`."""

    def __init__(
        self, folder: Path, device_id: str, broker: Mosquitto, bundle: Path, *extra: str, trust: Path | None = None
    ) -> None:
        self.id = device_id
        self.store = folder / "store"
        if not self.store.exists():
            self.store.mkdir(parents=True)
            install_bundle(bundle, self.store)
        self.port = free_port()
        self.log = folder / "serve.log"
        self.args = [sys.executable, "-m", "edgekit_runtime", "serve", str(self.store), "--port", str(self.port),
                     "--broker", broker.url, "--device-id", device_id, "--profile", "raspberrypi",
                     "--label", "site=lab", "--telemetry-interval", INTERVAL, *extra]  # fmt: skip
        if trust is not None:
            self.args += ["--trust-key", str(trust)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.sent_ok = 0
        self.sent_bad = 0

    def start(self) -> Device:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self.ready, f"{self.id} ready over HTTP")
        return self

    def ready(self) -> bool:
        try:
            return self.http.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def traffic(self, ok: int, bad: int = 0, x: np.ndarray = X) -> None:
        """``ok`` good :predict requests of ``x`` and ``bad`` ones (a wrong shape: 400), counted."""
        for _ in range(ok):
            r = self.http.post("/v1/models/digits:predict", json={"instances": x.tolist()})
            assert r.status_code == 200, r.text
            self.sent_ok += 1
        for _ in range(bad):
            r = self.http.post("/v1/models/digits:predict", json={"instances": [[1.0, 2.0]]})
            assert r.status_code == 400, r.text
            self.sent_bad += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(WAIT) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class World:
    def __init__(self, folder: Path, broker_conf: str = "") -> None:
        self.folder = folder
        self.broker = Mosquitto(folder, extra_conf=broker_conf).start()
        self.keys = make_keys(folder / "keys")
        self.bundle = with_validation(make_bundle(folder / "digits-1.ekb", version=1, seed=1), self.keys)
        self.hub: HubProcess | None = None
        self.hub_port = free_port()
        self.devices: list[Device] = []

    def start_hub(self) -> HubProcess:
        trust = ("--trust-key", str(self.keys.public_path))
        self.hub = HubProcess(self.folder / "hub", "--broker", self.broker.url, *trust, port=self.hub_port).start()
        return self.hub

    def device(self, device_id: str, *extra: str) -> Device:
        d = Device(
            self.folder / device_id, device_id, self.broker, self.bundle, *extra, trust=self.keys.public_path
        ).start()
        self.devices.append(d)
        return d

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.hub is not None
        done = edgekit(*args, env={**self.hub.env(), "COLUMNS": "200"})  # rich's tables: no wrapping
        assert done.returncode == 0, (args, done.returncode, done.stderr)
        return done

    def fleet(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("fleet", "--json").stdout))

    def export(self, *args: str) -> list[dict[str, str]]:
        out = self.folder / "export.csv"
        self.cli("telemetry", "export", "--format", "csv", "-o", str(out), *args)
        with out.open(newline="") as f:
            return list(csv.DictReader(f))

    def stored(self, device: str) -> list[tuple[int, str, int, int]]:
        """(seq, kind, requests, errors) of every telemetry row the hub stored for ``device``."""
        db = sqlite3.connect(f"file:{self.folder / 'hub' / 'hub.db'}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT seq, kind, requests, errors FROM telemetry WHERE device_id = ? ORDER BY seq", (device,)
            ).fetchall()
        finally:
            db.close()
        return [(int(a), str(b), int(c), int(d)) for a, b, c, d in rows]

    def totals(self, device: str) -> tuple[int, int]:
        rows = self.stored(device)
        return sum(r[2] for r in rows), sum(r[3] for r in rows)

    def wait_totals(self, d: Device, timeout: float = LONG) -> None:
        want = (d.sent_ok + d.sent_bad, d.sent_bad)
        wait_until(lambda: self.totals(d.id) == want, f"{d.id}'s stored totals to reach {want}", timeout)

    def close(self) -> None:
        for d in self.devices:
            d.stop()
            d.http.close()
        if self.hub is not None and self.hub.proc is not None and self.hub.proc.poll() is None:
            self.hub.stop()
        self.broker.stop()


def contiguous(rows: list[tuple[int, str, int, int]]) -> bool:
    seqs = [r[0] for r in rows]
    return seqs == list(range(1, len(seqs) + 1))


def test_known_traffic_shows_up_as_exact_counts_in_the_export_and_the_fleet_view(world: World) -> None:
    world.start_hub()
    a = world.device("pi-a")
    b = world.device("pi-b")
    a.traffic(ok=37, bad=3)
    b.traffic(ok=5)
    world.wait_totals(a)
    world.wait_totals(b)

    rows = world.export()
    per_device = {d: [r for r in rows if r["device"] == d] for d in ("pi-a", "pi-b")}
    assert sum(int(r["requests"]) for r in per_device["pi-a"]) == 40
    assert sum(int(r["errors"]) for r in per_device["pi-a"]) == 3
    assert sum(int(r["requests"]) for r in per_device["pi-b"]) == 5
    assert {r["model"] for r in rows} == {"digits"} and {r["version"] for r in rows} == {"1"}
    busy = [r for r in per_device["pi-a"] if int(r["requests"])]
    assert all(float(r["p95_ms"]) >= float(r["p50_ms"]) > 0 for r in busy)
    assert all(json.loads(r["errors_by_kind"]) in ({}, {"invalid_input": int(r["errors"])}) for r in rows)
    # one device only, and since an instant after everything: nothing
    assert {r["device"] for r in world.export("--device", "pi-b")} == {"pi-b"}
    assert world.export("--since", "2999-01-01T00:00:00Z") == []

    parquet = world.folder / "export.parquet"
    world.cli("telemetry", "export", "--format", "parquet", "-o", str(parquet))
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    assert table.column_names == list(EXPORT_COLUMNS)
    got = table.to_pylist()  # taken later than the CSV: telemetry went on, the counts did not change
    assert {(r["device"], str(r["seq"])) for r in rows} <= {(r["device"], str(r["seq"])) for r in got}
    assert sum(r["requests"] for r in got if r["device"] == "pi-a") == 40
    assert sum(r["errors"] for r in got if r["device"] == "pi-a") == 3

    fleet = {r["device"]: r for r in world.fleet()}
    assert set(fleet) == {"pi-a", "pi-b"}
    assert fleet["pi-a"]["online"] is True and fleet["pi-a"]["labels"] == {"site": "lab"}
    assert fleet["pi-a"]["model"] == "digits" and fleet["pi-a"]["version"] == 1
    assert fleet["pi-a"]["profile"] == "raspberrypi" and fleet["pi-a"]["last_seen"] is not None

    human = world.cli("fleet").stderr
    assert "pi-a" in human and "pi-b" in human and "digits" in human
    shown = world.cli("fleet", "show", "pi-a").stderr
    assert "p95 ms" in shown and "requests" in shown


def test_a_broker_outage_of_several_intervals_loses_and_duplicates_nothing(world: World) -> None:
    world.start_hub()
    d = world.device("pi-1")
    d.traffic(ok=10)
    world.wait_totals(d)
    world.broker.kill()
    for _ in range(6):  # traffic goes on while the broker is away, over several intervals
        d.traffic(ok=4, bad=1)
        time.sleep(0.4)
    world.broker.start()
    world.wait_totals(d)
    rows = world.stored("pi-1")
    assert contiguous(rows), [r[0] for r in rows]
    assert world.totals("pi-1") == (40, 6)


def test_a_hub_down_longer_than_the_broker_would_queue_loses_nothing(tmp_path: Path) -> None:
    # the broker keeps at most 5 messages for an absent subscriber; the hub stays away for far more
    world = World(tmp_path, broker_conf="max_queued_messages 5\n")
    try:
        hub = world.start_hub()
        d = world.device("pi-1")
        d.traffic(ok=3)
        world.wait_totals(d)
        assert hub.stop(signal.SIGKILL) == -signal.SIGKILL
        before = len(world.stored("pi-1"))
        for _ in range(8):
            d.traffic(ok=2)
            time.sleep(0.5)
        world.start_hub()
        world.wait_totals(d)
        rows = world.stored("pi-1")
        assert len(rows) > before + 10  # well past what the broker could have kept for the hub
        assert contiguous(rows), [r[0] for r in rows]
        assert world.totals("pi-1") == (19, 0)
    finally:
        world.close()


def test_a_device_killed_during_an_outage_keeps_its_unsent_queue(world: World) -> None:
    world.start_hub()
    d = world.device("pi-1")
    world.broker.kill()
    d.traffic(ok=12, bad=2)
    # the interval that holds this traffic is on the device's disk once the next one has begun
    spool = d.store / ".edgekit-agent" / "telemetry.db"

    def queued_requests() -> int:
        db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        try:
            bodies = [json.loads(b) for (b,) in db.execute("SELECT body FROM messages")]
        finally:
            db.close()
        return sum(b["model"]["requests"] for b in bodies if b["kind"] == "model")

    wait_until(lambda: queued_requests() == 14, "the traffic's interval in the device's queue")
    d.kill()
    d.start()  # broker still down: the restarted process finds its queue
    d.traffic(ok=1)
    world.broker.start()
    world.wait_totals(d)
    rows = world.stored("pi-1")
    assert contiguous(rows), [r[0] for r in rows]
    assert world.totals("pi-1") == (15, 2)


def test_the_queue_bound_drops_the_oldest_and_reports_how_many(world: World) -> None:
    world.start_hub()
    world.broker.kill()
    # fast intervals into a 64K queue while the broker is away: past the bound within seconds
    d = world.device("pi-1", "--telemetry-queue-bytes", "64K", "--telemetry-interval", "0.05")
    spool = d.store / ".edgekit-agent" / "telemetry.db"

    def dropped() -> int:
        db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])
        finally:
            db.close()

    wait_until(lambda: dropped() > 20, "the device to drop messages past its 64K bound", timeout=LONG)
    d.stop()
    lost = dropped()
    # the same device again at the usual pace (well under the send rate), with the broker back
    again = Device(world.folder / "pi-1", "pi-1", world.broker, world.bundle).start()
    world.devices.append(again)
    world.broker.start()

    def last_device_message() -> dict[str, Any] | None:
        db = sqlite3.connect(f"file:{world.folder / 'hub' / 'hub.db'}?mode=ro", uri=True)
        try:
            found = db.execute(
                "SELECT body FROM telemetry WHERE device_id = 'pi-1' AND kind = 'device' ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        finally:
            db.close()
        return dict(json.loads(found[0])["device"]) if found else None

    def drained() -> bool:
        last = last_device_message()
        return last is not None and last["queue"]["dropped"] == lost and contiguous_from_first()

    def contiguous_from_first() -> bool:
        seqs = [r[0] for r in world.stored("pi-1")]
        return bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) > 10

    wait_until(drained, f"the backlog stored and a device message reporting {lost} dropped", timeout=LONG)
    seqs = [r[0] for r in world.stored("pi-1")]
    # exactly the oldest were dropped: the first stored number is the first one kept
    assert seqs[0] == lost + 1, (seqs[:5], lost)


def test_a_device_fed_shifted_inputs_is_flagged_for_drift_with_the_numbers(world: World) -> None:
    world.start_hub()
    world.cli("push", str(world.bundle))  # the hub knows the version's validation figures from its manifest
    d = world.device("pi-1")
    rng = np.random.default_rng(21)

    def verdict() -> dict[str, Any] | None:
        row = next((r for r in world.fleet() if r["device"] == "pi-1"), None)
        return row if row is not None and row["drift"] is not None else None

    # inputs like validation's: judged, not flagged
    for _ in range(40):
        d.traffic(ok=1, x=rng.normal(size=(4, FEATURES)).astype(np.float32))
    row = wait_until(verdict, "a drift verdict on the normal traffic", timeout=LONG)
    assert row["drift"] is False and row["drift_reasons"] == [], row
    # the same model fed inputs shifted far from what it was validated on: its class mix changes
    shift = np.random.default_rng(1).normal(size=(FEATURES, 10)).astype(np.float32)[:, 3] * 8
    for _ in range(60):
        d.traffic(ok=1, x=(rng.normal(size=(4, FEATURES)) + shift).astype(np.float32))
    flagged = wait_until(lambda: (v := verdict()) is not None and v["drift"] and v, "a drift flag", timeout=LONG)
    (reason,) = flagged["drift_reasons"]
    assert reason.startswith("class distribution moved: distance ") and "class 3 is" in reason, reason
    human = world.cli("fleet").stderr
    assert "DRIFT" in human and "class distribution moved" in human


def test_two_ingestion_processes_on_postgresql_store_every_message_once(tmp_path: Path, pg_url: str) -> None:
    """`edgekit hub serve --db postgresql://... --ingest-group g` and an `edgekit hub ingest --group g`
    process share one MQTT 5 shared subscription: real devices' traffic arrives exactly once."""
    world = World(tmp_path)
    worker: subprocess.Popen[str] | None = None
    try:
        trust = ("--trust-key", str(world.keys.public_path))
        world.hub = HubProcess(world.folder / "hub", "--broker", world.broker.url, *trust, "--db", pg_url,
                               "--ingest-group", "g", port=world.hub_port).start()  # fmt: skip
        worker = subprocess.Popen(
            [EDGEKIT, "hub", "ingest", "--broker", world.broker.url, "--db", pg_url, "--group", "g"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert worker.stderr is not None
        line = worker.stderr.readline()
        assert "storing telemetry from $share/g/edgekit/devices/+/telemetry" in line, line
        devices = [world.device(f"pi-{i}") for i in range(3)]
        for i, d in enumerate(devices):
            d.traffic(ok=20 + 5 * i, bad=i)
        engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:

            def totals() -> dict[str, tuple[int, int, int]]:
                with engine.connect() as c:
                    rows = c.execute(sa.text(
                        "SELECT device_id, COUNT(*), SUM(requests), SUM(errors) FROM telemetry GROUP BY device_id"
                    )).all()  # fmt: skip
                return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

            want = {d.id: (d.sent_ok + d.sent_bad, d.sent_bad) for d in devices}
            wait_until(lambda: {k: v[1:] for k, v in totals().items()} == want, f"the totals {want}", timeout=LONG)
            with engine.connect() as c:
                seqs = c.execute(sa.text("SELECT device_id, seq FROM telemetry ORDER BY device_id, seq")).all()
        finally:
            engine.dispose()
        for d in devices:  # every sequence number from 1 on, once: nothing lost, nothing twice
            mine = [int(s) for dev, s in seqs if dev == d.id]
            assert mine == list(range(1, len(mine) + 1)), (d.id, mine)
        hub_stats = httpx.get(
            f"{world.hub.url}/v1/telemetry/stats", headers={"Authorization": f"Bearer {world.hub.token}"}
        ).json()
        assert hub_stats["subscription"] == "$share/g/edgekit/devices/+/telemetry"
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=WAIT)
        assert worker.returncode == 0, err
        stored = int(re.search(r"stored (\d+)", err).group(1))  # type: ignore[union-attr]
        # the broker shared the messages out: each process stored some, together every one once
        assert stored > 0 and hub_stats["stored"] > 0
        assert stored + hub_stats["stored"] >= len(seqs)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(WAIT)
        world.close()
