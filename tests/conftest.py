"""Shared fixtures: small real models, built once per session."""

from __future__ import annotations
