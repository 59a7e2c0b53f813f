"""The plug-in registries (one `quant.registry.Registry` implementation each) and the capability checks a
search spec must pass before anything is queued."""

from __future__ import annotations

from quant.errors import BitsearchError
from quant.quantizers import QUANTIZERS as quantizers
from search.solvers import SOLVERS as solvers
from sensitivity import METHODS as sensitivity_methods


def check_runnable(spec, *, labelled: bool | None = None, has_train: bool = False, gpu: bool = False) -> None:
    """Refuse (BitsearchError) a spec whose plug-ins need what the search pipeline cannot give them.

    `labelled`: whether the search's data have labels (None: unknown yet); `gpu`: whether a GPU is there.
    """
    for reg, name in ((solvers, spec.solver.name), (sensitivity_methods, spec.sensitivity.method)):
        caps = reg.capabilities(name)
        if caps.needs_scorer:
            raise BitsearchError(
                f"the {name} {reg.kind} needs a measured scorer or a model and training set that a search spec "
                f"cannot pass; run it from Python (search.solvers) or choose one of "
                f"{sorted(n for n in solvers if not solvers.capabilities(n).needs_scorer)}"
            )
        if caps.needs_train and not has_train:
            raise BitsearchError(f"the {name} {reg.kind} needs a training set")
        if caps.needs_labels and labelled is False:
            raise BitsearchError(f"the {name} {reg.kind} needs labelled data")
        if caps.needs_gpu and not gpu:
            raise BitsearchError(f"the {name} {reg.kind} needs a GPU")
        if not caps.runs_in_worker:
            raise BitsearchError(f"the {name} {reg.kind} cannot run in a service worker")


__all__ = ["check_runnable", "quantizers", "sensitivity_methods", "solvers"]
