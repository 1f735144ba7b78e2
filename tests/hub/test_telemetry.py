"""The hub's telemetry ingestion (edgekit/hub/telemetry.py) against a real Mosquitto and a real store
(a SQLite file, and the real PostgreSQL when it is reachable): a plain paho client publishes what a
device agent publishes and listens to the acks.

Covered: every message acknowledged only once its row is committed; a duplicate stored once,
counted and acknowledged again; malformed payloads counted by reason and never a crash, with the
valid message after them stored; two workers of one shared subscription on one PostgreSQL database
storing every (device, seq) exactly once between them; the read side (export_rows, fleet_rows,
device_history) giving back the exact figures published.

No test asserts a duration: every wait is bounded (tests/mqtt.py's wait_until) and names what it waits for.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgekit.hub import schema
from edgekit.hub.store import Store, database_url
from edgekit.hub.telemetry import Ingestor, compact, device_history, export_rows, fleet_rows
from edgekit_runtime.agent.link import BrokerAddress
from edgekit_runtime.agent.protocol import SCHEMA, Ack, Telemetry, decode
from edgekit_runtime.livestats import Window
from tests.mqtt import WAIT, Mosquitto, wait_until

#: The default log types plus subscriptions, so a test can see when the broker has an Ingestor's.
LOG_CONF = (
    "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n"
    "max_queued_messages 100000\n"  # the test publishes thousands at once and resends nothing
)


def model_fig(requests: int, errors: int, *, model: str = "digits", version: int = 1, end: float = 1010.0) -> dict:
    """What livestats.Window.take() reports for ``requests`` requests of which ``errors`` failed (400)."""
    w = Window(model, version, clock=lambda: end - 10.0)
    for i in range(requests):
        w.request(400 if i < errors else None)
        w.latency(0.001 * (i + 1))
    w.batch(requests)
    return w.take(now=end)


def model_msg(seq: int, requests: int = 10, errors: int = 1, **kw: Any) -> bytes:
    """A model telemetry payload, as the agent's sender writes it."""
    body = {"schema": SCHEMA, "seq": seq, "kind": "model", "model": model_fig(requests, errors, **kw)}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def device_msg(seq: int) -> bytes:
    device = {"interval_start": 1000.0, "interval_end": 1010.0, "cpu_percent": 12.5, "agent_state": "idle",
              "queue": {"messages": 3, "bytes": 900, "dropped": 0}}  # fmt: skip
    return json.dumps({"schema": SCHEMA, "seq": seq, "kind": "device", "device": device}).encode()


def topic(device: str) -> str:
    return f"edgekit/devices/{device}/telemetry"


class Client:
    """A plain paho client: publishes telemetry as devices do, and records every Ack on
    ``edgekit/devices/+/acks`` (``on_ack`` is called with each, in paho's thread)."""

    def __init__(self, broker: Mosquitto, on_ack: Callable[[str, list[int]], None] | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.acks: list[tuple[str, list[int]]] = []
        self.on_ack = on_ack
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"test-{secrets.token_hex(4)}",
        )
        self._c.max_inflight_messages_set(100)
        self._c.on_message = self._message
        self._c.on_subscribe = lambda *_: subscribed.set()
        self._c.connect("127.0.0.1", broker.port)
        self._c.loop_start()
        self._c.subscribe("edgekit/devices/+/acks", qos=1)
        assert subscribed.wait(WAIT), "no SUBACK for the acks"

    def _message(self, client: object, userdata: object, msg: Any) -> None:
        device = msg.topic.split("/")[2]
        ack = decode(Ack, bytes(msg.payload), msg.topic)
        if self.on_ack is not None:
            self.on_ack(device, ack.seqs)
        with self._lock:
            self.acks.append((device, ack.seqs))

    def acked(self, device: str) -> Counter[int]:
        """How many times each of ``device``'s sequence numbers was acknowledged."""
        with self._lock:
            return Counter(s for d, seqs in self.acks if d == device for s in seqs)

    def publish(self, topic: str, payload: bytes) -> Any:
        return self._c.publish(topic, payload, qos=1)

    def publish_all(self, items: list[tuple[str, bytes]]) -> None:
        infos = [self.publish(t, p) for t, p in items]
        for info in infos:
            info.wait_for_publish(WAIT)

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path, extra_conf=LOG_CONF).start()
    yield m
    m.stop()


IngestorFactory = Callable[..., Ingestor]


@pytest.fixture
def ingestor(broker: Mosquitto) -> Iterator[IngestorFactory]:
    """``ingestor(store, group=None)``: a started Ingestor whose subscription the broker holds."""
    started: list[Ingestor] = []

    def start(store: Store, *, group: str | None = None) -> Ingestor:
        client_id = f"ingest-{secrets.token_hex(4)}"
        ing = Ingestor(
            store,
            BrokerAddress("127.0.0.1", broker.port),
            group=group,
            client_id=client_id,
            link_options={"backoff_base": 0.05, "backoff_max": 0.5},
        )
        started.append(ing)
        ing.start()
        assert ing.wait_connected(WAIT)
        line = re.compile(rf"^\d+: {re.escape(client_id)} 1 {re.escape(ing.subscription)}$", re.MULTILINE)
        wait_until(lambda: line.search(broker.log.read_text()), f"the broker to hold {client_id}'s subscription")
        return ing

    yield start
    for ing in started:
        ing.stop()


@pytest.fixture
def client(broker: Mosquitto) -> Iterator[Client]:
    c = Client(broker)
    yield c
    c.close()


def rows_of(store: Store, device: str | None = None) -> list[Any]:
    t = schema.telemetry
    q = sa.select(t).order_by(t.c.device_id, t.c.seq)
    if device is not None:
        q = q.where(t.c.device_id == device)
    with store.read() as tx:
        return list(tx.conn.execute(q))


def stored_seqs(store: Store, device: str, seqs: list[int]) -> set[int]:
    t = schema.telemetry
    with store.read() as tx:
        return set(tx.conn.execute(sa.select(t.c.seq).where(t.c.device_id == device, t.c.seq.in_(seqs))).scalars())


# -- one worker -----------------------------------------------------------------------------------


def test_every_message_is_acked_once_it_is_stored(store: Store, ingestor: IngestorFactory, broker: Mosquitto) -> None:
    ing = ingestor(store)
    unstored_at_ack: list[tuple[str, list[int]]] = []

    def check(device: str, seqs: list[int]) -> None:  # in paho's thread, as the ack arrives
        missing = sorted(set(seqs) - stored_seqs(store, device, seqs))
        if missing:
            unstored_at_ack.append((device, missing))

    c = Client(broker, on_ack=check)
    try:
        rng = random.Random(5)
        figures = {seq: (rng.randint(1, 40), 0) for seq in range(1, 51)}
        figures = {seq: (r, rng.randint(0, r)) for seq, (r, _) in figures.items()}
        items = [(topic("pi-1"), model_msg(seq, r, e, end=1010.0 + 10 * seq)) for seq, (r, e) in figures.items()]
        items.append((topic("pi-1"), device_msg(51)))
        c.publish_all(items)
        wait_until(lambda: set(c.acked("pi-1")) == set(range(1, 52)), "acks of seq 1..51")
    finally:
        c.close()
    assert unstored_at_ack == []  # no ack named a row that was not committed yet
    assert c.acked("pi-1") == Counter(range(1, 52))  # each acknowledged once
    assert ing.stats.stored == 51
    assert ing.stats.received == 51
    assert ing.stats.duplicates == 0
    assert dict(ing.stats.bad) == {}
    assert ing.stats.failures == 0

    rows = rows_of(store, "pi-1")
    assert [r.seq for r in rows] == list(range(1, 52))
    assert [r.kind for r in rows] == ["model"] * 50 + ["device"]
    for r in rows[:50]:
        assert (r.model, r.version) == ("digits", 1)
        assert (r.requests, r.errors) == figures[r.seq]
        assert r.body["model"]["requests"] == figures[r.seq][0]  # the whole message is kept
    assert rows[50].body["device"]["cpu_percent"] == 12.5

    with store.read() as tx:
        exported = export_rows(tx.conn)
        latest = {r.model: r for r in tx.conn.execute(sa.select(schema.telemetry_latest))}
        history = device_history(tx.conn, "pi-1")
    assert [r["seq"] for r in exported] == list(range(1, 51))  # model rows only, in (device, seq) order
    assert sum(r["requests"] for r in exported) == sum(r for r, _ in figures.values())
    assert sum(r["errors"] for r in exported) == sum(e for _, e in figures.values())
    assert all(r["rows"] == figures[r["seq"]][0] for r in exported)
    assert all(json.loads(r["errors_by_kind"]) == ({"invalid_input": r["errors"]} if r["errors"] else {})
               for r in exported)  # fmt: skip
    assert set(latest) == {"digits", ""}
    assert latest["digits"].seq == 50
    assert latest[""].seq == 51
    assert [m["seq"] for m in history["models"]["digits"]] == list(range(1, 51))  # oldest first
    assert history["latest_device"]["seq"] == 51
    assert history["latest_device"]["agent_state"] == "idle"


def test_a_duplicate_is_stored_once_counted_and_acked_again(
    store: Store, ingestor: IngestorFactory, client: Client
) -> None:
    ing = ingestor(store)
    client.publish_all([(topic("pi-1"), model_msg(seq, requests=seq)) for seq in range(1, 6)])
    wait_until(lambda: set(client.acked("pi-1")) == set(range(1, 6)), "acks of seq 1..5")
    # the device did not get the acks of 3 and 5 and sends them again (another copy: other figures)
    client.publish_all([(topic("pi-1"), model_msg(3, requests=999)), (topic("pi-1"), model_msg(5, requests=999))])
    wait_until(lambda: client.acked("pi-1")[3] == 2 and client.acked("pi-1")[5] == 2, "the duplicates' acks")
    assert client.acked("pi-1") == Counter({1: 1, 2: 1, 3: 2, 4: 1, 5: 2})
    assert ing.stats.stored == 5
    assert ing.stats.duplicates == 2
    assert ing.stats.received == 7
    rows = rows_of(store, "pi-1")
    assert [(r.seq, r.requests) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]  # the first copy stays
    with store.read() as tx:
        assert sum(r["requests"] for r in export_rows(tx.conn)) == 15


def test_the_same_seq_twice_in_one_batch_is_one_row_and_one_ack(
    store: Store, ingestor: IngestorFactory, client: Client
) -> None:
    ing = ingestor(store)
    t = topic("pi-1")
    acked = ing.ingest([(t, model_msg(7, 3), 1.0), (t, model_msg(7, 4), 1.0), (t, model_msg(8, 5), 1.0)])
    assert acked == {"pi-1": [7, 8]}
    assert ing.stats.stored == 2
    assert ing.stats.duplicates == 1
    assert [r.seq for r in rows_of(store, "pi-1")] == [7, 8]
    wait_until(lambda: client.acked("pi-1") == Counter({7: 1, 8: 1}), "one ack naming 7 and 8")


def test_an_older_message_arriving_late_does_not_replace_the_newest(
    store: Store, ingestor: IngestorFactory, client: Client
) -> None:
    ing = ingestor(store)
    client.publish_all([(topic("pi-1"), model_msg(10, requests=10, errors=0, end=2000.0))])
    wait_until(lambda: client.acked("pi-1")[10], "the ack of seq 10")
    client.publish_all([(topic("pi-1"), model_msg(4, requests=4, errors=2, end=1000.0))])  # sent again, late
    wait_until(lambda: client.acked("pi-1")[4], "the ack of seq 4")
    assert ing.stats.stored == 2
    with store.begin() as tx:
        tx.ensure_device("pi-1", 1.0)
    with store.read() as tx:
        latest = list(tx.conn.execute(sa.select(schema.telemetry_latest)))
        fleet = fleet_rows(tx.conn)
    assert [(r.model, r.seq, r.requests) for r in latest] == [("digits", 10, 10)]
    (row,) = fleet
    assert row["device"] == "pi-1"
    assert row["model"] == "digits"
    assert row["req_per_s"] == 1.0  # 10 requests over the 10-second interval of seq 10
    assert row["error_pct"] == 0.0


def raw(**fields: Any) -> bytes:
    """A model message with ``fields`` replaced."""
    return json.dumps({"schema": SCHEMA, "seq": 1, "kind": "model", "model": model_fig(1, 0), **fields}).encode()


BAD: list[tuple[str, str, bytes]] = [
    ("not_json", topic("pi-1"), b"this is not JSON {"),
    ("not_json", topic("pi-1"), b"\xff\xfe\x00 binary"),
    ("not_json", topic("pi-1"), b"[1, 2, 3]"),
    ("not_json", topic("pi-1"), b'"just a string"'),
    ("invalid", topic("pi-1"), b'{"schema": 1, "seq": "one", "kind": "model"}'),
    ("invalid", topic("pi-1"), b'{"schema": 1, "seq": 2, "kind": "model"}'),  # no model field
    ("invalid", topic("pi-1"), b'{"schema": 1, "seq": 3, "kind": "gossip", "model": {}}'),
    ("invalid", topic("pi-1"), raw(seq=0)),
    ("invalid", topic("pi-1"), raw(seq=4, kind="device")),  # a model body under kind "device"
    ("newer_schema", topic("pi-1"), raw(schema=99, seq=5)),
    ("too_big", topic("pi-1"), b'{"schema": 1, "pad": "' + b"x" * (300 << 10) + b'"}'),
    ("invalid", topic("bad id!"), model_msg(6)),
    ("invalid", topic("-starts-with-a-dash"), model_msg(7)),
    ("invalid", topic("x" * 65), model_msg(8)),
    ("invalid", topic(""), model_msg(9)),
]  # fmt: skip


def test_malformed_payloads_are_counted_by_reason_and_the_next_valid_one_is_stored(
    store: Store, ingestor: IngestorFactory, client: Client
) -> None:
    ing = ingestor(store)
    client.publish_all([(t, p) for _, t, p in BAD] + [(topic("pi-1"), model_msg(100, requests=7, errors=2))])
    wait_until(lambda: client.acked("pi-1")[100], "the ack of the valid message after the bad ones")
    assert ing.stats.received == len(BAD) + 1
    assert dict(ing.stats.bad) == dict(Counter(reason for reason, _, _ in BAD))
    assert ing.stats.stored == 1
    assert ing.stats.failures == 0  # no bad payload reached the database
    assert ing._thread is not None and ing._thread.is_alive()
    rows = rows_of(store)
    assert [(r.device_id, r.seq, r.requests, r.errors) for r in rows] == [("pi-1", 100, 7, 2)]
    assert [(d, seqs) for d, seqs in client.acks] == [("pi-1", [100])]  # nothing bad was acknowledged


def test_a_bad_message_in_a_batch_does_not_cost_the_others(store: Store, ingestor: IngestorFactory) -> None:
    ing = ingestor(store)
    items = [(t, p, 1.0) for _, t, p in BAD]
    items.insert(3, (topic("pi-1"), model_msg(1), 1.0))
    items.append((topic("pi-2"), model_msg(1), 1.0))
    acked = ing.ingest(items)  # one batch: the valid ones are stored and acknowledged
    assert acked == {"pi-1": [1], "pi-2": [1]}
    assert ing.stats.stored == 2
    assert sum(ing.stats.bad.values()) == len(BAD)
    assert [(r.device_id, r.seq) for r in rows_of(store)] == [("pi-1", 1), ("pi-2", 1)]


#: Payloads a database cannot hold (SQLite turns NaN into NULL and refuses integers past 64 bits;
#: PostgreSQL's json refuses NaN, its integer columns are 32 / 64 bits): the protocol refuses NaN
#: and Infinity anywhere and integers past the columns, and a row the database still refuses is
#: stored alone, apart from its batch.
UNSTORABLE = {
    "nan-in-an-ignored-field": b'{"schema":1,"seq":1,"kind":"model","extra":NaN,"model":'
    + json.dumps(model_fig(1, 0)).encode()
    + b"}",
    "nan-interval-start": raw(model={**model_fig(1, 0), "interval_start": float("nan")}),
    "seq-past-64-bits": raw(seq=2**70),
    "version-past-32-bits": raw(model={**model_fig(1, 0), "version": 2**40}),
    "requests-past-32-bits": raw(model={**model_fig(1, 0), "requests": 2**40}),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
def test_a_payload_the_database_cannot_hold_does_not_cost_the_rest_of_its_batch(
    store: Store, ingestor: IngestorFactory, case: str
) -> None:
    ing = ingestor(store)
    acked = ing.ingest([(topic("pi-9"), UNSTORABLE[case], 1.0), (topic("pi-1"), model_msg(1), 1.0)])
    assert acked.get("pi-1") == [1]
    assert [(r.device_id, r.seq) for r in rows_of(store, "pi-1")] == [("pi-1", 1)]
    assert ing.stats.received == 2
    assert ing.stats.stored + sum(ing.stats.bad.values()) == 2  # stored, or counted as bad: nothing in between


def test_a_row_the_database_refuses_is_stored_alone_counted_and_acknowledged(
    store: Store, ingestor: IngestorFactory
) -> None:
    """A refusal the protocol cannot foresee (here a trigger of the test's): the batch is stored row
    by row, the refused row is counted as unstorable and acknowledged so its device stops resending."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("the refusing trigger is written for SQLite")
    with store.begin() as tx:
        tx.conn.execute(sa.text(
            "CREATE TRIGGER refuse BEFORE INSERT ON telemetry WHEN NEW.device_id = 'pi-9' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ))  # fmt: skip
    ing = ingestor(store)
    acked = ing.ingest([(topic("pi-9"), model_msg(1), 1.0), (topic("pi-1"), model_msg(1), 1.0),
                        (topic("pi-1"), model_msg(2), 1.0)])  # fmt: skip
    assert acked == {"pi-1": [1, 2], "pi-9": [1]}
    assert [(r.device_id, r.seq) for r in rows_of(store)] == [("pi-1", 1), ("pi-1", 2)]
    assert ing.stats.stored == 2 and ing.stats.bad == {"unstorable": 1} and ing.stats.duplicates == 0


def test_a_batch_payload_is_stored_message_by_message_and_a_bad_item_costs_only_itself(
    store: Store, ingestor: IngestorFactory
) -> None:
    ing = ingestor(store)
    items = [model_msg(1), device_msg(2), b'{"seq": 3, "kind": "model"}', model_msg(4)]
    batch = b'{"schema":1,"batch":[' + b",".join(items) + b"]}"
    acked = ing.ingest([(topic("pi-1"), batch, 1.0)])
    assert acked == {"pi-1": [1, 2, 4]}
    assert [(r.device_id, r.seq, r.kind) for r in rows_of(store)] == [
        ("pi-1", 1, "model"), ("pi-1", 2, "device"), ("pi-1", 4, "model")]  # fmt: skip
    assert (ing.stats.publishes, ing.stats.received, ing.stats.stored) == (1, 4, 3)
    assert ing.stats.bad == {"invalid": 1}
    for bad in (b'{"schema":1,"batch":[]}', b'{"schema":1,"batch":{"seq":1}}'):
        assert ing.ingest([(topic("pi-1"), bad, 1.0)]) == {}
    assert ing.stats.bad == {"invalid": 3}


# -- several workers ------------------------------------------------------------------------------


def test_two_workers_of_a_shared_subscription_store_each_message_exactly_once(
    pg_url: str, tmp_path: Path, ingestor: IngestorFactory, client: Client
) -> None:
    url = database_url(pg_url, tmp_path)
    stores = [Store.open(url), Store.open(url)]  # two worker processes: an engine each, one database
    workers: list[Ingestor] = []
    try:
        workers.extend(ingestor(s, group="g") for s in stores)
        rng = random.Random(11)
        devices = [f"pi-{i:02d}" for i in range(20)]
        published: dict[tuple[str, int], tuple[int, int]] = {}
        items = []
        for seq in range(1, 101):
            for d in devices:
                r = rng.randint(0, 50)
                published[d, seq] = (r, rng.randint(0, r))
                items.append((topic(d), model_msg(seq, *published[d, seq], end=1010.0 + 10 * seq)))
        assert len(items) == 2000
        client.publish_all(items)
        wait_until(lambda: sum(w.stats.stored for w in workers) >= 2000, "2,000 messages stored", timeout=120)
        wait_until(lambda: all(set(client.acked(d)) == set(range(1, 101)) for d in devices), "every ack")

        assert [w.stats.stored > 0 for w in workers] == [True, True]  # the broker shared the messages out
        assert sum(w.stats.stored for w in workers) == 2000
        assert sum(w.stats.received for w in workers) == 2000  # each message went to one worker only
        assert sum(w.stats.duplicates for w in workers) == 0
        assert all(w.stats.failures == 0 and not w.stats.bad for w in workers)

        rows = rows_of(stores[0])
        assert len(rows) == 2000
        assert {(r.device_id, r.seq): (r.requests, r.errors) for r in rows} == published
        with stores[1].begin() as tx:
            for d in devices:
                tx.ensure_device(d, 1.0)
        with stores[1].read() as tx:
            exported = export_rows(tx.conn)
            fleet = fleet_rows(tx.conn)
        assert len(exported) == 2000
        assert sum(r["requests"] for r in exported) == sum(r for r, _ in published.values())
        assert sum(r["errors"] for r in exported) == sum(e for _, e in published.values())
        assert [r["device"] for r in fleet] == devices
        for row in fleet:  # the newest interval of each device: seq 100
            r, e = published[row["device"], 100]
            assert row["model"] == "digits"
            assert row["req_per_s"] == round(r / 10.0, 3)
            assert row["error_pct"] == (round(100.0 * e / r, 3) if r else 0.0)
            assert row["interval_end"] == 1010.0 + 10 * 100
    finally:
        for w in workers:  # before their stores close (the fixture's second stop does nothing)
            w.stop()
        for s in stores:
            s.close()


def test_telemetry_payloads_from_a_real_window_pass_the_protocol() -> None:
    """What the runtime's window reports is what the hub accepts (the contract between the two)."""
    msg = decode(Telemetry, model_msg(3, requests=5, errors=2))
    assert msg.model is not None
    assert (msg.model.requests, msg.model.errors, msg.model.rejected) == (5, 2, 0)
    assert msg.model.errors_by_kind == {"invalid_input": 2}
    assert msg.model.p50_ms == pytest.approx(3.0)


# -- retention ------------------------------------------------------------------------------------


def test_raw_rows_past_the_retention_fold_into_minutes_and_their_copies_stay_duplicates(
    store: Store, ingestor: IngestorFactory
) -> None:
    ing = ingestor(store)
    now = 1_000_000.0
    day = 86400.0
    old_end = now - 2 * day  # past a day's retention, in one minute: [old_end - 30 s, old_end + 30 s)
    minute = float(int(old_end // 60) * 60)
    items = [
        (topic("pi-1"), model_msg(1, 10, 1, end=minute + 10), now - day),
        (topic("pi-1"), model_msg(2, 20, 0, end=minute + 20), now - day),
        (topic("pi-1"), model_msg(3, 5, 5, end=minute + 70), now - day),  # the next minute
        (topic("pi-1"), device_msg(4), now - day),
        (topic("pi-1"), model_msg(5, 7, 0, end=now - 60), now - 60),  # recent: kept raw
        (topic("pi-2"), model_msg(1, 3, 0, end=minute + 5), now - 300),  # old, but received 5 min ago
    ]
    ing.ingest(items)
    with store.begin() as tx:
        folded = compact(tx.conn, now=now, retention_s=day)
    assert folded == 4  # pi-1's seq 1-4; pi-2's row is not settled yet (a copy may still be in flight)
    with store.read() as tx:
        mins = {(r.device_id, r.minute): r for r in tx.conn.execute(sa.select(schema.telemetry_minutes))}
        marks = dict(
            tx.conn.execute(sa.select(schema.telemetry_compacted.c.device_id, schema.telemetry_compacted.c.seq)).all()
        )
    assert set(mins) == {("pi-1", minute), ("pi-1", minute + 60)}
    first = mins["pi-1", minute]
    assert (first.intervals, first.requests, first.errors, first.rows) == (2, 30, 1, 30)
    assert first.p95_ms == max(
        json.loads(model_msg(s, r, e))["model"]["p95_ms"] for s, r, e in ((1, 10, 1), (2, 20, 0))
    )
    assert (mins["pi-1", minute + 60].requests, mins["pi-1", minute + 60].errors) == (5, 5)
    assert marks == {"pi-1": 4}
    assert [(r.device_id, r.seq) for r in rows_of(store)] == [("pi-1", 5), ("pi-2", 1)]

    # a copy of a folded message (a device that never got its ack) is a duplicate, acknowledged again
    before = ing.stats.duplicates
    acked = ing.ingest([(topic("pi-1"), model_msg(2, 20, 0, end=minute + 20), now)])
    assert acked == {"pi-1": [2]} and ing.stats.duplicates == before + 1
    assert [(r.device_id, r.seq) for r in rows_of(store)] == [("pi-1", 5), ("pi-2", 1)]
    with store.read() as tx:
        again = tx.conn.execute(sa.select(schema.telemetry_minutes.c.requests).where(
            schema.telemetry_minutes.c.minute == minute)).scalar()  # fmt: skip
    assert again == 30  # not counted twice
