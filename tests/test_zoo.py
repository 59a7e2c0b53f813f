"""The model zoo, data loading and evaluation (`zoo/`)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.errors import BitsearchError
from quant.layers import discover_layers
from zoo import (
    DIGITS_NORMALISATION,
    IMAGENET_NORMALISATION,
    ArrayDataset,
    DataSplits,
    data_dir,
    evaluate,
    list_models,
    load_data,
    load_digits_splits,
    load_model,
    load_npz,
    predict,
    split,
)
from zoo.data import DIGITS_CALIBRATION, DIGITS_TEST, load_digits_arrays
from zoo.models import cache_path, get_model_spec
from zoo.resnet import cifar_resnet

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test.npz"
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"
needs_shared = pytest.mark.skipif(
    not (CIFAR_TEST.exists() and RESNET20.exists()), reason=f"shared files not found under {SHARED}"
)


def _quiet_load(ref, weights=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(ref, weights)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Canary:
    """Unpickling this writes a file: proof that a loader ran code it should have refused."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


# ------------------------------------------------------------------------------------------------------------
# Paths


def test_data_dir_follows_env(monkeypatch, tmp_path):
    target = tmp_path / "nested" / "dir"
    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(target))
    assert data_dir() == target and target.is_dir()


# ------------------------------------------------------------------------------------------------------------
# Digits models: trained on first use, deterministic, cached as safetensors


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_digits_model_accuracy_and_cache(name):
    first = _quiet_load(f"zoo:{name}")  # trained now, or by an earlier test of this session
    splits = load_digits_splits()
    assert evaluate(first.model, splits.test).top1 >= 95.0
    assert not first.model.training and first.pretrained

    path = cache_path(first.spec)
    assert path.name == f"{name}-v1.safetensors" and path.parent == data_dir() / "zoo"
    head = path.read_bytes()[:8]
    assert not head.startswith(b"PK") and head[:1] != b"\x80"  # neither a torch zip nor a pickle
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["model"] == name
        assert float(f.metadata()["digits_test_top1"]) >= 95.0

    t0 = time.perf_counter()
    second = load_model(name)
    assert time.perf_counter() - t0 < 2.0
    assert second.source.startswith("cache")
    assert _same_weights(first.model, second.model)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_digits_training_is_deterministic(name, monkeypatch, tmp_path):
    cached = _quiet_load(name)
    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(tmp_path))
    rng_before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    again = load_model(name)
    assert again.source.startswith("trained now")
    assert _same_weights(cached.model, again.model)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert torch.get_num_threads() == threads


def test_unreadable_cache_is_retrained(monkeypatch, tmp_path):
    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(tmp_path))
    path = cache_path(get_model_spec("digits-mlp"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="retrained"):
        loaded = load_model("digits-mlp")
    assert loaded.source.startswith("trained now")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["model"] == "digits-mlp"


# ------------------------------------------------------------------------------------------------------------
# Registry and weights files


def test_registry_and_unknown_model():
    names = [s.name for s in list_models()]
    assert {"digits-cnn", "digits-mlp", "cifar-resnet20", "cifar-resnet56"} <= set(names)
    assert get_model_spec("zoo:digits-cnn") is get_model_spec("digits-cnn")
    with pytest.raises(BitsearchError, match="unknown zoo model.*zoo:digits-cnn.*zoo:cifar-resnet20"):
        load_model("zoo:resnet9000")


def test_resnet_without_weights_is_flagged():
    with pytest.warns(UserWarning, match="random weights"):
        loaded = load_model("zoo:cifar-resnet20")
    assert loaded.pretrained is False and loaded.warnings
    assert loaded.normalisation == IMAGENET_NORMALISATION and loaded.num_classes == 10
    assert tuple(loaded.example_input.shape) == (2, 3, 32, 32)
    assert loaded.model(loaded.example_input).shape == (2, 10)


@needs_shared
def test_resnet20_shared_checkpoint_top1():
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    assert loaded.pretrained and not loaded.warnings
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    assert len(test) == 10_000 and test.sample_shape == (3, 32, 32)
    result = evaluate(loaded.model, test)
    assert result.top1 == pytest.approx(81.03, abs=0.005)
    assert result.loss is not None and result.loss > 0


def _resnet20_state():
    torch.manual_seed(1)
    return {k: v.clone() for k, v in cifar_resnet(20).state_dict().items()}


@pytest.mark.parametrize("variant", ["bare", "prefixed", "wrapped", "safetensors", "safetensors-any-name"])
def test_checkpoint_variants_load(variant, tmp_path):
    state = _resnet20_state()
    if variant == "bare":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif variant == "prefixed":
        path = tmp_path / "w.pth"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif variant == "wrapped":
        path = tmp_path / "w.th"
        torch.save({"best_prec1": 91.0, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif variant == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.bin"
        save_file(state, str(path))
    loaded = load_model("cifar-resnet20", path)
    assert loaded.pretrained and str(path) in loaded.source
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    state = {k: v for k, v in _resnet20_state().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    load_model("cifar-resnet20", tmp_path / "old.pt")


def test_mismatching_checkpoints(tmp_path):
    torch.save(cifar_resnet(32).state_dict(), tmp_path / "r32.pt")
    with pytest.raises(BitsearchError, match=r"unexpected key\(s\): layer1\.3\."):
        load_model("cifar-resnet20", tmp_path / "r32.pt")
    state = _resnet20_state()
    torch.save(state, tmp_path / "r20.pt")
    with pytest.raises(BitsearchError, match=r"missing key\(s\): layer1\.3\."):
        load_model("cifar-resnet32", tmp_path / "r20.pt")
    state["linear.weight"] = torch.zeros(100, 64)
    state["linear.bias"] = torch.zeros(100)
    torch.save(state, tmp_path / "c100.pt")
    with pytest.raises(BitsearchError, match=r"shape mismatch.*linear\.weight \(100, 64\) vs \(10, 64\)"):
        load_model("cifar-resnet20", tmp_path / "c100.pt")


def test_pickled_checkpoint_is_refused_without_running_code(tmp_path):
    canary = tmp_path / "canary.txt"
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"conv1.weight": _Canary(canary)}}, path)
    with pytest.raises(BitsearchError, match="pickled Python objects.*refused for safety"):
        load_model("cifar-resnet20", path)
    assert not canary.exists()
    # The payload is real: a trusting loader would have run it.
    torch.load(path, weights_only=False)
    assert canary.read_text() == "pwned"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable"),
        (b"hello, I am not a checkpoint", "not a readable"),
        (b"PK\x03\x04 truncated zip", "not a readable"),
    ],
)
def test_unreadable_weights(tmp_path, content, message):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(BitsearchError, match=message):
        load_model("cifar-resnet20", path)


def test_weights_that_are_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(BitsearchError, match="not a state dict"):
        load_model("cifar-resnet20", tmp_path / "list.pt")
    torch.save({"conv1.weight": torch.zeros(3), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(BitsearchError, match="epoch"):
        load_model("cifar-resnet20", tmp_path / "mixed.pt")
    with pytest.raises(BitsearchError, match="does not exist"):
        load_model("cifar-resnet20", tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------------------------
# Layer discovery on every zoo model


@pytest.mark.parametrize(
    "name, layers",
    [("digits-cnn", 4), ("digits-mlp", 3), ("cifar-resnet20", 20), ("cifar-resnet32", 32),
     ("cifar-resnet44", 44), ("cifar-resnet56", 56)],
)
def test_discover_layers_on_zoo_models(name, layers):
    loaded = _quiet_load(name)
    assert tuple(loaded.example_input.shape) == (2, *loaded.spec.input_shape)
    found = discover_layers(loaded.model, loaded.example_input)
    assert len(found) == layers
    if name == "cifar-resnet20":
        assert sum(layer.macs for layer in found) == 40_551_040
        assert sum(layer.params for layer in found) == 268_336


# ------------------------------------------------------------------------------------------------------------
# .npz loading


def test_npz_uint8_images_are_scaled_transposed_and_normalised(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4], dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz", IMAGENET_NORMALISATION)
    mean = torch.tensor(IMAGENET_NORMALISATION[0]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALISATION[1]).view(1, 3, 1, 1)
    expected = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert ds.x.shape == (5, 3, 4, 6) and ds.x.dtype == torch.float32 and ds.x.is_contiguous()
    assert torch.equal(ds.x, expected)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 1, 2, 3, 4]
    assert ds.name == "d" and ds.has_labels and len(ds) == 5
    assert len(load_npz(tmp_path / "d.npz", max_items=2)) == 2
    raw = load_npz(tmp_path / "d.npz")
    assert float(raw.x.min()) >= 0.0 and float(raw.x.max()) <= 1.0


def test_npz_grayscale_and_float_inputs(tmp_path):
    np.savez(tmp_path / "g.npz", x=np.zeros((3, 8, 8), np.uint8))
    g = load_npz(tmp_path / "g.npz", ((0.5,), (0.25,)))
    assert g.x.shape == (3, 1, 8, 8) and not g.has_labels and torch.all(g.x == -2.0)
    feats = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.savez(tmp_path / "f.npz", x=feats, y=np.array([1, 0, 1]))
    f = load_npz(tmp_path / "f.npz", IMAGENET_NORMALISATION)  # float inputs are used as given
    assert f.x.dtype == torch.float32 and torch.equal(f.x, torch.from_numpy(feats).float())


def test_npz_object_array_is_refused_without_running_code(tmp_path):
    canary = tmp_path / "canary.txt"
    x = np.empty(2, dtype=object)
    x[0], x[1] = _Canary(canary), 1
    np.savez(tmp_path / "evil.npz", x=x)
    with pytest.raises(BitsearchError, match="pickled arrays are refused"):
        load_npz(tmp_path / "evil.npz")
    assert not canary.exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, r"no array named 'x' \(found 'images'\)"),
        ({"x": np.zeros((4, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "3 labels but x has 4 items"),
        ({"x": np.array([[0.0, np.nan], [1.0, 2.0]])}, "NaN or infinite"),
        ({"x": np.array([[0.0, np.inf]], np.float32)}, "NaN or infinite"),
        ({"x": np.zeros((0, 4, 4), np.uint8)}, "empty"),
        ({"x": np.zeros((2, 4, 4), np.int32)}, "dtype int32"),
        ({"x": np.zeros((2, 4, 4, 5), np.uint8)}, "C = 1, 3 or 4"),
        ({"x": np.zeros((2, 4), np.uint8)}, "images must be"),
        ({"x": np.zeros(4, np.float32)}, "float inputs must be"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.float32)}, "integer class indices"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros((2, 1), np.int64)}, "must be 1-D"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, "negative labels"),
    ],
)
def test_npz_validation(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BitsearchError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_file_errors(tmp_path):
    with pytest.raises(BitsearchError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("just text")
    with pytest.raises(BitsearchError, match="not an .npz archive"):
        load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(BitsearchError, match="single .npy array"):
        load_npz(tmp_path / "single.npy")
    import pickle

    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(BitsearchError, match="pickled data is refused"):
        load_npz(tmp_path / "p.npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(BitsearchError, match="2 values but the images have 3"):
        load_npz(tmp_path / "ok.npz", ((0.1, 0.2), (1.0, 1.0)))


def test_load_data_refs(tmp_path):
    assert isinstance(load_data("zoo:digits"), DataSplits)
    with pytest.raises(BitsearchError, match="unknown zoo data set.*zoo:digits"):
        load_data("zoo:imagenet")
    with pytest.raises(BitsearchError, match="does not exist"):
        load_data(tmp_path / "none.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    assert isinstance(load_data(str(tmp_path / "d.npz")), ArrayDataset)


# ------------------------------------------------------------------------------------------------------------
# Data sets and splits


def _indexed(n: int) -> ArrayDataset:
    """Item i has x = i and y = i % 10, so parts can be checked for overlap by value."""
    return ArrayDataset(torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n) % 10, "idx")


def test_split_is_disjoint_complete_and_seeded():
    ds = _indexed(1000)
    a = split(ds, calibration=100, test=0.2, seed=3)
    ids = [set(p.x.view(-1).long().tolist()) for p in (a.train, a.calibration, a.test)]
    assert [len(s) for s in ids] == [700, 100, 200]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(range(1000))
    assert torch.equal(a.test.y, (a.test.x.view(-1).long() % 10))  # labels travel with their items
    b = split(ds, calibration=100, test=0.2, seed=3)
    parts_a, parts_b = (a.train, a.calibration, a.test), (b.train, b.calibration, b.test)
    assert all(torch.equal(p.x, q.x) for p, q in zip(parts_a, parts_b))
    c = split(ds, calibration=100, test=0.2, seed=4)
    assert not torch.equal(a.test.x, c.test.x)


def test_split_counts_and_errors():
    ds = _indexed(10)
    s = split(ds, calibration=0, test=4)
    assert s.calibration is None and len(s.test) == 4 and len(s.train) == 6
    s = split(ds, calibration=6, test=4)
    assert s.train is None
    s = split(ds, calibration=np.int64(2), test=np.int64(3))  # numpy counts, e.g. from array arithmetic
    assert (len(s.train), len(s.calibration), len(s.test)) == (5, 2, 3)
    with pytest.raises(BitsearchError, match="too few"):
        split(ds, calibration=8, test=0.5)
    with pytest.raises(BitsearchError, match="fraction"):
        split(ds, test=1.5)
    with pytest.raises(BitsearchError, match="calibration"):
        split(ds, calibration=-1)


def test_dataset_batches_subset_take():
    ds = _indexed(10)
    assert [len(x) for x, _ in ds.batches(4)] == [4, 4, 2]
    shuffled = torch.cat([x for x, _ in ds.batches(3, shuffle=True, seed=1)]).view(-1)
    again = torch.cat([x for x, _ in ds.batches(3, shuffle=True, seed=1)]).view(-1)
    assert torch.equal(shuffled, again) and sorted(shuffled.tolist()) == list(range(10))
    assert ds.subset([3, 1]).x.view(-1).tolist() == [3.0, 1.0]
    t = ds.take(4, seed=0)
    assert len(t) == 4 and torch.equal(t.x, ds.take(4, seed=0).x)
    assert ds.take(50) is ds
    with pytest.raises(BitsearchError):
        ds.take(0)
    unlabelled = ArrayDataset(ds.x, None, "u")
    assert not unlabelled.has_labels and all(y is None for _, y in unlabelled.batches(5))


def test_digits_splits():
    s = load_digits_splits()
    sizes = (len(s.train), len(s.calibration), len(s.test))
    assert sizes == (1797 - DIGITS_TEST - DIGITS_CALIBRATION, 240, 360)
    assert s.train.x.shape[1:] == (1, 8, 8) and s.train.y.dtype == torch.int64
    # DIGITS_NORMALISATION is the seed-0 train split's mean/std of the raw [0, 1] pixels.
    raw = split(load_digits_arrays(normalise=False), DIGITS_CALIBRATION, DIGITS_TEST, seed=0).train.x.double()
    (mean,), (std,) = DIGITS_NORMALISATION
    assert raw.mean().item() == pytest.approx(mean, abs=1e-4)
    assert raw.std().item() == pytest.approx(std, abs=1e-4)
    other = load_digits_splits(seed=1)
    assert not torch.equal(other.test.x, s.test.x)


# ------------------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_against_own_logits():
    loaded = _quiet_load("digits-cnn")
    test = load_digits_splits().test
    ref = evaluate(loaded.model, test)
    assert ref.agreement is None and ref.kl is None and ref.logits.shape == (360, 10)
    again = evaluate(loaded.model, test, reference_logits=ref.logits, batch_size=7)
    assert again.agreement == 100.0 and again.kl == pytest.approx(0.0, abs=1e-6)
    assert again.top1 == pytest.approx(ref.top1)
    assert set(again.to_dict()) == {"n", "top1", "agreement", "kl", "loss"} and again.to_dict()["n"] == 360

    # A different model disagrees somewhere and has a positive KL; no labels: no top-1 or loss.
    other = _quiet_load("digits-mlp")
    unlabelled = ArrayDataset(test.x, None, "u")
    r = evaluate(other.model, unlabelled, reference_logits=ref.logits)
    assert r.top1 is None and r.loss is None and r.kl > 0 and 90.0 < r.agreement <= 100.0
    assert torch.equal(predict(other.model, test.x), r.logits)

    with pytest.raises(BitsearchError, match="reference logits have shape"):
        evaluate(other.model, test, reference_logits=ref.logits[:10])
    loaded.model.train()
    predict(loaded.model, test)
    assert loaded.model.training  # the caller's mode is restored
