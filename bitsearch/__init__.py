"""bitsearch: the best per-layer bit-widths for a PyTorch model under hardware budgets.

    import bitsearch

    result = bitsearch.search(model, data, budgets=["avg_wbits=3"], method="fisher", solver="ilp", pareto=20)
    result.front, result.recommendation, result.table          # typed objects; result.to_json() round-trips
    qmodel = bitsearch.quantize(model, result.recommendation.allocation, calibration=data)

`SearchSpec` describes a search (the CLI, the REST API and the workers all take it) and holds every default;
`SearchResult` is what a search returns. The packages underneath (`quant`, `zoo`, `sensitivity`, `search`)
stay importable on their own; this package is the public façade over them.
"""

from .spec import BudgetIn, DataRoles, MethodSpec, RoleData, SearchOptions, SearchSpec, SolverSpec

# The rest loads on first use (PEP 562), so that importing the spec (the REST schema does) pulls in neither
# the sensitivity methods nor the solvers.
_LAZY = {
    "build_spec": "api", "finetune": "api", "quantize": "api", "search": "api", "sensitivity": "api",
    "ResolvedData": "data", "resolve_data": "data", "resolve_training_data": "data",
    "quantizers": "registry", "sensitivity_methods": "registry", "solvers": "registry",
    "Recommendation": "result", "SearchResult": "result",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("ArrayDataset", "as_dataset"):  # re-exported: the one data coercion
        from zoo import data as _data

        return getattr(_data, name)
    raise AttributeError(f"module 'bitsearch' has no attribute {name!r}")


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
