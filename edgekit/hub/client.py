"""The hub's HTTP client (httpx), as the CLI uses it: every failure becomes the edgekit error the
hub raised (same class, so the same exit code), or a one-line reason the hub could not be asked."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from edgekit.hub.errors import UnauthorizedError, error_from_kind
from edgekit.hub.openapi import BUNDLE_NAME_HEADER
from edgekit_runtime.errors import EdgekitError, NotFoundError, UnavailableError

__all__ = ["DEFAULT_HUB", "HubClient"]

DEFAULT_HUB = "http://127.0.0.1:8600"
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


class HubClient:
    """Keyword arguments: ``url`` of the hub, its API ``token`` (None: send none), ``timeout`` in
    seconds for connecting and for each read (a push of a big bundle is checked whole before the
    hub answers, hence the generous default)."""

    def __init__(self, *, url: str = DEFAULT_HUB, token: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            reason = _ERRNO.sub("", str(e)) or type(e).__name__
            msg = f"cannot reach the hub at {self.url}: {reason}; start it with `edgekit hub serve` or set EDGEKIT_HUB"
            raise UnavailableError(msg) from None
        if reply.status_code == 401:
            given = "needs an API token" if not self.token else "refused the API token"
            msg = f"the hub at {self.url} {given}: pass --token or set EDGEKIT_HUB_TOKEN (the token is in DATA/token)"
            raise UnauthorizedError(msg)
        try:
            body = reply.json()
        except ValueError:
            body = None
        if reply.is_success and isinstance(body, dict):
            return body
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            raise error_from_kind(str(body.get("kind", "")), body["error"], reply.status_code)
        msg = f"{self.url}{path} answered HTTP {reply.status_code} without an edgekit reply: is this an edgekit hub?"
        raise EdgekitError(msg)

    def push(self, bundle: Path) -> dict[str, Any]:
        """Upload one bundle file; the hub's ``{"bundle": ..., "created": ...}``."""
        try:
            f = bundle.open("rb")
        except FileNotFoundError:
            msg = f"{bundle}: no such bundle file"
            raise NotFoundError(msg) from None
        with f:
            headers = {"Content-Type": "application/octet-stream", BUNDLE_NAME_HEADER: bundle.name}
            result: dict[str, Any] = self._request("POST", "/v1/bundles", content=f, headers=headers)
        return result

    def models(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is not None:
            return [self._request("GET", f"/v1/models/{_segment(name)}")]
        return list(self._request("GET", "/v1/models")["models"])

    def delete(self, name: str, version: int) -> list[dict[str, Any]]:
        return list(self._request("DELETE", f"/v1/models/{_segment(name)}/versions/{version}")["deleted"])

    def devices(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/devices")["devices"])

    def label(self, device: str, changes: dict[str, str | None]) -> dict[str, Any]:
        path = f"/v1/devices/{_segment(device)}/labels"
        result: dict[str, Any] = self._request("PATCH", path, json={"labels": changes})
        return result

    def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout; its status document."""
        result: dict[str, Any] = self._request("POST", "/v1/rollouts", json=body)
        return result

    def rollback(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/v1/rollbacks", json=body)
        return result

    def rollouts(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/rollouts")["rollouts"])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/rollouts/{_segment(rollout_id)}")
        return result

    def control(self, rollout_id: str, action: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/v1/rollouts/{_segment(rollout_id)}/{action}")
        return result

    def fleet(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/fleet")["devices"])

    def fleet_device(self, device: str, *, limit: int = 120) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/fleet/{_segment(device)}", params={"limit": limit})
        return result

    def telemetry(
        self, *, device: str | None = None, since: float | None = None, page: int = 10_000
    ) -> Iterator[dict[str, Any]]:
        """Every model telemetry row, page by page, in (device, seq) order."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page}
            if device is not None:
                params["device"] = device
            if since is not None:
                params["since"] = since
            if after is not None:
                params["after"] = after
            body = self._request("GET", "/v1/telemetry", params=params)
            yield from body["rows"]
            after = body.get("next")
            if not after:
                return


def _segment(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
