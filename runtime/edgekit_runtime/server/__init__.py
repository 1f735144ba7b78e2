"""The HTTP server: TF Serving REST and Open Inference Protocol v2 over one ASGI app."""

from __future__ import annotations

from edgekit_runtime.server.app import App, create_app
from edgekit_runtime.server.run import bind, serve

__all__ = ["App", "bind", "create_app", "serve"]
