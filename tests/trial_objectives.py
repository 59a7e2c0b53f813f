"""Trial objectives for the fan-out tests: cheap, and slow on demand so a worker can be killed mid-trial."""

from __future__ import annotations

import os
import time
from pathlib import Path

from search.solvers.scorers import register_scorer_builder
from search.trials import register_objective


@register_objective("test-quadratic")
def quadratic(config):
    marker_dir = Path(config["marker_dir"])

    def objective(trial, ctx):
        x = trial.suggest_float("x", -4.0, 4.0)
        (marker_dir / f"started-{trial.number}-{os.getpid()}").touch()
        # BITSEARCH_TEST_SLOW_TRIAL: seconds this process spends in each trial (so a test can kill it mid-trial)
        end = time.monotonic() + float(os.environ.get("BITSEARCH_TEST_SLOW_TRIAL", config.get("seconds", 0.0)))
        while time.monotonic() < end:
            ctx.check()
            time.sleep(0.05)
        ctx.check()
        (marker_dir / f"finished-{trial.number}-{os.getpid()}").touch()
        return [(x - 1.0) ** 2]

    return objective


@register_scorer_builder("test-digits-ptq")
def digits_ptq(config):
    """PTQ of a digits model on the zoo's calibration split (a bayes fan-out's scorer, rebuilt in each process);
    `marker_dir`: a file per call, `seconds` (or BITSEARCH_TEST_SLOW_TRIAL) spent in each call."""
    import zoo
    from quant.apply import QuantConfig
    from search.solvers.scorers import ptq_scorer

    loaded = zoo.load_model(config.get("model", "zoo:digits-mlp"))
    splits = zoo.load_digits_splits()
    inner = ptq_scorer(loaded.model, splits.calibration, splits.calibration, QuantConfig())
    marker_dir = Path(config["marker_dir"])

    def scorer(allocation):
        marker = marker_dir / f"scoring-{os.getpid()}-{time.monotonic_ns()}"
        marker.touch()
        time.sleep(float(os.environ.get("BITSEARCH_TEST_SLOW_TRIAL", config.get("seconds", 0.0))))
        return inner(allocation)

    scorer.direction = inner.direction
    return scorer
