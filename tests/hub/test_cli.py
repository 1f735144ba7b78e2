"""`edgekit push`, `edgekit models`, `edgekit devices` end to end: the real `edgekit` command against a
real `edgekit hub serve` process, each refusal one line on stderr with its exit code."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgekit.hub.store import Store, database_url
from tests.hub.conftest import BundleFactory, HubProcess, Keys, edgekit


@pytest.fixture
def hub(hub_factory: Callable[..., HubProcess], keys: Keys) -> HubProcess:
    return hub_factory("--trust-key", str(keys.public_path))


def one_line_error(r: object, code: int, text: str) -> None:
    """The command failed with ``code`` and printed exactly one line, ``Error: <text>``."""
    assert r.returncode == code, (r.returncode, r.stderr)  # type: ignore[attr-defined]
    assert r.stderr == f"Error: {text}\n", r.stderr  # type: ignore[attr-defined]


def test_push_then_models(hub: HubProcess, bundle: BundleFactory, keys: Keys) -> None:
    pi, jetson, v2 = bundle(), bundle(profile="jetson", seed=4), bundle(version=2)
    r = edgekit("push", str(pi), str(jetson), str(v2), env=hub.env())
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("pushed digits v1 for raspberrypi (")
    assert f"signed by {keys.public.id}" in lines[0]
    assert lines[0].endswith(f") from {pi}")
    r = edgekit("push", str(pi), env=hub.env())
    assert r.returncode == 0
    assert r.stderr.startswith("already on the hub (same bytes): digits v1 for raspberrypi")
    r = edgekit("models", "--json", env=hub.env())
    assert r.returncode == 0, r.stderr
    [model] = json.loads(r.stdout)
    assert model["name"] == "digits"
    assert [(v["version"], [b["profile"] for b in v["bundles"]]) for v in model["versions"]] == [
        (1, ["jetson", "raspberrypi"]),
        (2, ["raspberrypi"]),
    ]
    b = model["versions"][0]["bundles"][1]
    assert (b["size_bytes"], b["signer"], b["format"]) == (pi.stat().st_size, keys.public.id, "onnx")
    r = edgekit("models", "digits", "--json", env=hub.env())
    assert json.loads(r.stdout)[0]["versions"][1]["bundles"][0]["outputs"][0]["name"] == "probs"
    r = edgekit("models", env=hub.env())  # the table goes to stderr, nothing on stdout
    assert r.returncode == 0
    assert r.stdout == ""
    assert "digits" in r.stderr
    assert "jetson" in r.stderr
    one_line_error(
        edgekit("models", "nope", env=hub.env()),
        3,
        "no model 'nope' on the hub; `edgekit models` lists what was pushed",
    )


def test_each_refused_push_is_one_line_and_its_exit_code(
    hub: HubProcess, bundle: BundleFactory, other_keys: Keys, tmp_path: Path
) -> None:
    unsigned = bundle(signed=False)
    one_line_error(
        edgekit("push", str(unsigned), env=hub.env()),
        9,
        f"{unsigned.name}: the bundle is not signed; sign it with `edgekit sign BUNDLE --key KEY`",
    )
    untrusted = bundle(key=other_keys.private)
    r = edgekit("push", str(untrusted), env=hub.env())
    assert r.returncode == 9
    assert r.stderr.startswith(f"Error: {untrusted.name}: signed by key {other_keys.public.id}, not trusted here")
    assert r.stderr.count("\n") == 1
    # Tampered after signing: one golden sample replaced (the model and manifest untouched).
    signed = bundle()
    tampered = tmp_path / "tampered.ekb"
    with zipfile.ZipFile(signed) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, src.read("golden/outputs.npz") if info.filename == "golden/inputs.npz" else data)
    r = edgekit("push", str(tampered), env=hub.env())
    assert r.returncode == 9
    assert r.stderr.startswith("Error: tampered.ekb: golden/inputs.npz differ from what key")
    assert r.stderr.endswith("signed: the bundle was changed after signing\n")
    # The same name, version and profile with other content: a conflict (exit 15).
    assert edgekit("push", str(signed), env=hub.env()).returncode == 0
    other = bundle(seed=9)
    r = edgekit("push", str(other), env=hub.env())
    assert r.returncode == 15, r.stderr
    assert r.stderr.startswith(
        f"Error: {other.name}: digits v1 for profile raspberrypi is already on the hub with other"
    )
    assert r.stderr.endswith("a pushed version never changes: give this one a new version\n")
    # Nothing of the refused ones was kept.
    [model] = json.loads(edgekit("models", "--json", env=hub.env()).stdout)
    assert [(v["version"], len(v["bundles"])) for v in model["versions"]] == [(1, 1)]
    assert len(list((hub.data / "artifacts").glob("*.ekb"))) == 1
    assert list((hub.data / "artifacts" / ".incoming").iterdir()) == []
    one_line_error(
        edgekit("push", str(tmp_path / "missing.ekb"), env=hub.env()),
        2,
        f"no such bundle file: {tmp_path / 'missing.ekb'}",
    )


def test_a_hub_without_trust_keys_says_how_to_start_it(
    hub_factory: Callable[..., HubProcess], bundle: BundleFactory
) -> None:
    hub = hub_factory()
    path = bundle()
    one_line_error(
        edgekit("push", str(path), env=hub.env()),
        9,
        f"{path.name}: this hub trusts no signing key, so it refuses every push; start it with "
        "`edgekit hub serve --trust-key PUB` (the .pub file of `edgekit keys generate`)",
    )


def test_the_token_and_the_address(hub: HubProcess, bundle: BundleFactory) -> None:
    path = bundle()
    one_line_error(
        edgekit("push", str(path), env=hub.env(token=False)),
        16,
        f"the hub at {hub.url} needs an API token: pass --token or set EDGEKIT_HUB_TOKEN (the token is in DATA/token)",
    )
    one_line_error(
        edgekit("models", "--token", "not-it", env=hub.env()),
        16,
        f"the hub at {hub.url} refused the API token: "
        "pass --token or set EDGEKIT_HUB_TOKEN (the token is in DATA/token)",
    )
    # --hub and --token on the command line win over the environment, on a group or its command.
    r = edgekit("models", "--hub", hub.url, "--token", hub.token, env={"EDGEKIT_HUB": "http://127.0.0.1:1"})
    assert r.returncode == 0, r.stderr
    r = edgekit("models", "--token", hub.token, "delete", "digits:1", env=hub.env(token=False))
    one_line_error(r, 3, "no digits v1 on the hub; `edgekit models` lists what was pushed")
    hub.stop()
    one_line_error(
        edgekit("models", env=hub.env()),
        4,
        f"cannot reach the hub at {hub.url}: Connection refused; start it with `edgekit hub serve` or set EDGEKIT_HUB",
    )


def test_devices_labels_and_a_delete_refused_while_a_device_runs_it(hub: HubProcess, bundle: BundleFactory) -> None:
    r = edgekit("devices", "--json", env=hub.env())
    assert (r.returncode, json.loads(r.stdout)) == (0, [])
    assert edgekit("push", str(bundle()), str(bundle(version=2)), env=hub.env()).returncode == 0
    # Devices register over MQTT (next slice); here the device row is written as that link will.
    store = Store.open(database_url(None, hub.data))
    try:
        with store.begin() as tx:
            tx.register_device("pi-1", profile="raspberrypi", labels={"site": "lab"}, online=True, now=1e9)
            tx.report_model("pi-1", "digits", active=1, state="serving", detail={"versions": [1]}, now=1e9)
    finally:
        store.close()
    [d] = json.loads(edgekit("devices", "--json", env=hub.env()).stdout)
    assert (d["id"], d["profile"], d["labels"], d["online"]) == ("pi-1", "raspberrypi", {"site": "lab"}, True)
    assert d["models"]["digits"]["active"] == 1
    assert d["models"]["digits"]["state"] == "serving"
    r = edgekit("devices", env={**hub.env(), "COLUMNS": "200"})
    assert "pi-1" in r.stderr
    assert "digits v1 serving" in r.stderr
    r = edgekit("devices", "label", "pi-1", "ring=canary", "site-", env=hub.env())
    assert (r.returncode, r.stderr) == (0, "device pi-1 labels: ring=canary\n")
    one_line_error(
        edgekit("devices", "label", "pi-1", "oops", env=hub.env()),
        2,
        "'oops': give KEY=VALUE to set a label or KEY- to remove it",
    )
    one_line_error(
        edgekit("devices", "label", "pi-9", "a=b", env=hub.env()),
        3,
        "no device 'pi-9' has registered with the hub; `edgekit devices` lists those that did",
    )
    one_line_error(
        edgekit("models", "delete", "digits:1", env=hub.env()),
        15,
        "digits v1 runs on 1 device(s) (pi-1); deploy another version to them before deleting it",
    )
    r = edgekit("models", "delete", "digits:2", env=hub.env())
    assert (r.returncode, r.stderr) == (0, "deleted digits v2 (1 bundle(s): raspberrypi)\n")
    one_line_error(
        edgekit("models", "delete", "digits", env=hub.env()), 2, "'digits': give NAME:VERSION, e.g. digits:2"
    )


def test_rollout_commands_refuse_clearly(hub: HubProcess, bundle: BundleFactory) -> None:
    """Without --broker the hub serves its registry but cannot reach devices: deploys are refused;
    bad options are refused before the hub is asked; an unknown rollout is not found."""
    one_line_error(
        edgekit("deploy", "digits:1", "--to", "all", env=hub.env()),
        4,
        "this hub has no MQTT broker to reach devices: start it with --broker mqtt://HOST:PORT",
    )
    one_line_error(
        edgekit("deploy", "digits:1", "--to", "all", "--waves", "1,50%", env=hub.env()),
        2,
        "--waves '1,50%': the last wave must be 100% so that every device is reached",
    )
    one_line_error(
        edgekit("deploy", "digits", "--to", "all", env=hub.env()),
        2,
        "'digits': give NAME:VERSION, e.g. digits:2",
    )
    one_line_error(
        edgekit("deploy", "digits:1", "--to", "all", "--device-timeout", "soon", env=hub.env()),
        2,
        "--device-timeout 'soon': give a duration such as 30s, 5m, 1h or a number of seconds",
    )
    one_line_error(
        edgekit("deploy", "digits:1", "--to", "all", "--min-agreement", "99%", env=hub.env()),
        2,
        "--min-agreement is judged in the shadow check: give --shadow DURATION too",
    )
    one_line_error(
        edgekit("rollout", "status", "r-nope", env=hub.env()),
        4,
        "this hub has no MQTT broker to reach devices: start it with --broker mqtt://HOST:PORT",
    )
    r = edgekit("rollout", "list", env=hub.env(token=False))
    assert r.returncode == 16, r.stderr
