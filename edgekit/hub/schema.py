"""The hub's tables as they are now (SQLAlchemy Core), for SQLite and PostgreSQL alike.

A fresh database is created from these definitions directly; an older one is brought here by the
ordered steps in ``migrations.py``. Times are unix seconds (floats), JSON columns hold dicts.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "bundles",
    "desired_states",
    "device_models",
    "devices",
    "metadata",
    "rollout_devices",
    "rollouts",
    "schema_version",
    "telemetry",
    "telemetry_compacted",
    "telemetry_latest",
    "telemetry_minutes",
]

metadata = sa.MetaData()

#: One row per migration applied (the first row is the version a fresh database was created at).
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

#: One pushed bundle file: a (name, version, profile) is unique; the file is artifacts/SHA256.ekb.
bundles = sa.Table(
    "bundles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("profile", sa.String(128), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("quantization", sa.String(64), nullable=False),
    sa.Column("model_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("signer", sa.String(32), nullable=False),
    sa.Column("uploaded_at", sa.Float, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.UniqueConstraint("name", "version", "profile", name="uq_bundles_name_version_profile"),
)

#: Every device that made contact. ``labels`` are the hub's (set at first contact, then by
#: `edgekit devices label`); ``online``/``last_seen`` follow its presence.
devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("profile", sa.String(128), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=True),
    sa.Column("registered_at", sa.Float, nullable=False),
)

#: A device's reported state per model (the agent's Reported.models entry): the active version is a
#: column so that "does a device run NAME vN" is one indexed query; the rest of the report is JSON.
device_models = sa.Table(
    "device_models",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("active_version", sa.Integer, nullable=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # the version it ran before the active one (schema v2): what `edgekit rollback` goes back to
    sa.Column("previous_version", sa.Integer, nullable=True),
    sa.Index("ix_device_models_model_active", "model", "active_version"),
)

#: Rollouts (rollout.RolloutSpec as ``spec``; the engine's state as ``state``, ``reason``, ``wave``;
#: schema v2 added the last two and ``rollout_devices``).
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("wave", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_rollouts_model_version", "model", "version"),
)

#: One device's run in a rollout (rollout.DeviceRun), so a rollout survives a hub restart.
rollout_devices = sa.Table(
    "rollout_devices",
    metadata,
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("profile", sa.String(128), nullable=False),
    sa.Column("previous", sa.Integer, nullable=True),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("started", sa.Boolean, nullable=False),
    sa.Column("switched", sa.Boolean, nullable=False),
    sa.Column("reverted", sa.Boolean, nullable=False),
)

#: What the hub wants each device to run (protocol.Desired): the source of truth for the retained
#: ``desired`` messages, republished from here after a broker or hub restart.
desired_states = sa.Table(
    "desired_states",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("models", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


#: Every telemetry message stored (protocol.Telemetry), once: (device, seq) is the key, so a message
#: the device sends again (no ack reached it) or two ingestion workers both see is stored once. The
#: columns are what the fleet views and exports filter and sum; ``body`` is the whole message.
#: ``model`` is "" for a device message (kind "device"). Schema v3.
telemetry = sa.Table(
    "telemetry",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("interval_start", sa.Float, nullable=False),
    sa.Column("interval_end", sa.Float, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("p50_ms", sa.Float, nullable=True),
    sa.Column("p95_ms", sa.Float, nullable=True),
    sa.Column("p99_ms", sa.Float, nullable=True),
    sa.Column("rows_per_s", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Index("ix_telemetry_interval_end", "interval_end"),
    sa.Index("ix_telemetry_device_end", "device_id", "interval_end"),
)

#: The newest telemetry per device and model ("" = the device's own message): what `edgekit fleet`
#: and the dashboard's overview read, one row per device and model instead of a scan of history.
telemetry_latest = sa.Table(
    "telemetry_latest",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("interval_start", sa.Float, nullable=False),
    sa.Column("interval_end", sa.Float, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("p95_ms", sa.Float, nullable=True),
    sa.Column("rows_per_s", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
    # the drift check's last verdict on this model version (drift.py): {"drift", "reasons", "figures"}
    sa.Column("drift", sa.JSON(none_as_null=True), nullable=True),
)

#: Raw telemetry older than the retention, summed per device, model, version and minute (requests,
#: errors, rejected, rows; the worst p50/p95/p99 of the minute's intervals). Schema v3.
telemetry_minutes = sa.Table(
    "telemetry_minutes",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("minute", sa.Float, primary_key=True),
    sa.Column("intervals", sa.Integer, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("p50_ms", sa.Float, nullable=True),
    sa.Column("p95_ms", sa.Float, nullable=True),
    sa.Column("p99_ms", sa.Float, nullable=True),
)

#: Per device, the highest sequence number whose raw row was folded into telemetry_minutes and
#: deleted: a copy of such a message arriving again is a duplicate, not a new row. Schema v3.
telemetry_compacted = sa.Table(
    "telemetry_compacted",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)
