"""schemathesis against the server's own OpenAPI document, over a real socket: no 5xx, no crash, no
hang, every 4xx in the protocols' error shape. A fixed seed and a few examples per operation keep it
short; ``scripts/fuzz`` runs the same for minutes with random seeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.runtime.fuzzing import FuzzResult, identity_bundles, run_schemathesis
from tests.runtime.test_socket import running_server

pytest.importorskip("schemathesis")

FUZZ_DATATYPES = ["BOOL", "UINT8", "FP16", "INT64"]


@pytest.fixture(scope="module")
def base_url(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    typed = identity_bundles(tmp_path_factory.mktemp("typed"), FUZZ_DATATYPES)
    sources = [str(p) for p in (bundles["mlp"], bundles["int8"], bundles["two"], *typed)]
    with running_server(*sources, "--poll-seconds", "0", "--log-level", "warning") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def result(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> FuzzResult:
    return run_schemathesis(base_url, tmp_path_factory.mktemp("fuzz") / "run.har", seed=1, max_examples=10)


def test_schemathesis_finds_no_server_error_crash_or_hang(result: FuzzResult, base_url: str) -> None:
    assert result.returncode == 0, result.output[-4000:]
    assert not result.problems, "\n".join(result.problems[:20])
    assert not [code for code in result.statuses if code >= 500], result.summary()
    # the server still serves (no crash) and answered every request (no hang: a 30 s timeout fails the run)
    assert requests.get(f"{base_url}/v2/health/ready", timeout=10).status_code == 200
    assert result.requests > 1000, result.summary()


def test_the_document_leads_the_fuzzer_to_the_handlers(result: FuzzResult) -> None:
    # the loaded models are path values, so the handlers answer rather than 404 (schemathesis warned
    # "14 operations repeatedly returned 404" when the document named no model)
    assert "repeatedly returned 404" not in result.output, result.output[-4000:]
    ok = {op for (op, status), n in result.by_operation.items() if status == 200 and n}
    assert any(op.startswith("POST /v2/models/") and op.endswith("/infer") for op in ok), sorted(ok)
    assert any(op.startswith("POST /v1/models/") and op.endswith(":predict") for op in ok), sorted(ok)
