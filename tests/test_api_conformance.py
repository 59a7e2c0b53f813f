"""Schemathesis checks that every answer conforms to the OpenAPI schema: its status code is documented, its
content type is the documented one, and its body matches the documented schema (errors included), besides
"no 5xx". Bounded: a few examples per operation and mode, in process, SQLite.

With `BITSEARCH_CONFORMANCE_REPORT=path.json` the run writes its counts for `bench/`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings
from tests.helpers import make_sf

EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 4}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Pages of the dashboard answer HTML (and redirect to the login page); the conformance of the JSON API is
# what clients rely on.
SKIP_PREFIXES = ("/ui/", "/metrics")


def test_responses_conform_to_the_openapi_schema(tmp_path):
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "conformance")
    app = create_app(Settings(data_dir=tmp_path / "data", max_model_bytes=256 * 1024,
                              max_dataset_bytes=256 * 1024), sf)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = f"Bearer {key}"
    sent: Counter = Counter()
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.startswith(SKIP_PREFIXES) or op.path.startswith("/ui/api/")]
    assert len(operations) >= 20
    for op in operations:
        for mode, n in EXAMPLES.items():
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception:  # nothing to make invalid
                continue

            @given(case=strategy)
            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                headers = dict(case.headers or {})
                headers["Authorization"] = auth  # a valid key: the conformance of what authorised clients get
                response = case.call(headers=headers)
                sent["requests"] += 1
                sent[f"{response.status_code // 100}xx"] += 1
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except (Exception, BaseExceptionGroup) as exc:  # failed checks: collect, report at the end
                    first = str(exc).strip().splitlines()[:6]
                    failures.append(f"{case.method} {op.path} -> {response.status_code}: {' | '.join(first)}")

            try:
                run()
            except Unsatisfiable:
                pass
    report = os.environ.get("BITSEARCH_CONFORMANCE_REPORT")
    if report:
        Path(report).write_text(json.dumps({"operations": len(operations), **sent,
                                            "conformance_failures": len(failures),
                                            "failures": sorted(set(failures))[:50]}, indent=2))
    assert not failures, "\n".join(sorted(set(failures))[:30])
    assert sent["5xx"] == 0 and sent["requests"] >= 150, sent
