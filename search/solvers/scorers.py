"""Scorers: callables that measure an allocation (`Allocation -> float`), for the measured searches.

`ptq_scorer` measures by post-training quantization on fixed data; `qat_scorer` by a short quantization-aware
fine-tuning run. A scorer's `direction` ("maximize"/"minimize") tells a search which way is better and its
`describe()` is stored with a study, so a study records what measured its trials.
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


__all__ = ["SCORE_DIRECTIONS", "PTQScorer", "QATScorer", "Scorer", "ptq_scorer", "qat_scorer"]
