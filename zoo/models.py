"""The model zoo: a registry of named models that bitsearch can build, train or load weights for.

Two kinds of entries:
- self-contained models (`digits-cnn`, `digits-mlp`) that the zoo trains on first use, deterministically
  and in a few seconds, then caches as safetensors under `data_dir()/zoo/`, so examples and tests need no
  download;
- architectures whose weights come from a file the user names (`cifar-resnet20` ...), read without ever
  unpickling arbitrary objects (`torch.load(weights_only=True)` or safetensors).
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .data import DIGITS_NORMALISATION, IMAGENET_NORMALISATION, Normalisation, load_digits_splits
from .paths import data_dir
from .resnet import cifar_resnet

ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about one model: how to build it and what it expects as input."""

    name: str
    description: str
    input_shape: tuple[int, ...]  # one sample, (C, H, W) or (F,)
    num_classes: int
    normalisation: Normalisation | None  # (mean, std) applied to [0, 1] pixels; None: inputs used as given
    builder: Callable[[], nn.Module]  # a fresh, randomly initialised model
    needs_weights: bool = False  # pretrained weights must come from a file (else the model is random)
    dataset: str | None = None  # the zoo data reference the model is meant for, e.g. "zoo:digits"
    trainer: Callable[[nn.Module], dict[str, str]] | None = None  # trains in place, returns provenance
    version: int = 1  # part of the cache file name: bump it when the architecture or training changes
    example_input: Callable[[], torch.Tensor] | None = None  # default: randn of (2, *input_shape)

    @property
    def ref(self) -> str:
        return ZOO_PREFIX + self.name


@dataclass
class LoadedModel:
    """A ready-to-use model: eval mode, CPU, plus what the rest of bitsearch needs to feed it."""

    name: str
    model: nn.Module
    example_input: torch.Tensor  # a batch of 2 of `spec.input_shape`, for layer discovery and tracing
    num_classes: int
    normalisation: Normalisation | None
    spec: ModelSpec
    pretrained: bool = True  # False: random weights (no weights file given for a `needs_weights` model)
    source: str = ""  # where the weights came from, for logs and reports
    warnings: list[str] = field(default_factory=list)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add `spec` to the zoo (a second registration under the same name needs `replace=True`)."""
    if spec.name in MODELS and not replace:
        raise ValueError(f"model {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """The registered models, in registration order."""
    return list(MODELS.values())


def get_model_spec(ref: str) -> ModelSpec:
    """The spec for `"zoo:NAME"` or `"NAME"`; an unknown name is an error that lists the known ones."""
    name = str(ref).strip()
    name = name[len(ZOO_PREFIX) :] if name.startswith(ZOO_PREFIX) else name
    spec = MODELS.get(name)
    if spec is None:
        known = ", ".join(s.ref for s in MODELS.values())
        raise BitsearchError(f"unknown zoo model {ref!r}; known models: {known}")
    return spec


# ------------------------------------------------------------------------------------------------------------
# Architectures


class DigitsCNN(nn.Module):
    """Three 3×3 convs with BatchNorm (BN statistics allow data-free calibration), global pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DigitsMLP(nn.Module):
    """64 → 128 → 64 → 10 with ReLU: a tiny model with more than one hidden layer to allocate bits to."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


# ------------------------------------------------------------------------------------------------------------
# Training the self-contained models


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0

    def __call__(self, model: nn.Module) -> dict[str, str]:
        return train_on_digits(model, self)


def train_on_digits(model: nn.Module, recipe: TrainRecipe) -> dict[str, str]:
    """Train `model` in place on the digits train split; return provenance (recipe and test accuracy).

    Deterministic: seeded RNG (forked, so the caller's RNG is untouched) and one intra-op thread while
    training, which also makes these tiny batches several times faster on a busy machine than a contended
    thread pool; the caller's thread count is restored afterwards.
    """
    splits = load_digits_splits(seed=recipe.seed)
    assert splits.train is not None and splits.test is not None
    threads = torch.get_num_threads()
    was_training = model.training
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
            steps_per_epoch = -(-len(splits.train) // recipe.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
            )
            model.train()
            for epoch in range(recipe.epochs):
                for xb, yb in splits.train.batches(recipe.batch_size, shuffle=True, seed=recipe.seed + epoch):
                    loss = F.cross_entropy(model(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            model.eval()
            with torch.inference_mode():
                top1 = (model(splits.test.x).argmax(1) == splits.test.y).double().mean().item() * 100
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return {
        "recipe": f"adam-onecycle epochs={recipe.epochs} batch={recipe.batch_size} lr={recipe.lr}",
        "seed": str(recipe.seed),
        "digits_test_top1": f"{top1:.2f}",
    }


# ------------------------------------------------------------------------------------------------------------
# Weights files


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors layout (u64 header length, then a JSON object), whatever the file is named."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _unpickling_refused(path: Path, exc: Exception) -> BitsearchError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    what = f" (it references {found.group(1)})" if found else ""
    return BitsearchError(
        f"{path} holds pickled Python objects, not just tensors{what}; they are refused for safety because "
        "unpickling can run arbitrary code. Re-save only the weights, e.g. "
        "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)."
    )


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap `{'state_dict': ...}`-style checkpoints and drop DataParallel's `module.` prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise BitsearchError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise BitsearchError(f"{path} holds an empty state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise BitsearchError(f"{path} is not a state dict of tensors: entries {_few(bad)} are not tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a PyTorch checkpoint (`weights_only=True`) or a safetensors file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BitsearchError(f"weights file {p} does not exist")
    if not p.is_file():
        raise BitsearchError(f"weights path {p} is not a file")
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return _extract_state_dict(load_file(str(p), device="cpu"), p)
        except BitsearchError:
            raise
        except Exception as exc:  # safetensors raises its own error types for every malformed header
            raise BitsearchError(f"cannot read {p} as safetensors: {exc}") from exc
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise _unpickling_refused(p, exc) from exc
        raise BitsearchError(f"{p} is not a readable PyTorch checkpoint: {exc}") from exc
    except Exception as exc:  # truncated zip, random bytes, ...: torch raises a zoo of types
        raise BitsearchError(
            f"{p} is not a readable PyTorch checkpoint or safetensors file ({type(exc).__name__}: {exc})"
        ) from exc
    return _extract_state_dict(obj, p)


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """`model.load_state_dict(state)`, with an error that names offending keys when they do not fit.

    A missing BatchNorm `num_batches_tracked` is tolerated: older checkpoints lack it and it does not affect
    inference.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), checkpoint vs model: {_few(wrong)}")
        raise BitsearchError(
            f"the weights in {what} do not fit this architecture ({'; '.join(parts)}); "
            "was the checkpoint saved from a different model, depth or number of classes?"
        )
    non_float = [
        k for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if non_float:
        raise BitsearchError(
            f"the weights in {what} have non-float tensors where floats belong: {_few(non_float)}"
        )
    model.load_state_dict(dict(state), strict=False)


# ------------------------------------------------------------------------------------------------------------
# Loading


def cache_path(spec: ModelSpec) -> Path:
    """Where a zoo-trained model's weights are cached."""
    return data_dir() / "zoo" / f"{spec.name}-v{spec.version}.safetensors"


def _build(spec: ModelSpec) -> nn.Module:
    """A fresh model with a fixed-seed initialisation, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return spec.builder()


def _save_atomic(state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary file and `os.replace`, so readers never see half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is ordinary data
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _trained_model(spec: ModelSpec) -> tuple[nn.Module, str, list[str]]:
    """The zoo-trained model: from the cache when it is readable, else trained now and cached."""
    assert spec.trainer is not None
    notes: list[str] = []
    path = cache_path(spec)
    model = _build(spec)
    if path.exists():
        try:
            load_state_dict_checked(model, read_state_dict(path), f"cached file {path}")
            return model, f"cache {path}", notes
        except BitsearchError as exc:
            notes.append(f"ignored unreadable cached weights ({exc}); retrained")
            model = _build(spec)
    provenance = spec.trainer(model)
    try:
        metadata = {"model": spec.name, "version": str(spec.version), **provenance}
        _save_atomic(model.state_dict(), path, metadata)
        source = f"trained now, cached at {path}"
    except OSError as exc:  # a read-only data dir must not stop the run: the model is already trained
        notes.append(f"could not cache the trained weights at {path}: {exc}")
        source = "trained now (not cached)"
    return model, source, notes


def load_model(ref: str, weights: str | Path | None = None) -> LoadedModel:
    """Build zoo model `ref` (`"zoo:NAME"` or `"NAME"`) with its weights, in eval mode on the CPU.

    `weights` (a PyTorch checkpoint or safetensors file) overrides the zoo's own weights. Without it,
    zoo-trained models come from the cache (trained on first use) and `needs_weights` models are random,
    flagged `pretrained=False` with a warning.
    """
    spec = get_model_spec(ref)
    notes: list[str] = []
    pretrained = True
    if weights is not None:
        model = _build(spec)
        p = Path(weights).expanduser()
        load_state_dict_checked(model, read_state_dict(p), str(p))
        source = f"file {p}"
    elif spec.trainer is not None:
        model, source, notes = _trained_model(spec)
    else:
        model = _build(spec)
        source = "random initialisation"
        if spec.needs_weights:
            pretrained = False
            notes.append(
                f"{spec.ref} has random weights because no weights file was given; accuracy will be at "
                "chance level (pass a checkpoint to get a pretrained model)"
            )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    model.eval()
    example = spec.example_input() if spec.example_input is not None else (
        torch.randn((2, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    )
    return LoadedModel(
        name=spec.name,
        model=model,
        example_input=example,
        num_classes=spec.num_classes,
        normalisation=spec.normalisation,
        spec=spec,
        pretrained=pretrained,
        source=source,
        warnings=notes,
    )


# ------------------------------------------------------------------------------------------------------------
# Registry entries

register_model(
    ModelSpec(
        name="digits-cnn",
        description="3-conv CNN with BatchNorm for 8×8 digits; trained by the zoo on first use (~99 % top-1)",
        input_shape=(1, 8, 8),
        num_classes=10,
        normalisation=DIGITS_NORMALISATION,
        builder=DigitsCNN,
        dataset="zoo:digits",
        trainer=TrainRecipe(epochs=15, batch_size=32, lr=5e-3),
    )
)
register_model(
    ModelSpec(
        name="digits-mlp",
        description="64-128-64-10 MLP for 8×8 digits; trained by the zoo on first use (~98 % top-1)",
        input_shape=(1, 8, 8),
        num_classes=10,
        normalisation=DIGITS_NORMALISATION,
        builder=DigitsMLP,
        dataset="zoo:digits",
        trainer=TrainRecipe(epochs=15, batch_size=32, lr=5e-3),
    )
)
for _depth in (20, 32, 44, 56):
    register_model(
        ModelSpec(
            name=f"cifar-resnet{_depth}",
            description=f"CIFAR ResNet-{_depth} (option-A shortcuts); pretrained weights come from a file",
            input_shape=(3, 32, 32),
            num_classes=10,
            normalisation=IMAGENET_NORMALISATION,
            builder=lambda d=_depth: cifar_resnet(d),
            needs_weights=True,
        )
    )
del _depth
