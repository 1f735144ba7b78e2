"""The hub's HTTP API in-process (httpx's ASGITransport, no socket): the token, every route, the
error shape, the upload cap, and the OpenAPI document against the app's routes.

Not Starlette's TestClient: from Starlette 1.x it warns unless the `httpx2` fork is installed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from edgekit.hub.api import create_app
from edgekit.hub.devices import Devices
from edgekit.hub.openapi import BUNDLE_NAME_HEADER, OPERATIONS
from edgekit.hub.registry import Registry
from tests.hub.conftest import BundleFactory, Keys

TOKEN = "test-token-0123456789abcdef"
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The HTTP layer runs on SQLite only; the store's own tests cover PostgreSQL."""
    from edgekit.hub.store import database_url

    return database_url(None, tmp_path)


class ApiClient:
    """A synchronous face on httpx.AsyncClient over ASGITransport: one event loop per request."""

    def __init__(self, app: Starlette, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = headers

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hub", headers=self.headers) as c:
                return await c.request(method, url, **kw)

        return asyncio.run(go())

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)

    def patch(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PATCH", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)


def make_client(registry: Registry, *, max_upload_bytes: int = 1 << 30, token: str | None = TOKEN) -> ApiClient:
    app = create_app(registry, Devices(registry.store), token=TOKEN, max_upload_bytes=max_upload_bytes)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return ApiClient(app, headers=headers)


@pytest.fixture
def client(registry: Registry) -> Iterator[ApiClient]:
    with make_client(registry) as c:
        yield c


def upload(client: ApiClient, path: Path) -> tuple[int, dict]:
    r = client.post("/v1/bundles", content=path.read_bytes(), headers={**OCTETS, BUNDLE_NAME_HEADER: path.name})
    return r.status_code, r.json()


def test_every_route_but_health_openapi_and_the_dashboard_files_needs_the_token(
    registry: Registry, bundle: BundleFactory
) -> None:
    for token in (None, "wrong"):
        with make_client(registry, token=token) as c:
            for method, path in [*OPERATIONS, ("GET", "/no/such/route")]:
                concrete = path.replace("{name}", "digits").replace("{version}", "1").replace("{id}", "pi-1")
                r = c.request(method, concrete)
                if path in ("/healthz", "/openapi.json", "/"):
                    assert r.status_code == 200, path
                    continue
                if path == "/dashboard/{name}":
                    assert r.status_code == 404, r.text  # public, and there is no file "digits"
                    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                                       ("plotly.min.js", "text/javascript")):  # fmt: skip
                        got = c.get(f"/dashboard/{name}")
                        assert got.status_code == 200 and got.headers["content-type"].startswith(kind), name
                        assert got.content.strip()
                    continue
                assert r.status_code == 401, (method, path)
                assert r.headers["www-authenticate"] == "Bearer"
                why = "no API token" if token is None else "wrong API token"
                assert r.json() == {
                    "error": f"{why}: send Authorization: Bearer TOKEN (the hub's token is in DATA/token)",
                    "kind": "unauthorized",
                }
    assert registry.bundles() == []


def test_push_list_get_delete(client: ApiClient, bundle: BundleFactory, keys: Keys) -> None:
    status, body = upload(client, bundle())
    assert status == 201
    assert body["created"] is True
    b = body["bundle"]
    assert (b["name"], b["version"], b["profile"], b["signer"]) == ("digits", 1, "raspberrypi", keys.public.id)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b["uploaded"])
    status, again = upload(client, bundle())  # the same model, seed and key: byte for byte the same file
    assert (status, again["created"]) == (200, False)
    upload(client, bundle(profile="jetson", seed=5))
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], [v["version"] for v in m["versions"]]) for m in models] == [("digits", [1])]
    assert [x["profile"] for x in models[0]["versions"][0]["bundles"]] == ["jetson", "raspberrypi"]
    assert "inputs" not in models[0]["versions"][0]["bundles"][0]
    one = client.get("/v1/models/digits").json()
    assert one["versions"][0]["bundles"][0]["inputs"][0]["name"] == "x"
    assert client.get("/v1/models/nope").status_code == 404
    r = client.delete("/v1/models/digits/versions/1")
    assert r.status_code == 200
    assert sorted(x["profile"] for x in r.json()["deleted"]) == ["jetson", "raspberrypi"]
    assert client.get("/v1/models").json() == {"models": []}


def test_refusals_have_their_status_kind_and_message(
    client: ApiClient, bundle: BundleFactory, other_keys: Keys, registry: Registry
) -> None:
    unsigned = bundle(signed=False)
    status, body = upload(client, unsigned)
    assert status == 400
    assert body == {
        "error": f"{unsigned.name}: the bundle is not signed; sign it with `edgekit sign BUNDLE --key KEY`",
        "kind": "signature",
    }
    status, body = upload(client, bundle(key=other_keys.private))
    assert (status, body["kind"]) == (400, "signature")
    upload(client, bundle(seed=1))
    status, body = upload(client, bundle(seed=2))
    assert (status, body["kind"]) == (409, "conflict")
    r = client.post("/v1/bundles", content=b"PK junk", headers=OCTETS)
    assert (r.status_code, r.json()["kind"]) == (400, "bundle")
    assert r.json()["error"].startswith("upload: not a bundle")
    r = client.post("/v1/bundles", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400
    assert "Content-Type: application/octet-stream" in r.json()["error"]
    r = client.post("/v1/bundles", content=b"", headers=OCTETS)
    assert r.json() == {"error": "the body is empty: send the bundle file's bytes", "kind": "invalid_input"}
    r = client.get("/v1/nothing")
    assert (r.status_code, r.json()["kind"]) == (404, "not_found")
    r = client.put("/v1/models")
    assert r.status_code == 405
    assert r.json()["error"] == "PUT is not allowed on /v1/models; /openapi.json lists the methods"
    assert list(registry.artifacts.incoming_dir.iterdir()) == []


def test_uploads_over_the_cap_are_refused_before_and_while_reading(registry: Registry, bundle: BundleFactory) -> None:
    path = bundle()
    size = path.stat().st_size
    with make_client(registry, max_upload_bytes=size - 1) as c:
        r = c.post("/v1/bundles", content=path.read_bytes(), headers=OCTETS)  # Content-Length says it
        assert r.status_code == 413
        assert r.json()["error"].startswith(f"the upload is {size} bytes, over the hub's {size - 1}-byte cap")
        data = path.read_bytes()

        async def chunks() -> AsyncIterator[bytes]:
            yield data[: size // 2]
            yield data[size // 2 :]

        r = c.post("/v1/bundles", content=chunks(), headers=OCTETS)  # chunked: counted while reading
        assert r.status_code == 413
    assert [p for p in registry.artifacts.root.rglob("*") if p.is_file()] == []


def test_delete_refused_while_a_device_runs_it(client: ApiClient, bundle: BundleFactory, registry: Registry) -> None:
    upload(client, bundle())
    with registry.store.begin() as tx:
        tx.register_device("pi-1", profile="raspberrypi", labels={"site": "lab"}, online=True, now=1.0)
        tx.report_model("pi-1", "digits", active=1, state="serving", now=1.0)
    r = client.delete("/v1/models/digits/versions/1")
    assert r.status_code == 409
    assert r.json()["error"].startswith("digits v1 runs on 1 device(s) (pi-1)")
    assert client.delete("/v1/models/digits/versions/7").status_code == 404


def test_devices_and_labels(client: ApiClient, registry: Registry) -> None:
    assert client.get("/v1/devices").json() == {"devices": []}
    with registry.store.begin() as tx:
        tx.register_device("pi-1", profile="raspberrypi", labels={"site": "lab"}, online=True, now=0.0)
        tx.report_model("pi-1", "digits", active=1, state="serving", detail={"versions": [1]}, now=0.0)
    [d] = client.get("/v1/devices").json()["devices"]
    assert d == {
        "id": "pi-1",
        "profile": "raspberrypi",
        "labels": {"site": "lab"},
        "online": True,
        "last_seen": "1970-01-01T00:00:00Z",
        "registered": "1970-01-01T00:00:00Z",
        "models": {"digits": {"active": 1, "state": "serving", "reason": "", "versions": [1]}},
    }
    r = client.patch("/v1/devices/pi-1/labels", json={"labels": {"ring": "canary", "site": None}})
    assert r.status_code == 200
    assert r.json()["labels"] == {"ring": "canary"}
    assert client.get("/v1/devices/pi-1").json()["labels"] == {"ring": "canary"}
    bad = [
        ({"labels": {"ring": "two words"}}, 400, "no spaces, commas or '='"),
        ({"labels": {"": "x"}}, 400, "label key ''"),
        ({"labels": {}}, 400, "no label given"),
        ({"labels": ["ring"]}, 400, 'give {"labels"'),
        ({"nothing": 1}, 400, 'give {"labels"'),
    ]
    for body, status, message in bad:
        r = client.patch("/v1/devices/pi-1/labels", json=body)
        assert (r.status_code, message in r.json()["error"]) == (status, True), r.json()
    r = client.patch("/v1/devices/pi-1/labels", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.json()["error"].startswith("the body is not JSON")
    r = client.patch("/v1/devices/pi-9/labels", json={"labels": {"a": "b"}})
    assert r.status_code == 404
    assert r.json()["error"] == "no device 'pi-9' has registered with the hub; `edgekit devices` lists those that did"


def test_the_openapi_document_lists_exactly_the_apps_routes(client: ApiClient) -> None:
    doc = client.get("/openapi.json", headers={"Authorization": ""}).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = set()
    for route in client.app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        served |= {(m, path) for m in (route.methods or ()) if m != "HEAD"}
    assert documented == served
    for (method, path), op in OPERATIONS.items():
        params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert params == set(re.findall(r"\{(\w+)\}", path)), (method, path)
        if op.get("security") != []:
            assert "401" in op["responses"], (method, path)
    refs = re.findall(r'"#/components/schemas/(\w+)"', str(doc).replace("'", '"'))
    assert set(refs) <= set(doc["components"]["schemas"])
