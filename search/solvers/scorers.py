"""Scorers: callables that measure an allocation (`Allocation -> float`), for the measured searches.

`ptq_scorer` measures by post-training quantization on fixed data; `qat_scorer` by a short quantization-aware
fine-tuning run. A scorer's `direction` ("maximize"/"minimize") tells a search which way is better and its
`describe()` is stored with a study, so a study records what measured its trials.

Scorers in other processes. A study whose trials run in worker processes cannot ship a scorer object through
its database; it stores a *scorer reference* instead, `{"builder": name, "config": JSON}`, and each worker
rebuilds the scorer with the builder registered under that name (`register_scorer_builder`; the service
registers one that rebuilds model and data from a search spec). A process that already holds the scorer
(the search job itself) lends it with `lend_scorer`, so it is not built twice there.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

from quant.allocation import Allocation
from quant.errors import BitsearchError

Scorer = Callable[[Allocation], float]

#: Scores a scorer may report, and the direction each is optimised in.
SCORE_DIRECTIONS = {"top1": "maximize", "agreement": "maximize", "kl": "minimize", "loss": "minimize"}


class PTQScorer:
    """Post-training quantization score of an allocation on fixed data (see `ptq_scorer`).

    The model is copied, wrapped and calibrated once; each call re-derives the quantizers
    (`quant.apply.set_allocation`) and runs the data once. Calls are serialised by a lock, so threads may
    share one scorer (they then take turns; give each thread its own scorer to measure in parallel).
    """

    def __init__(self, model: Any, calibration: Any, eval_data: Any, quant_config: Any = None, metric: str = "top1"):
        from quant.apply import QuantConfig, collect_statistics, wrap_model
        from zoo.data import as_dataset
        from zoo.evaluate import evaluate

        if metric not in SCORE_DIRECTIONS:
            raise BitsearchError(f"unknown score {metric!r}; known: {sorted(SCORE_DIRECTIONS)}")
        self.metric = metric
        self.direction = SCORE_DIRECTIONS[metric]
        self.config = quant_config or QuantConfig()
        self.data = as_dataset(eval_data, "eval_data")
        if metric in ("top1", "loss") and self.data.y is None:
            raise BitsearchError(f"the {metric} score needs labelled eval data; use metric='kl' without labels")
        self._evaluate = evaluate
        self.reference = evaluate(model, self.data)
        self.qmodel = copy.deepcopy(model).eval()
        layers = wrap_model(self.qmodel, self.config)
        if calibration is not None:
            collect_statistics(self.qmodel, layers, calibration, self.config)
        self.layer_names = list(layers)
        self.calls = 0
        self.seconds = 0.0
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": "ptq", "metric": self.metric, "n": len(self.data), "quant": self.config.to_dict()}

    def __call__(self, allocation: Allocation) -> float:
        from quant.apply import set_allocation

        with self._lock:
            t0 = time.perf_counter()
            set_allocation(self.qmodel, allocation)
            r = self._evaluate(self.qmodel, self.data, reference_logits=self.reference.logits)
            self.calls += 1
            self.seconds += time.perf_counter() - t0
            self.last = r.to_dict()
        value = getattr(r, self.metric)
        if value is None:
            raise BitsearchError(f"the evaluation gave no {self.metric}")
        return float(value)


def ptq_scorer(
    model: Any, calibration: Any, eval_data: Any, quant_config: Any = None, metric: str = "top1"
) -> PTQScorer:
    """A scorer that measures an allocation by PTQ: `metric` of the fake-quantized model on `eval_data`.

    `calibration`: input batches for activation ranges and data-driven weight clipping (may be None when no
    allocation needs them). `eval_data`: an ArrayDataset, an (x, y) pair or an input tensor; keep it apart
    from the data that will finally judge the result. `metric`: "top1" / "agreement" (maximised), "kl" /
    "loss" (minimised); the scorer's `direction` tells the solver which.
    """
    return PTQScorer(model, calibration, eval_data, quant_config, metric)


class QATScorer:
    """Scores an allocation by a short quantization-aware fine-tuning run (`quant.qat.finetune`)."""

    def __init__(self, model: Any, train_data: Any, eval_data: Any, recipe: Any = None, calibration: Any = None,
                 metric: str = "top1"):
        if metric not in ("top1", "loss"):
            raise BitsearchError("a QAT scorer reports top1 or loss")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.recipe, self.calibration, self.metric = recipe, calibration, metric
        self.direction = SCORE_DIRECTIONS[metric]
        self.last: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        return {"kind": "qat", "metric": self.metric, "recipe": None if r is None else r.to_dict()}

    def __call__(self, allocation: Allocation) -> float:
        from quant.qat import finetune

        res = finetune(self.model, allocation, self.train_data, self.recipe, calibration=self.calibration,
                       eval_data=self.eval_data)
        self.last = dict(res.metrics)
        return float(res.metrics[self.metric])


def qat_scorer(model: Any, train_data: Any, eval_data: Any, recipe: Any = None, calibration: Any = None,
               metric: str = "top1") -> QATScorer:
    """A scorer that fine-tunes each allocation briefly (`recipe`, e.g. `QATRecipe(steps=100)`) and reports
    `metric` on `eval_data`. Costly: one QAT run per trial."""
    return QATScorer(model, train_data, eval_data, recipe, calibration, metric)


#: builder name -> factory(config dict) -> Scorer
SCORER_BUILDERS: dict[str, Callable[[dict[str, Any]], Scorer]] = {}
_BUILT: dict[str, Scorer] = {}  # this process's scorers, by their reference (one model and data load each)


def register_scorer_builder(name: str):
    """Decorator: register a factory that rebuilds a scorer from the JSON config of a scorer reference."""

    def deco(factory):
        SCORER_BUILDERS[name] = factory
        return factory

    return deco


def _ref_key(ref: dict[str, Any]) -> str:
    import json

    if not isinstance(ref, dict) or not isinstance(ref.get("builder"), str):
        raise BitsearchError(f"a scorer reference is {{'builder': name, 'config': {{...}}}}, got {ref!r}")
    return json.dumps(ref, sort_keys=True, default=str)


def lend_scorer(ref: dict[str, Any], scorer: Scorer) -> None:
    """Let this process's `build_scorer(ref)` return `scorer` (already built here) instead of building one."""
    _BUILT[_ref_key(ref)] = scorer


def build_scorer(ref: dict[str, Any]) -> Scorer:
    """The scorer of a reference: the one this process already built or was lent, else a new one."""
    key = _ref_key(ref)
    if key not in _BUILT:
        factory = SCORER_BUILDERS.get(ref["builder"])
        if factory is None:
            raise BitsearchError(f"this worker cannot build the scorer {ref['builder']!r}; "
                                 f"known: {sorted(SCORER_BUILDERS)}")
        if len(_BUILT) >= 4:  # a long-lived worker serves many studies: keep the newest few
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = factory(dict(ref.get("config") or {}))
    return _BUILT[key]


__all__ = ["SCORER_BUILDERS", "SCORE_DIRECTIONS", "PTQScorer", "QATScorer", "Scorer", "build_scorer", "lend_scorer",
           "ptq_scorer", "qat_scorer", "register_scorer_builder"]
