"""Trial objectives for the fan-out tests: cheap, and slow on demand so a worker can be killed mid-trial."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
