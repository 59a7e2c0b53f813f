"""Hostile input to the API: .npz decompression bombs, members that are not NPY arrays, chunked bodies past the
JSON limit, and error bodies that match what the OpenAPI schema promises."""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings
from tests.helpers import make_sf
from zoo.uploads import NpzLimits, NpzTooLarge, describe_npz, read_npz_headers


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _bomb_bytes(shape=(1 << 20, 1 << 20), dtype="<u1") -> bytes:
    """An .npz whose x header claims `shape` (a terabyte here) while the file is a few hundred bytes."""
    from numpy.lib import format as npy_format

    head = io.BytesIO()
    npy_format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", head.getvalue() + b"\0" * 4096)
    return out.getvalue()


@pytest.fixture
def api(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", max_dataset_bytes=8 * 1024**2, max_json_bytes=64 * 1024,
                        max_dataset_elements=4 * 1024**2, max_dataset_array_bytes=4 * 1024**2,
                        dataset_read_chunk_bytes=64 * 1024)
    sf = make_sf("sqlite", tmp_path)
    key, tenant = create_key(sf, "hostile")
    with TestClient(create_app(settings, sf), raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {key}"}, settings


def test_npz_bomb_is_refused_from_its_header_before_any_read(api, tmp_path, monkeypatch):
    client, h, settings = api
    import zoo.uploads.npz as npz_mod

    def never(*a, **k):
        raise AssertionError("array data read before the header was checked")

    monkeypatch.setattr(npz_mod, "iter_chunks", never)
    bomb = _bomb_bytes()
    assert len(bomb) < 2048
    r = client.post("/datasets", files={"file": ("bomb.npz", bomb)}, headers=h)
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "too_large" and "limit" in body["detail"], body
    # a deflated real array just over the element limit: refused the same way
    big = _npz(x=np.zeros((4 * 1024**2 + 1,), np.uint8).reshape(-1, 1, 1))
    r = client.post("/datasets", files={"file": ("big.npz", big)}, headers=h)
    assert r.status_code == 413 and "elements" in r.json()["detail"], r.text


def test_npz_member_that_is_not_an_array_is_a_clear_4xx(api):
    client, h, _ = api
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("x.npy", b"these bytes are not an NPY array")
    r = client.post("/datasets", files={"file": ("raw.npz", out.getvalue())}, headers=h)
    assert r.status_code == 422 and "not an NPY array" in r.json()["detail"], r.text
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("x", b"no .npy suffix")
    r = client.post("/datasets", files={"file": ("raw2.npz", out.getvalue())}, headers=h)
    assert r.status_code == 422 and "not an NPY array" in r.json()["detail"], r.text


def test_npz_member_that_is_not_an_array_is_refused_by_load_npz_too(tmp_path):
    from quant.errors import BitsearchError
    from zoo.data import load_npz

    p = tmp_path / "raw.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x", b"raw bytes")
    with pytest.raises(BitsearchError, match="not an NPY array"):
        load_npz(p)


def test_describing_an_npz_takes_memory_bounded_by_the_chunk_not_the_file(tmp_path):
    x = np.zeros((2000, 32, 32, 3), np.uint8)  # 6 MB of pixels, deflated to a few KB
    x[::7] = 5
    p = tmp_path / "big.npz"
    np.savez_compressed(p, x=x, y=(np.arange(2000) % 10).astype(np.int64))
    limits = NpzLimits(max_elements=10**8, max_bytes=10**9, chunk_bytes=256 * 1024)
    tracemalloc.start()
    info = describe_npz(p, limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info == {"items": 2000, "item_shape": [3, 32, 32], "labels": True, "classes": 10}
    assert peak < 4 * 1024**2, peak  # the file's 6 MB of pixels (24 MB as float32) never sit in memory at once
    with pytest.raises(NpzTooLarge):
        read_npz_headers(p, NpzLimits(max_elements=1000))


def test_float_npz_with_a_nan_in_a_late_chunk_is_refused(tmp_path):
    from quant.errors import BitsearchError

    x = np.zeros((500, 64), np.float32)
    x[-1, -1] = np.inf
    p = tmp_path / "f.npz"
    np.savez(p, x=x)
    with pytest.raises(BitsearchError, match="1 NaN or infinite"):
        describe_npz(p, NpzLimits(chunk_bytes=4096))


def test_chunked_json_body_over_the_limit_is_413_on_every_json_route(api):
    client, h, settings = api
    limit = settings.max_json_bytes

    def chunked(n):
        yield b'{"model": "zoo:digits-cnn", "pad": "'
        for _ in range(n):
            yield b"a" * 4096
        yield b'"}'

    for path in ("/search", "/schedules", "/ui/api/search"):
        r = client.post(path, content=chunked(limit // 4096 + 2),
                        headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
        assert r.json()["code"] == "too_large" and str(limit) in r.json()["detail"]
    # a chunked body under the limit still reaches the route (and is judged there)
    r = client.post("/search", content=chunked(1), headers={**h, "Content-Type": "application/json"})
    assert r.status_code != 413, r.text


def test_error_bodies_have_a_reason_and_a_stable_code(api):
    client, h, _ = api
    r = client.get("/searches")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized" and r.json()["detail"]
    r = client.get("/searches/" + "0" * 32, headers=h)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.post("/search", json={"model": "zoo:no-such-model"}, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "invalid" and isinstance(r.json()["detail"], str)
    r = client.post("/search", json={"model": 5, "budgets": "x"}, headers=h)
    assert r.status_code == 422 and isinstance(r.json()["detail"], list), r.text


def test_openapi_documents_the_error_statuses_with_their_body(api):
    client, _, _ = api
    spec = client.get("/openapi.json").json()
    assert "ErrorBody" in spec["components"]["schemas"]
    op = spec["paths"]["/search"]["post"]
    for status in ("401", "404", "409", "413", "415", "422", "429", "503"):
        assert status in op["responses"], status
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), (status, ref)


def test_a_budget_of_true_is_refused(api):
    client, h, _ = api
    r = client.post("/search", json={"model": "zoo:digits-cnn", "data": "zoo:digits",
                                     "budgets": [{"metric": "avg_weight_bits", "value": True}]}, headers=h)
    assert r.status_code == 422 and "true/false" in r.text, r.text  # not taken as 1
