"""Ground-truth feedback (POST /v2/models/NAME/feedback): the true labels or values of earlier v2
requests, by their id, become the version's live accuracy (or mean absolute error) in its telemetry
window; bad feedback is a 400 that names what is wrong and counts nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.server import create_app
from tests.runtime import models
from tests.runtime.conftest import Client

FEATURES = 8
W = np.random.default_rng(4).normal(size=(FEATURES, 5)).astype(np.float32)
X = np.random.default_rng(5).normal(size=(6, FEATURES)).astype(np.float32)


def classes(x: np.ndarray) -> np.ndarray:
    return np.asarray((x.astype(np.float64) @ W.astype(np.float64)).argmax(axis=1))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Runtime, Client]]:
    bundle = models.make_bundle(
        tmp_path / "cls.ekb", name="cls", version=1, fmt="onnx", model=models.onnx_softmax(W),
        golden_in={"x": X[:2]},
    )  # fmt: skip
    rt = Runtime([bundle])
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    yield rt, c
    c.close()
    rt.close()


def infer(client: Client, request_id: str, x: np.ndarray) -> None:
    body = {"id": request_id, "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                          "data": x.reshape(-1).tolist()}]}  # fmt: skip
    r = client.post("/v2/models/cls/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == request_id


def window(rt: Runtime) -> dict[str, object]:
    (w,) = rt.metrics.windows()
    return w.take()


def test_feedback_by_request_id_gives_the_exact_live_accuracy(served: tuple[Runtime, Client]) -> None:
    rt, client = served
    truth = classes(X)
    infer(client, "r1", X[:4])
    infer(client, "r2", X[4:])
    window(rt)  # the inference interval; feedback counts in the interval it arrives in
    wrong = truth[:4].copy()
    wrong[0] = (wrong[0] + 1) % 5  # one of the four rows mislabelled by the model, as the client says
    r = client.post("/v2/models/cls/feedback", json={"items": [{"id": "r1", "labels": wrong.tolist()},
                                                                 {"id": "r2", "labels": truth[4:].tolist()},
                                                                 {"id": "never-sent", "label": 1}]})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 2, "rows": 6, "unknown": ["never-sent"]}
    fb = window(rt)["feedback"]
    assert fb == {"rows": 6, "correct": 5, "accuracy": 5 / 6}
    # a request's feedback counts once: the same id again is unknown
    again = client.post("/v2/models/cls/feedback", json={"id": "r2", "labels": truth[4:].tolist()})
    assert again.json() == {"accepted": 0, "rows": 0, "unknown": ["r2"]}
    assert "feedback" not in window(rt)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not JSON"),
        ({"label": 1}, '"id"'),
        ({"id": "r1"}, "exactly one of label, labels, value, values"),
        ({"id": "r1", "label": 1, "value": 2.0}, "exactly one of"),
        ({"id": "r1", "labels": ["a", "b"]}, "labels must be integers"),
        ({"id": "r1", "labels": [1, 2, 3]}, "give 2 integer class label(s)"),
        ({"items": []}, "items must be a list of 1 to 1000"),
        # the first item is good, the second is not: nothing counts, not even the first
        ({"items": [{"id": "r1", "labels": [0, 1]}, {"id": "r1", "labels": [0]}]}, "give 2 integer class label(s)"),
    ],
)
def test_bad_feedback_is_a_400_that_says_what_is_wrong(served: tuple[Runtime, Client], body: object, says: str) -> None:
    rt, client = served
    infer(client, "r1", X[:2])
    window(rt)
    r = (
        client.post("/v2/models/cls/feedback", content=body)
        if isinstance(body, bytes)
        else client.post("/v2/models/cls/feedback", json=body)
    )
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]
    assert "feedback" not in window(rt)
    good = client.post("/v2/models/cls/feedback", json={"id": "r1", "labels": classes(X[:2]).tolist()})
    assert good.json() == {"accepted": 1, "rows": 2, "unknown": []}  # the answer was still remembered
    assert window(rt)["feedback"] == {"rows": 2, "correct": 2, "accuracy": 1.0}


def test_feedback_for_an_unknown_model_is_a_404(served: tuple[Runtime, Client]) -> None:
    _, client = served
    r = client.post("/v2/models/nosuch/feedback", json={"id": "r1", "label": 1})
    assert r.status_code == 404, r.text
    assert "nosuch" in r.json()["error"]
