"""Token data for causal language models, and a byte-level text corpus every machine has offline.

Token data is an `.npz` with integer token ids `x` (N×T, any integer dtype but uint8, which means images)
and an optional `attention_mask` (N×T, 1 = real token, 0 = padding). In memory it is an `ArrayDataset`
whose `x` holds the ids (int64) with padding marked as `PAD = -1`, and whose `y` holds the next-token
targets (N×(T-1)), `IGNORE = -100` where the target is padding (PyTorch's `ignore_index`, so
`F.cross_entropy` skips them). The mask travels inside `x`, so slicing, subsets and splits keep it.

`zoo:stdlib-text` is byte-level text (token = byte, vocabulary 256) cut from the Python standard library's
own source files: a fixed list of modules for training and another for held-out evaluation (split by
module, so evaluation text comes from files the model never saw), read in a fixed order, so the corpus is
the same on every machine with the same Python minor version; its SHA-256 is part of the provenance.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from quant.errors import BitsearchError

from .data import ArrayDataset, DatasetSpec, DataSplits, register_dataset

PAD = -1  # padding in `x`
IGNORE = -100  # ignored target in `y` (F.cross_entropy's default ignore_index)
BYTE_VOCAB = 256

#: Standard-library modules the zoo's language models train on (fixed order).
TRAIN_MODULES: tuple[str, ...] = tuple(
    "argparse ast base64 bdb bisect calendar cmd code codecs configparser contextlib copy csv dataclasses "
    "datetime difflib dis enum fnmatch fractions ftplib functools getopt gettext glob gzip heapq hmac imaplib "
    "inspect ipaddress locale mailbox mimetypes netrc numbers optparse os pathlib pdb pickle pkgutil platform "
    "plistlib poplib pprint profile pstats queue quopri random reprlib sched selectors shlex shutil smtplib "
    "socket socketserver statistics string subprocess tarfile tempfile textwrap threading timeit tokenize "
    "trace traceback typing uuid warnings weakref zipfile".split()
)
#: Held-out modules: never trained on; evaluation text comes from these only.
HELDOUT_MODULES: tuple[str, ...] = tuple(
    "fileinput filecmp graphlib linecache operator posixpath sysconfig tabnanny wave zipapp colorsys "
    "compileall secrets stat symtable runpy pyclbr modulefinder py_compile rlcompleter codeop contextvars "
    "copyreg keyword genericpath ntpath tty pty getpass signal".split()
)
assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)

SEQ_LEN = 128
CALIBRATION_SEQS = 256
TEST_SEQS = 384


def is_token_data(data: object) -> bool:
    """True for token data: integer (not float) ids, N×T."""
    x = getattr(data, "x", data)
    return torch.is_tensor(x) and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.uint8


def token_dataset(ids: np.ndarray | torch.Tensor, attention_mask=None, name: str = "tokens") -> ArrayDataset:
    """An `ArrayDataset` of token ids (N×T) with padding as `PAD` in `x` and next-token targets in `y`."""
    x = torch.as_tensor(np.asarray(ids)).to(torch.int64).clone()
    if x.dim() != 2 or x.shape[1] < 2:
        raise BitsearchError(f"token ids must be N×T with T >= 2 (a next token to predict), got {tuple(x.shape)}")
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask))
        if tuple(mask.shape) != tuple(x.shape):
            raise BitsearchError(
                f"attention_mask has shape {tuple(mask.shape)} but x has {tuple(x.shape)}; they must match"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise BitsearchError("attention_mask must be integers or booleans (1 = token, 0 = padding)")
        bad = ~((mask == 0) | (mask == 1))
        if bool(bad.any()):
            raise BitsearchError("attention_mask may only hold 0 (padding) and 1 (token)")
        keep = mask.bool()
        if not bool(keep[:, 0].all()):
            raise BitsearchError(
                "attention_mask pads on the left; pad sequences on the right (first token of every row real)"
            )
        x = x.masked_fill(~keep, PAD)
    y = x[:, 1:].clone()
    y[y < 0] = IGNORE
    if not bool((y != IGNORE).any()):
        raise BitsearchError("the token data have no target token (every sequence is a single token)")
    return ArrayDataset(x, y, name)


def validate_token_ids(x: np.ndarray, path: Path | str, vocab_size: int | None = None) -> None:
    """Integer ids: 2-D, non-negative, below `vocab_size` when given."""
    if x.ndim != 2:
        raise BitsearchError(
            f"x in {path} has dtype {x.dtype} and shape {x.shape}: integer x is token ids and must be N×T "
            "(images are uint8, preprocessed inputs float)"
        )
    if x.shape[0] == 0 or x.shape[1] < 2:
        raise BitsearchError(f"token ids x in {path} need at least one row of 2 tokens, got shape {x.shape}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0:
        raise BitsearchError(f"token ids x in {path} contain negative ids (min {lo}); mark padding with attention_mask")
    if vocab_size is not None and hi >= vocab_size:
        raise BitsearchError(f"token ids x in {path} go up to {hi} but the model's vocabulary has {vocab_size}")


def check_vocab(data: ArrayDataset, vocab_size: int) -> None:
    """A clear error when token ids do not fit the model's vocabulary (before any forward pass)."""
    hi = int(data.x.max())
    if hi >= vocab_size:
        raise BitsearchError(f"{data.name} has token ids up to {hi} but the model's vocabulary has {vocab_size}")


def load_token_npz(x: np.ndarray, mask: np.ndarray | None, path: Path, max_items: int | None) -> ArrayDataset:
    """The token-data branch of `zoo.data.load_npz`."""
    validate_token_ids(x, path)
    if max_items is not None:
        x = x[:max_items]
        mask = None if mask is None else mask[:max_items]
    return token_dataset(x, mask, path.stem)


# ------------------------------------------------------------------------------------------------------------
# The standard-library byte corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def module_bytes(modules: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    """(name, source bytes) of each standard-library module, in the given order; missing ones are an error."""
    root = stdlib_dir()
    out, missing = [], []
    for name in modules:
        path = root / f"{name}.py"
        if not path.is_file():
            missing.append(name)
            continue
        out.append((name, path.read_bytes()))
    if missing:
        raise BitsearchError(
            f"the Python standard library at {root} lacks {', '.join(missing[:5])}; the zoo's text corpus "
            "needs an unstripped CPython install"
        )
    return tuple(out)


def corpus_digest(modules: tuple[str, ...] = TRAIN_MODULES + HELDOUT_MODULES) -> str:
    h = hashlib.sha256()
    for name, data in module_bytes(modules):
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def corpus_provenance() -> dict[str, str]:
    return {
        "corpus": "python-stdlib-bytes",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "corpus_sha256": corpus_digest(),
    }


def byte_stream(modules: tuple[str, ...]) -> torch.Tensor:
    """The modules' bytes concatenated in order (one stream, for training windows)."""
    data = b"".join(src for _, src in module_bytes(modules))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def module_windows(modules: tuple[str, ...], seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` bytes inside each module (a module's tail is dropped)."""
    rows = []
    for _, src in module_bytes(modules):
        n = len(src) // seq_len
        if n:
            t = torch.frombuffer(bytearray(src[: n * seq_len]), dtype=torch.uint8).to(torch.int64)
            rows.append(t.view(n, seq_len))
    return torch.cat(rows)


def stdlib_text_splits(seed: int = 0, seq_len: int = SEQ_LEN) -> DataSplits:
    """Train and calibration windows from the training modules (disjoint), test from the held-out ones.

    Calibration and test are random samples (seeded by `seed`) of CALIBRATION_SEQS and TEST_SEQS windows.
    """
    train = module_windows(TRAIN_MODULES, seq_len)
    test = module_windows(HELDOUT_MODULES, seq_len)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    cal_idx = torch.sort(order[:CALIBRATION_SEQS]).values
    train_idx = torch.sort(order[CALIBRATION_SEQS:]).values
    test_idx = torch.sort(torch.randperm(len(test), generator=g)[:TEST_SEQS]).values
    return DataSplits(
        train=token_dataset(train[train_idx], name="stdlib-text:train"),
        calibration=token_dataset(train[cal_idx], name="stdlib-text:calibration"),
        test=token_dataset(test[test_idx], name="stdlib-text:test"),
    )


register_dataset(
    DatasetSpec(
        "stdlib-text",
        f"byte-level text of Python standard-library sources, {SEQ_LEN}-byte windows: train/calibration from "
        f"{len(TRAIN_MODULES)} modules, test ({TEST_SEQS} windows) from {len(HELDOUT_MODULES)} held-out modules",
        stdlib_text_splits,
    )
)
