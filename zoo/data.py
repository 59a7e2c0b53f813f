"""Data sets as in-memory tensors, loaders for `.npz` files and the bundled digits, and seeded splits.

Everything the search touches (calibration, sensitivity, evaluation) is small enough to hold in memory as one
float32 tensor, already preprocessed, so every later pass is plain slicing with no decode or transform cost.
User files are untrusted: `.npz` is read with `allow_pickle=False` and every malformed input is reported as a
`BitsearchError` that says what is wrong.
"""

from __future__ import annotations

import functools
import math
import numbers
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from quant.errors import BitsearchError

#: Per-channel (mean, std), applied after scaling uint8 pixels to [0, 1].
Normalisation = tuple[Sequence[float], Sequence[float]]

IMAGENET_NORMALISATION: Normalisation = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ArrayDataset:
    """Inputs (N×C×H×W or N×F float32, preprocessed) and optional int64 labels.

    Token data (see `zoo.tokens`) have int64 ids N×T in `x` and next-token targets N×(T-1) in `y`.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    name: str = "data"

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.x) or self.x.dim() < 2:
            raise ValueError("ArrayDataset.x must be a tensor with a leading batch dimension")
        if self.y is not None:
            if not torch.is_tensor(self.y) or self.y.dim() < 1 or len(self.y) != len(self.x):
                raise ValueError("ArrayDataset.y must be a tensor with one label (row) per item of x")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one item (no batch dimension)."""
        return tuple(self.x.shape[1:])

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield `(x, y)` batches (`y` is None without labels); unshuffled batches are views, not copies."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = len(self)
        if not shuffle:
            for i in range(0, n, batch_size):
                yield self.x[i : i + batch_size], None if self.y is None else self.y[i : i + batch_size]
            return
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.x[idx], None if self.y is None else self.y[idx]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The items at `indices`, in that order (copies)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset index out of range for {len(self)} items")
        return ArrayDataset(self.x[idx], None if self.y is None else self.y[idx], self.name)

    def take(self, n: int, seed: int = 0) -> ArrayDataset:
        """A seeded random subset of `n` items; the data set itself when it has no more than `n`."""
        if n < 1:
            raise BitsearchError(f"cannot take {n} items from {self.name}: ask for at least 1")
        if n >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.subset(torch.sort(order).values)


def as_dataset(
    data: object, what: str = "data", normalisation: "Normalisation | None" = None, need_labels: bool = False
) -> ArrayDataset:
    """The one coercion of "data-like" inputs into an `ArrayDataset`.

    Accepts an `ArrayDataset`, anything with tensor `.x` (and optional `.y`), an `(x, y)` pair or a lone `x`
    (torch tensors or numpy arrays: uint8 images N×H×W×C are scaled and normalised as in `load_npz`, floats
    are taken as preprocessed), or a path to an `.npz` file. Labels must be non-negative class indices.
    """
    if isinstance(data, ArrayDataset):
        ds = data
    elif isinstance(data, (str, Path)):
        ds = load_npz(data, normalisation)
    elif hasattr(data, "x") and torch.is_tensor(getattr(data, "x")):
        ds = ArrayDataset(data.x, _labels(getattr(data, "y", None), len(data.x), what), getattr(data, "name", what))
    else:
        if isinstance(data, (tuple, list)) and len(data) == 2:
            x, y = data
        elif torch.is_tensor(data) or isinstance(data, np.ndarray):
            x, y = data, None
        else:
            raise BitsearchError(
                f"{what}: expected an ArrayDataset, an (x, y) pair, an input tensor or array, or an .npz path; "
                f"got {type(data).__name__}"
            )
        if isinstance(x, np.ndarray):
            x = _images_to_tensor(x, normalisation) if x.dtype == np.uint8 else torch.from_numpy(
                np.ascontiguousarray(x, dtype=np.float32))
        if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] == 0:
            raise BitsearchError(f"{what}: the inputs must be a non-empty array with a leading batch dimension")
        ds = ArrayDataset(x.float() if not x.is_floating_point() else x, _labels(y, len(x), what), what)
    if need_labels and ds.y is None:
        raise BitsearchError(f"{what} has no labels; they are needed here")
    return ds


def _labels(y: object, n: int, what: str) -> torch.Tensor | None:
    if y is None:
        return None
    t = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y)
    if t.dim() != 1 or len(t) != n:
        raise BitsearchError(f"{what}: {n} inputs need one label each (a 1-D array of {n})")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise BitsearchError(f"{what}: labels must be integer class indices")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= MAX_CLASSES):
        raise BitsearchError(f"{what}: labels must be class indices in 0..{MAX_CLASSES - 1}")
    return t.long()


#: Labels above this are not class indices (a label of 2**40 would size a 2**40-wide one-hot).
MAX_CLASSES = 100_000


@dataclass
class DataSplits:
    """Disjoint parts of one data set; a part is None when it is empty or unavailable."""

    train: ArrayDataset | None
    calibration: ArrayDataset | None
    test: ArrayDataset | None


# ------------------------------------------------------------------------------------------------------------
# .npz files


def _read_array(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        arr = npz[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise BitsearchError(
                f"array '{key}' in {path} is an object array, which only loads through pickle; pickled "
                "arrays are refused for safety (pickle can run arbitrary code). Save plain numeric arrays."
            ) from exc
        raise BitsearchError(f"array '{key}' in {path} cannot be read: {exc}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise BitsearchError(f"array '{key}' in {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(arr, np.ndarray):  # numpy returns a member that is not NPY data as raw bytes
        raise BitsearchError(f"member '{key}' in {path} is not an NPY array; save arrays with numpy.savez")
    return arr


def _not_npz_hint(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array; save inputs and labels with numpy.savez(path, x=..., y=...)"
    if head[:1] == b"\x80":
        return "it looks like a pickle, and pickled data is refused for safety (it can run arbitrary code)"
    return "expected the output of numpy.savez or numpy.savez_compressed"


def _check_normalisation(normalisation: Normalisation, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        mean = torch.tensor([float(v) for v in normalisation[0]], dtype=torch.float32)
        std = torch.tensor([float(v) for v in normalisation[1]], dtype=torch.float32)
    except (TypeError, ValueError, IndexError) as exc:
        raise BitsearchError(f"normalisation must be (mean, std), two sequences of numbers: {exc}") from exc
    for label, t in (("mean", mean), ("std", std)):
        if len(t) not in (1, channels):
            raise BitsearchError(
                f"normalisation {label} has {len(t)} values but the images have {channels} channel(s)"
            )
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
        raise BitsearchError("normalisation std must be positive and mean/std finite")
    return mean, std


def _images_to_tensor(x: np.ndarray, normalisation: Normalisation | None) -> torch.Tensor:
    """uint8 N×H×W[×C] → float32 N×C×H×W in [0, 1], then `(x - mean) / std` per channel."""
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    out.copy_(torch.from_numpy(x).permute(0, 3, 1, 2))  # one pass: transpose and convert
    # Same operation order as the usual torchvision pipeline (ToTensor, Normalize): results match bit for bit.
    out.div_(255.0)
    if normalisation is not None:
        mean, std = _check_normalisation(normalisation, c)
        out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return out


def check_x_layout(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> None:
    """The shape and dtype rules for `x` (from an array or from its NPY header alone)."""
    if len(shape) == 0 or shape[0] == 0:
        raise BitsearchError(f"x in {path} is empty (shape {shape}); it needs at least one item")
    if math.prod(shape[1:]) == 0:
        raise BitsearchError(f"x in {path} has an empty item shape {shape[1:]}")
    if dtype == np.uint8:
        if len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4)):
            return
        raise BitsearchError(
            f"x in {path} is uint8 with shape {shape}: images must be N×H×W (grayscale) or N×H×W×C with "
            "C = 1, 3 or 4 (channels last)"
        )
    if dtype.kind == "f":
        if len(shape) < 2:
            raise BitsearchError(f"x in {path} has shape {shape}: float inputs must be N×F or N×C×H×W")
        return
    if dtype.kind in "iu":  # token ids of a language model (zoo.tokens): N×T
        if len(shape) == 2:
            return
        raise BitsearchError(f"x in {path} is integer with shape {shape}: token ids must be N×T")
    raise BitsearchError(
        f"x in {path} has dtype {dtype}; expected uint8 images (N×H×W×C, scaled by 1/255 here), integer token "
        "ids (N×T) or float inputs that are already preprocessed (N×C×H×W or N×F)"
    )


def _validate_x(x: np.ndarray, path: Path) -> None:
    check_x_layout(x.shape, x.dtype, path)
    if x.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - np.count_nonzero(finite))
            first = int(np.argwhere(~finite.reshape(len(x), -1).all(axis=1))[0, 0])
            raise BitsearchError(
                f"x in {path} contains {bad} NaN or infinite value(s) (first in item {first}); "
                "clean the data before quantizing"
            )


def check_y_layout(shape: tuple[int, ...], dtype: np.dtype, n: int, path: Path) -> None:
    """The shape and dtype rules for `y` (from an array or from its NPY header alone)."""
    if dtype.kind not in "iu":
        raise BitsearchError(
            f"y in {path} has dtype {dtype}; labels must be integer class indices (e.g. y.astype('int64'))"
        )
    if len(shape) != 1:
        raise BitsearchError(f"y in {path} has shape {shape}; labels must be 1-D, one class index per item")
    if shape[0] != n:
        raise BitsearchError(f"y in {path} has {shape[0]} labels but x has {n} items; they must match")


def _validate_y(y: np.ndarray, n: int, path: Path) -> torch.Tensor:
    check_y_layout(y.shape, y.dtype, n, path)
    if y.dtype.kind == "i" and len(y) and int(y.min()) < 0:
        raise BitsearchError(f"y in {path} contains negative labels (min {int(y.min())}); classes start at 0")
    if len(y) and int(y.max()) >= MAX_CLASSES:
        raise BitsearchError(
            f"y in {path} has a label of {int(y.max())}; labels are class indices below {MAX_CLASSES}"
        )
    return torch.from_numpy(y.astype(np.int64, copy=False)).clone()


def load_npz(
    path: str | Path, normalisation: Normalisation | None = None, max_items: int | None = None
) -> ArrayDataset:
    """Load `x` (and optional `y`) from an `.npz` file without ever unpickling.

    `x` as uint8 is images, N×H×W×C (C = 1, 3, 4) or N×H×W: scaled to [0, 1], made N×C×H×W, then normalised
    per channel with `normalisation = (mean, std)` when given. `x` as float is taken as already preprocessed
    (N×C×H×W or N×F) and `normalisation` is ignored for it. `y`, when present, is 1-D integer class indices.
    `x` as another integer dtype (int16/32/64, uint16/32) is token ids, N×T, with an optional
    `attention_mask` (see `zoo.tokens`). `max_items` keeps only the first items (cheap previews of big files).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BitsearchError(f"data file {p} does not exist")
    if not p.is_file():
        raise BitsearchError(f"data path {p} is not a file")
    if max_items is not None and max_items < 1:
        raise BitsearchError(f"max_items must be at least 1, got {max_items}")
    if not zipfile.is_zipfile(p):
        raise BitsearchError(f"{p} is not an .npz archive: {_not_npz_hint(p)}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise BitsearchError(f"{p} is not an .npz archive")
            keys = list(npz.files)
            if "x" not in keys:
                found = ", ".join(repr(k) for k in keys) or "no arrays"
                raise BitsearchError(
                    f"{p} has no array named 'x' (found {found}); save inputs as x=... and labels as y=..."
                )
            x = _read_array(npz, "x", p)
            y = _read_array(npz, "y", p) if "y" in keys else None
            mask = _read_array(npz, "attention_mask", p) if "attention_mask" in keys else None
    except BitsearchError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BitsearchError(f"cannot read {p} as an .npz archive: {exc}") from exc
    if x.dtype.kind in "iu" and x.dtype != np.uint8:  # token ids (uint8 stays images)
        from .tokens import load_token_npz

        if y is not None:
            raise BitsearchError(f"{p} holds token ids: its targets are the next tokens of x; drop 'y'")
        return load_token_npz(x, mask, p, max_items)
    _validate_x(x, p)
    n = len(x)
    labels = _validate_y(y, n, p) if y is not None else None
    if max_items is not None and max_items < n:
        x = x[:max_items]
        labels = None if labels is None else labels[:max_items].clone()
    if x.dtype == np.uint8:
        xt = _images_to_tensor(x, normalisation)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    return ArrayDataset(xt, labels, p.stem)


# ------------------------------------------------------------------------------------------------------------
# Splits


def _test_count(test: float | int, n: int) -> int:
    if isinstance(test, bool) or not isinstance(test, numbers.Real):
        raise BitsearchError(f"test must be a fraction in [0, 1) or a whole count, got {test!r}")
    if not isinstance(test, numbers.Integral):
        test = float(test)
    if isinstance(test, float) and not test.is_integer():
        if not 0.0 < test < 1.0:
            raise BitsearchError(f"test fraction must be in [0, 1), got {test}")
        return max(1, round(test * n))
    if isinstance(test, float) and test < 1.0:  # 0.0
        return 0
    count = int(test)
    if count < 0:
        raise BitsearchError(f"test count must not be negative, got {test}")
    return count


def split(ds: ArrayDataset, calibration: int = 256, test: float | int = 0.2, seed: int = 0) -> DataSplits:
    """Seeded, disjoint train / calibration / test parts of `ds`.

    `test` is a fraction of `ds` (a float below 1) or a count; `calibration` is a count; train gets the rest.
    Items keep their original order inside each part.
    """
    n = len(ds)
    if isinstance(calibration, bool) or not isinstance(calibration, numbers.Integral) or calibration < 0:
        raise BitsearchError(f"calibration must be a count of items (0 or more), got {calibration!r}")
    calibration = int(calibration)
    n_test = _test_count(test, n)
    if calibration + n_test > n:
        raise BitsearchError(
            f"{ds.name} has {n} items, too few for {calibration} calibration + {n_test} test items; "
            "lower the counts or use a larger data set"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = (order[n_test + calibration :], order[n_test : n_test + calibration], order[:n_test])
    out = []
    for label, idx in zip(("train", "calibration", "test"), parts):
        if len(idx) == 0:
            out.append(None)
            continue
        sub = ds.subset(torch.sort(idx).values)
        sub.name = f"{ds.name}:{label}"
        out.append(sub)
    return DataSplits(*out)


# ------------------------------------------------------------------------------------------------------------
# Bundled digits (scikit-learn ships them: no download, ever)

DIGITS_TEST = 360
DIGITS_CALIBRATION = 240
#: Mean/std of the seed-0 train split (pixels scaled to [0, 1]); fixed, because the zoo's digits models
#: were trained on inputs normalised this way, whatever split seed the data is later drawn with.
DIGITS_NORMALISATION: Normalisation = ((0.30571,), (0.37608,))


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, bunch.target.astype(np.int64)


def load_digits_arrays(normalise: bool = True) -> ArrayDataset:
    """All 1797 digits as N×1×8×8 (values /16, then `DIGITS_NORMALISATION` when `normalise`)."""
    x_np, y_np = _digits_arrays()
    x = torch.from_numpy(x_np.copy())
    if normalise:
        (mean,), (std,) = DIGITS_NORMALISATION
        x.sub_(mean).div_(std)
    return ArrayDataset(x, torch.from_numpy(y_np.copy()), "digits")


def load_digits_splits(seed: int = 0) -> DataSplits:
    """scikit-learn's 8×8 digits: 360 test, 240 calibration, 1197 train images, normalised."""
    return split(load_digits_arrays(), calibration=DIGITS_CALIBRATION, test=DIGITS_TEST, seed=seed)


# ------------------------------------------------------------------------------------------------------------
# Data references (what the CLI's --data accepts)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set bitsearch can produce by name, already split."""

    name: str
    description: str
    loader: Callable[[int], DataSplits]  # seed -> splits
    normalisation: Normalisation | None = None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[DatasetSpec]:
    return [DATASETS[k] for k in sorted(DATASETS)]


register_dataset(
    DatasetSpec(
        "digits",
        "scikit-learn's bundled 8×8 handwritten digits, 10 classes (360 test / 240 calibration / 1197 train)",
        load_digits_splits,
        DIGITS_NORMALISATION,
    )
)


def load_data(
    ref: str | Path,
    normalisation: Normalisation | None = None,
    *,
    max_items: int | None = None,
    seed: int = 0,
) -> Union[ArrayDataset, DataSplits]:
    """Resolve a `--data` reference.

    `"zoo:NAME"` gives that data set's fixed `DataSplits` (its own preprocessing; `normalisation` and
    `max_items` do not apply; `seed` picks the split). Anything else is a path to an `.npz` file and gives
    one `ArrayDataset` (see `load_npz`), which the caller may `split`.
    """
    text = str(ref)
    if text.startswith("zoo:"):
        name = text[4:]
        spec = DATASETS.get(name)
        if spec is None:
            known = ", ".join(f"zoo:{k}" for k in sorted(DATASETS)) or "none"
            raise BitsearchError(f"unknown zoo data set {text!r}; known: {known}")
        return spec.loader(seed)
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(f"zoo:{k}" for k in sorted(DATASETS))
        raise BitsearchError(f"data file {path} does not exist (zoo data sets: {known})")
    return load_npz(path, normalisation, max_items)
