"""Uploads: torch.export archives and safetensors weights, .npz data; limits, checksums, and above all that
nothing uploaded is ever unpickled or executed (canary files must never appear)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings
from tests.helpers import db_urls, make_sf
from zoo.models import DigitsCNN, DigitsMLP

ROOT = Path(__file__).resolve().parents[1]


class Canary:
    """Unpickling this creates the file at `path` (what a malicious pickle would do, harmlessly)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def pt2_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("pt2") / "cnn.pt2"
    model = DigitsCNN().eval()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path.read_bytes()


def rewrite_zip(data: bytes, change) -> bytes:
    """A copy of the zip `data` whose entries pass through `change(name, bytes) -> bytes | None` (None: drop);
    `change` may also return {new name: bytes} to add entries."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            new = change(info.filename, zin.read(info.filename))
            if isinstance(new, dict):
                for name, content in new.items():
                    zout.writestr(name, content)
            elif new is not None:
                zout.writestr(info.filename, new)
    return out.getvalue()


def edit_program(data: bytes, edit) -> bytes:
    def change(name, content):
        if name.endswith("models/model.json"):
            program = json.loads(content)
            edit(program)
            return json.dumps(program).encode()
        return content

    return rewrite_zip(data, change)


def bomb(data: bytes) -> bytes:
    """A valid archive plus an extra entry that deflates to 100 MB of zeros."""
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/extra/padding", b"\0" * 100_000_000)
    return out.getvalue()


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", max_model_bytes=4 * 1024**2, max_dataset_bytes=1024**2)


@pytest.fixture
def api(settings, tmp_path):
    sf = make_sf("sqlite", tmp_path)
    key, tenant = create_key(sf, "uploader")
    with TestClient(create_app(settings, sf)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, tenant


def upload(client, headers, path, content, filename=None, **fields):
    files = {"file": (filename or "upload.bin", content)}
    return client.post(path, files=files, data=fields, headers=headers)


def incoming_is_empty(settings, tenant) -> bool:
    d = settings.uploads_dir / tenant / ".incoming"
    return not d.exists() or not any(d.iterdir())


# --- good uploads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("db", db_urls())
def test_pt2_upload_roundtrip(db, tmp_path, pt2_bytes, settings):
    sf = make_sf(db, tmp_path)
    key, tenant = create_key(sf, "pt2")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, sf)) as client:
        r = upload(client, h, "/models", pt2_bytes, "cnn.pt2", name="my cnn")
        assert r.status_code == 201, r.text
        m = r.json()
        assert m["format"] == "pt2" and m["name"] == "my cnn" and m["filename"] == "cnn.pt2"
        assert m["sha256"] == hashlib.sha256(pt2_bytes).hexdigest() and m["size_bytes"] == len(pt2_bytes)
        assert [l["name"] for l in m["info"]["layers"]] == ["conv1", "conv2", "conv3", "fc"]
        assert m["info"]["input_shape"] == [1, 8, 8] and m["info"]["num_classes"] == 10
        stored = settings.data_dir / "uploads" / tenant / "models" / f"{m['id']}.pt2"
        assert stored.read_bytes() == pt2_bytes
        assert client.get("/models", headers=h).json()["items"][0]["id"] == m["id"]
        assert client.get(f"/models/{m['id']}", headers=h).json() == m

        # a search on it: the job gets the stored file, which loads as a module with real layers
        r = client.post("/search", json={"model": m["id"], "data": "zoo:digits"}, headers=h)
        assert r.status_code == 202, r.text
        from db import jobs as job_repo
        from zoo.uploads import load_any_model

        spec = job_repo.get(sf, r.json()["job_id"]).spec
        assert spec["model"] == str(stored.resolve()) and spec["weights"] is None
        loaded = load_any_model(spec["model"])
        x = torch.randn(5, 1, 8, 8)
        assert loaded.model(x).shape == (5, 10)
        assert {n for n, mod in loaded.model.named_modules() if isinstance(mod, torch.nn.Conv2d)} == {
            "conv1",
            "conv2",
            "conv3",
        }

        assert client.delete(f"/models/{m['id']}", headers=h).status_code == 204
        assert not stored.exists()
        assert client.get(f"/models/{m['id']}", headers=h).status_code == 404
        assert client.delete(f"/models/{m['id']}", headers=h).status_code == 404


def test_exported_module_computes_what_the_original_does(pt2_bytes, tmp_path):
    from quant import Allocation, apply_allocation
    from quant.layers import discover_layers
    from zoo.uploads import load_exported_model

    torch.manual_seed(0)
    original = DigitsCNN().eval()
    ep = torch.export.export(
        original, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    loaded = load_exported_model(path)
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), original(x), atol=1e-5)
    ours, theirs = discover_layers(loaded.model, x[:2]), discover_layers(original, x[:2])
    assert [(l.name, l.kind, l.macs, l.params) for l in ours] == [
        (l.name, l.kind, l.macs, l.params) for l in theirs
    ]
    alloc = Allocation.uniform([l.name for l in ours], "4/8")
    q_ours = apply_allocation(loaded.model, alloc, x)
    q_theirs = apply_allocation(original, alloc, x)
    with torch.no_grad():
        assert torch.allclose(q_ours(x), q_theirs(x), atol=1e-4)


def test_safetensors_upload_for_a_zoo_architecture(api, settings, tmp_path):
    from safetensors.torch import save as st_save

    client, h, tenant = api
    weights = st_save({k: v.contiguous() for k, v in DigitsMLP().state_dict().items()})
    r = upload(client, h, "/models", weights, "mlp.safetensors", architecture="zoo:digits-mlp")
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["format"] == "safetensors" and m["architecture"] == "zoo:digits-mlp"
    assert m["info"]["layer_count"] == 3
    r = client.post("/search", json={"model": m["id"], "data": "zoo:digits"}, headers=h)
    assert r.status_code == 202
    for fields, reason in (
        ({"architecture": "zoo:digits-cnn"}, "do not fit"),
        ({}, "architecture"),
        ({"architecture": "zoo:nope"}, "unknown zoo model"),
    ):
        r = upload(client, h, "/models", weights, "mlp.safetensors", **fields)
        assert r.status_code == 422 and reason in r.json()["detail"], r.text
    assert incoming_is_empty(settings, tenant)


def test_dataset_uploads(api, settings):
    client, h, tenant = api
    buf = io.BytesIO()
    np.savez(buf, x=np.random.randint(0, 255, (20, 8, 8), dtype=np.uint8), y=np.arange(20) % 10)
    r = upload(client, h, "/datasets", buf.getvalue(), "digits.npz")
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["info"] == {"items": 20, "item_shape": [1, 8, 8], "labels": True, "classes": 10}
    r = client.post("/search", json={"model": "zoo:digits-cnn", "data": d["id"]}, headers=h)
    assert r.status_code == 202
    bad = {
        "no x": dict(z=np.zeros(3)),
        "must match": dict(x=np.zeros((4, 3), np.float32), y=np.arange(3)),
        "NaN": dict(x=np.full((2, 3), np.nan, np.float32)),
    }
    for reason, arrays in bad.items():
        b = io.BytesIO()
        np.savez(b, **arrays)
        r = upload(client, h, "/datasets", b.getvalue(), "bad.npz")
        assert r.status_code == 422, (reason, r.text)
    for content in (b"not a zip", b""):
        r = upload(client, h, "/datasets", content, "x.npz")
        assert r.status_code == 422 and (not content or "'x.npz'" in r.json()["detail"]), r.text
        assert ".incoming" not in r.text and str(settings.data_dir) not in r.text  # no server path leaks
    stored = settings.data_dir / "uploads" / tenant / "datasets" / f"{d['id']}.npz"
    assert stored.exists() and incoming_is_empty(settings, tenant)
    assert client.delete(f"/datasets/{d['id']}", headers=h).status_code == 204 and not stored.exists()


# --- malformed and oversized -------------------------------------------------------------------------------


def test_malformed_model_files_are_4xx(api, settings, pt2_bytes):
    client, h, tenant = api
    good = upload(client, h, "/models", pt2_bytes, "keep.pt2").json()
    cases = {
        "random bytes": (os.urandom(5000), 415),
        "truncated archive": (pt2_bytes[: len(pt2_bytes) // 2], 415),
        "empty": (b"", 422),
        "broken JSON": (rewrite_zip(pt2_bytes, lambda n, c: b"{" if n.endswith("model.json") else c), 422),
        "missing weights": (rewrite_zip(pt2_bytes, lambda n, c: None if "weights/" in n else c), 422),
        "a zip of something else": (
            rewrite_zip(pt2_bytes, lambda n, c: None if n.endswith("archive_format") else c),
            415,
        ),
        "a zip bomb": (bomb(pt2_bytes), 422),
        "unexpected entry": (
            rewrite_zip(
                pt2_bytes, lambda n, c: {n: c, "cnn/notes.txt": b"hi"} if n.endswith("byteorder") else c
            ),
            422,
        ),
    }
    for what, (content, code) in cases.items():
        r = upload(client, h, "/models", content, "m.pt2")
        assert r.status_code == code, (what, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"], what
    assert (
        client.post(
            "/models", content=b"raw", headers={**h, "Content-Type": "application/octet-stream"}
        ).status_code
        == 415
    )
    assert client.post("/models", files={"other": ("a", b"x")}, headers=h).status_code == 422
    # nothing the user had stored was lost, and no partial file was left behind
    assert client.get("/models", headers=h).json()["total"] == 1
    assert (settings.data_dir / "uploads" / tenant / "models" / f"{good['id']}.pt2").read_bytes() == pt2_bytes
    assert incoming_is_empty(settings, tenant)


def test_oversized_uploads_are_refused_while_streaming(settings, tmp_path, pt2_bytes):
    small = Settings(data_dir=settings.data_dir, max_model_bytes=20_000, max_dataset_bytes=20_000)
    sf = make_sf("sqlite", tmp_path)
    key, tenant = create_key(sf, "big")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(small, sf)) as client:
        r = upload(client, h, "/models", pt2_bytes, "big.pt2")  # refused by its Content-Length
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        boundary = "bsboundary"

        def chunked():  # no Content-Length: the limit must hold while the body streams in
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for _ in range(100):
                yield b"\0" * 1000
            yield f"\r\n--{boundary}--\r\n".encode()

        r = client.post(
            "/datasets",
            content=chunked(),
            headers={**h, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert r.status_code == 413, r.text
    assert incoming_is_empty(small, tenant)


# --- nothing is ever unpickled or executed -------------------------------------------------------------------


def test_pickles_are_refused_unread(api, settings, tmp_path):
    client, h, tenant = api
    canary = tmp_path / "canary-pickle"
    evil = pickle.dumps(Canary(canary))
    evil0 = pickle.dumps(Canary(canary), protocol=0)
    saved = torch_save_bytes({"weight": Canary(canary)})
    for content, name, fields in (
        (evil, "evil.pkl", {}),
        (evil0, "protocol0.pkl", {}),
        (saved, "model.pt", {}),
        (saved, "model.pth", {}),
        (saved, "model.pt2", {}),
        (evil, "w.safetensors", {"architecture": "zoo:digits-mlp"}),
    ):
        r = upload(client, h, "/models", content, name, **fields)
        assert r.status_code == 415, (name, r.text)
        assert "pickle" in r.json()["detail"] and "refused" in r.json()["detail"]
    for content in (evil, evil0, saved):
        r = upload(client, h, "/datasets", content, "data.npz")
        assert r.status_code in (415, 422) and "pickle" in r.json()["detail"], r.text
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Canary(canary)], dtype=object))  # an object array: pickled inside the .npz
    r = upload(client, h, "/datasets", buf.getvalue(), "objects.npz")
    assert r.status_code == 422 and "pickle" in r.json()["detail"]
    assert not canary.exists()
    assert client.get("/models", headers=h).json()["total"] == 0
    assert incoming_is_empty(settings, tenant)


def test_hostile_pt2_archives_never_run_code(api, settings, tmp_path, pt2_bytes):
    """Archives that make torch.export.load run code (proved in a subprocess) are refused or defused here."""
    from zoo.uploads import load_any_model

    client, h, tenant = api
    canary_guard, canary_weight = tmp_path / "canary-guard", tmp_path / "canary-weight"
    canary_other = tmp_path / "canary-other"

    guard = edit_program(
        pt2_bytes,
        lambda p: p.__setitem__(
            "guards_code", [f"__import__('pathlib').Path({str(canary_guard)!r}).touch() is None"]
        ),
    )

    def pickled_weight(name, content):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(content)
            cfg["config"]["conv1.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("data/weights/weight_0"):
            return torch_save_bytes(Canary(canary_weight))
        return content

    weight = rewrite_zip(pt2_bytes, pickled_weight)
    (tmp_path / "guard.pt2").write_bytes(guard)
    (tmp_path / "weight.pt2").write_bytes(weight)

    # The threat is real: stock torch.export.load runs both payloads.
    proof = (
        "import torch, warnings; warnings.simplefilter('ignore')\n"
        f"ep = torch.export.load({str(tmp_path / 'guard.pt2')!r}); ep.module()(torch.randn(2, 1, 8, 8))\n"
        f"try:\n    torch.export.load({str(tmp_path / 'weight.pt2')!r})\nexcept Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", proof], cwd=ROOT, capture_output=True, timeout=300)
    assert canary_guard.exists() and canary_weight.exists(), "torch.export.load no longer runs these payloads"
    canary_guard.unlink()
    canary_weight.unlink()

    # Guards are dropped, never executed: the model itself is fine and is accepted.
    r = upload(client, h, "/models", guard, "guard.pt2")
    assert r.status_code == 201, r.text
    stored = settings.data_dir / "uploads" / tenant / "models" / f"{r.json()['id']}.pt2"
    load_any_model(str(stored)).model(torch.randn(3, 1, 8, 8))
    # Pickled weights are refused.
    r = upload(client, h, "/models", weight, "weight.pt2")
    assert r.status_code == 422 and "pickle" in r.json()["detail"], r.text

    touch = f"__import__('os').system('touch {canary_other}')"

    def target(p):
        for node in p["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.system"

    def expression(p):
        for v in p["graph_module"]["graph"]["tensor_values"].values():
            for size in v["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = touch

    def range_key(p):
        p["range_constraints"] = {touch: {"min_val": 0, "max_val": None}}

    hostile = {
        "call of torch.os.system": edit_program(pt2_bytes, target),
        "code in a shape expression": edit_program(pt2_bytes, expression),
        "code in a range constraint": edit_program(pt2_bytes, range_key),
        "native code": rewrite_zip(
            pt2_bytes,
            lambda n, c: (
                {n: c, "cnn/data/aotinductor/model/m.so": b"\x7fELF"} if n.endswith("byteorder") else c
            ),
        ),
        "legacy pickled weights": rewrite_zip(
            pt2_bytes,
            lambda n, c: {n: c, "cnn/data/weights/model.pt": b"\x80"} if n.endswith("byteorder") else c,
        ),
    }
    for what, content in hostile.items():
        r = upload(client, h, "/models", content, "hostile.pt2")
        assert r.status_code == 422, (what, r.status_code, r.text)
        assert r.json()["detail"], what
    assert not canary_guard.exists() and not canary_weight.exists() and not canary_other.exists()
    assert incoming_is_empty(settings, tenant)
