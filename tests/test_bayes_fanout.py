"""bayes trials fanned out over worker processes (`BayesFanout`, `search.trials`): trials spread over runners and
feed the front, a runner SIGKILLed mid-trial costs one re-run and no double count, a stopped study starts no
further trial and keeps what it finished."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quant.errors import BitsearchError
from search import AllocationProblem, pareto_front
from search.solvers.bayes import BayesFanout, BayesSolver, ProblemSnapshot, build_scorer
from search.trials import load_fanout_study, progress_of, run_trials, stop_study
from sensitivity import SensitivityOptions, compute_sensitivity
from tests import trial_objectives  # noqa: F401  (registers the "test-digits-ptq" scorer builder)
from tests.helpers import kill_once_marked
from tests.test_search_bayes_qbitopt import one_thread  # noqa: F401  (autouse: one torch thread per test)

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
RUNNER = (
    "import sys; from tests import trial_objectives; import search.solvers.bayes; "
    "from search.trials import run_trials; r = run_trials(sys.argv[1], sys.argv[2], worker=sys.argv[3]); "
    "print('ran', r.ran)"
)


@pytest.fixture(scope="module")
def problem():
    import zoo

    loaded = zoo.load_model("zoo:digits-mlp")
    table = compute_sensitivity(loaded.model, zoo.load_digits_splits().calibration, "fisher",
                                SensitivityOptions(weight_bits=(2, 3, 4, 8), samples=64))
    return AllocationProblem(table, budgets=["avg_wbits=6"])


def _runner(url: str, study: str, wid: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", RUNNER, url, study, wid], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _solver(tmp_path: Path, n: int, submit, seconds: float = 0.0, **fan) -> tuple[BayesSolver, str]:
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    ref = {"builder": "test-digits-ptq", "config": {"marker_dir": str(markers), "seconds": seconds}}
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fan.setdefault("heartbeat_interval", 1)
    fan.setdefault("grace_period", 2)
    fanout = BayesFanout(url, ref, workers=2, submit_trial_jobs=submit, worker="main", **fan)
    return BayesSolver(scorer=build_scorer(ref), n_trials=n, study_name="bayes-fan", fanout=fanout), url


def test_snapshot_prices_allocations_like_the_problem(problem):
    import json

    import numpy as np

    snap = ProblemSnapshot.from_dict(json.loads(json.dumps(ProblemSnapshot.of(problem).to_dict())))
    rng = np.random.default_rng(0)
    for _ in range(5):
        vc = np.array([rng.choice(np.flatnonzero(problem.structural_allowed[g])) for g in range(problem.n_vars)])
        params = dict(zip(snap.names, [snap.labels[g][list(snap.index[g].values()).index(int(k))]
                                       for g, k in enumerate(vc)]))
        choice = snap.layer_choice(params)
        assert (choice == problem.expand(vc)).all()
        _, want = problem.evaluate(choice)
        assert snap.metrics(choice) == pytest.approx(want)
        alloc = snap.allocation(choice, want)
        assert alloc.layers == problem.to_allocation(choice).layers


def test_fanout_settings_are_validated(tmp_path):
    with pytest.raises(BitsearchError, match="workers"):
        BayesFanout("sqlite:///x.db", {"builder": "b"}, workers=0)
    with pytest.raises(BitsearchError, match="trial_timeout"):
        BayesFanout("sqlite:///x.db", {"builder": "b"}, trial_timeout=-1)
    with pytest.raises(BitsearchError, match="TPE"):
        BayesSolver(scorer=lambda a: 0.0, sampler="random", fanout=BayesFanout("sqlite:///x.db", {"builder": "b"}))
    with pytest.raises(BitsearchError, match="cannot build the scorer"):
        build_scorer({"builder": "nope", "config": {}})


def test_trials_spread_over_two_processes_and_feed_the_front(problem, tmp_path):
    procs: list[subprocess.Popen] = []

    def submit(url, study, n):
        procs.extend(_runner(url, study, f"proc{i}") for i in range(n))
        deadline = time.monotonic() + 120  # let the runner start its first trial, then run trials here too
        while not list((tmp_path / "markers").glob(f"scoring-{procs[0].pid}-*")):
            assert procs[0].poll() is None, procs[0].communicate()
            assert time.monotonic() < deadline, "the runner never started a trial"
            time.sleep(0.1)
        return [str(p.pid) for p in procs]

    solver, url = _solver(tmp_path, 10, submit, seconds=0.4)
    front = pareto_front(problem, "avg_weight_bits", 4, solver)
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    study, _ = load_fanout_study(url, "bayes-fan")
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in trials].count("COMPLETE") == 10 and len(trials) == 10  # none twice
    assert {t.user_attrs["worker"] for t in trials} == {"main", "proc0"}  # both runners ran trials
    assert solver.trial_jobs == [str(procs[0].pid)]
    # the front is made of the study's measured trials, each with its trial and score
    assert front.points
    for pt in front.points:
        meta = pt.allocation.metadata["bayes"]
        t = study.trials[meta["trial"]]
        assert t.user_attrs["measured"] and meta["score"] == t.values[0]
        assert pt.metrics["avg_weight_bits"] <= 6 + 1e-9


def test_runner_killed_mid_trial_is_rerun_once_never_counted_twice(problem, tmp_path):
    markers = tmp_path / "markers"

    def submit(url, study, n):  # one runner, killed while it scores its first trial
        victim = _runner(url, study, "victim", {"BITSEARCH_TEST_SLOW_TRIAL": "120"})
        kill_once_marked(victim, markers, "scoring-*", "runner")
        return ["victim"]

    solver, url = _solver(tmp_path, 6, submit)
    sol = solver.solve(problem)
    assert problem.feasible(sol.choice)
    study, _ = load_fanout_study(url, "bayes-fan")
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 6, states
    killed = next(t for t in trials if t.state.name == "FAIL")
    assert killed.user_attrs["worker"] == "victim"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == killed.params
    assert progress_of(trials).done == 6


def test_cancelled_runner_stops_and_stopped_study_starts_no_trial(problem, tmp_path):
    markers = tmp_path / "markers"
    # told to stop once four allocations were scored: it ends between (or inside) trials, with an error
    # when no `on_cancel` says otherwise (the service ends the job cancelled)
    solver, url = _solver(tmp_path, 40, None, stop=lambda: len(list(markers.glob("scoring-*"))) >= 4)
    solver.fanout.workers = 1
    with pytest.raises(BitsearchError, match="stopped"):
        solver.solve(problem)
    study, _ = load_fanout_study(url, "bayes-fan")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") >= 3 and "RUNNING" not in states and len(states) < 40
    finished = states.count("COMPLETE")
    # The study marked stopped: a late runner (a re-delivered trial job) starts nothing; nothing is lost.
    assert stop_study(url, "bayes-fan")
    run = run_trials(url, "bayes-fan", worker="late")
    assert run.cancelled and run.ran == 0
    assert [t.state.name for t in load_fanout_study(url, "bayes-fan")[0].get_trials()].count("COMPLETE") == finished
    assert not stop_study(url, "absent")
