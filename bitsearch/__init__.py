"""bitsearch: the best per-layer bit-widths for a PyTorch model under hardware budgets.

    import bitsearch

    result = bitsearch.search(model, data, budgets=["avg_wbits=3"], method="fisher", solver="ilp", pareto=20)
    result.front, result.recommendation, result.table          # typed objects; result.to_json() round-trips
    qmodel = bitsearch.quantize(model, result.recommendation.allocation, calibration=data)

`SearchSpec` describes a search (the CLI, the REST API and the workers all take it) and holds every default;
`SearchResult` is what a search returns. The packages underneath (`quant`, `zoo`, `sensitivity`, `search`)
stay importable on their own; this package is the public façade over them.
"""

from .api import build_spec, finetune, quantize, search, sensitivity
from .data import ResolvedData, resolve_data, resolve_training_data
from .registry import quantizers, sensitivity_methods, solvers
from .result import Recommendation, SearchResult
from .spec import BudgetIn, DataRoles, MethodSpec, RoleData, SearchOptions, SearchSpec, SolverSpec

from zoo.data import ArrayDataset, as_dataset  # noqa: E402  (re-exported: the one data coercion)

__all__ = [
    "ArrayDataset",
    "BudgetIn",
    "DataRoles",
    "MethodSpec",
    "Recommendation",
    "ResolvedData",
    "RoleData",
    "SearchOptions",
    "SearchResult",
    "SearchSpec",
    "SolverSpec",
    "as_dataset",
    "build_spec",
    "finetune",
    "quantize",
    "quantizers",
    "resolve_data",
    "resolve_training_data",
    "search",
    "sensitivity",
    "sensitivity_methods",
    "solvers",
]
