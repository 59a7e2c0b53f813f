"""Models and data for bitsearch: a model zoo, in-memory data sets and evaluation.

The zoo gives every part of the project (CLI, tests, benchmarks) the same small, reproducible models and
data without downloads: digits models train themselves on first use and are cached as safetensors.
"""

from .data import (
    DIGITS_NORMALISATION,
    IMAGENET_NORMALISATION,
    ArrayDataset,
    DataSplits,
    list_datasets,
    load_data,
    load_digits_splits,
    load_npz,
    split,
)
from .evaluate import EvalResult, evaluate, predict
from .models import LoadedModel, ModelSpec, get_model_spec, list_models, load_model, register_model
from .paths import data_dir
from . import tokens, llm  # noqa: E402,F401  (register zoo:stdlib-text, zoo:tiny-llama)

__all__ = [
    "DIGITS_NORMALISATION",
    "IMAGENET_NORMALISATION",
    "ArrayDataset",
    "DataSplits",
    "EvalResult",
    "LoadedModel",
    "ModelSpec",
    "data_dir",
    "evaluate",
    "get_model_spec",
    "list_datasets",
    "list_models",
    "load_data",
    "load_digits_splits",
    "load_model",
    "load_npz",
    "predict",
    "register_model",
    "split",
]
