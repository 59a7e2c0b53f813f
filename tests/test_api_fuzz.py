"""Schemathesis against the app's own OpenAPI: generated requests (valid and invalid) never get a 5xx.

Bounded: a fixed number of examples per operation and mode (≥ 300 requests in all), no shrinking database,
an in-process ASGI transport, so it stays well under two minutes on two busy cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings
from tests.helpers import db_urls, make_sf

EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}
MIN_REQUESTS = 300


@pytest.fixture(params=db_urls())
def app_and_key(request, tmp_path):
    sf = make_sf(request.param, tmp_path)
    key, _ = create_key(sf, "fuzz")
    app = create_app(
        Settings(data_dir=tmp_path / "data", max_model_bytes=256 * 1024, max_dataset_bytes=256 * 1024), sf
    )
    return app, key


def test_generated_requests_never_get_a_server_error(app_and_key):
    app, key = app_and_key
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = {"Authorization": f"Bearer {key}"}
    sent = {"n": 0}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    for op in operations:
        for mode, n in EXAMPLES.items():
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception:  # an operation with nothing to make invalid
                continue

            @given(case=strategy)
            @settings(
                max_examples=n,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                headers = dict(case.headers or {})
                headers.setdefault("Authorization", auth["Authorization"])
                response = case.call(headers=headers)
                sent["n"] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:300]}"
                    )

            try:
                run()
            except Unsatisfiable:  # nothing invalid to generate for this operation (e.g. no parameters)
                pass
    assert not failures, "\n".join(failures[:20])
    print(f"schemathesis: {sent['n']} requests over {len(operations)} operations")
    assert sent["n"] >= MIN_REQUESTS, sent
