"""The hub's tables as they are now (SQLAlchemy Core), for SQLite and PostgreSQL alike.

A fresh database is created from these definitions directly; an older one is brought here by the
ordered steps in ``migrations.py``. Times are unix seconds (floats), JSON columns hold dicts.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["bundles", "device_models", "devices", "metadata", "rollouts", "schema_version"]

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
    sa.Index("ix_device_models_model_active", "model", "active_version"),
)

#: Rollouts, as little as the registry needs (a delete is refused while one targets the version);
#: the rollout slice extends it (a migration) with the engine's per-device state.
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
    sa.Index("ix_rollouts_model_version", "model", "version"),
)
