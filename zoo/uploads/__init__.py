"""Uploaded models and data: readers that never run code from the file, and a `LoadedModel` for each.

Three upload formats are accepted:

* a ``torch.export`` archive (``.pt2``) of any architecture;
* safetensors weights for a zoo architecture (``zoo:NAME``);
* an ``.npz`` data set (read with ``allow_pickle=False`` by `zoo.data.load_npz`).

Pickles (``torch.save`` files, ``.pt``/``.pth``, raw pickle streams) are refused before anything reads them.

Modules: `sniff` (what a file is, pickle refusal), `archive` (reading ``.pt2`` archives safely), `rebuild`
(exported program -> module with real layers), `npz` (``.npz`` limits checked from the headers before any
array is read) and `describe` (what the service stores about an upload).
"""

from .archive import PT2_MODEL_NAME, load_exported_program
from .describe import inspect_dataset_upload, inspect_exported_upload, inspect_safetensors_upload
from .npz import NpzLimits, NpzTooLarge, describe_npz, read_npz_headers
from .rebuild import UploadedModelSpec, exported_to_module, load_any_model, load_exported_model
from .sniff import PICKLE_REFUSED, UnsafeUploadError, sha256_file, sniff_model_format

__all__ = [
    "NpzLimits",
    "NpzTooLarge",
    "PICKLE_REFUSED",
    "PT2_MODEL_NAME",
    "UnsafeUploadError",
    "UploadedModelSpec",
    "describe_npz",
    "exported_to_module",
    "inspect_dataset_upload",
    "inspect_exported_upload",
    "inspect_safetensors_upload",
    "load_any_model",
    "load_exported_model",
    "load_exported_program",
    "read_npz_headers",
    "sha256_file",
    "sniff_model_format",
]
