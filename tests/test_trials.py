"""Trial fan-out over worker processes: lineage counting, a worker SIGKILLed mid-trial, resume, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.trials import Fanout, create_study, load_fanout_study, progress_of, run_trials
from tests import trial_objectives  # noqa: F401  (registers "test-quadratic")
from tests.helpers import kill_once_marked

ROOT = Path(__file__).resolve().parents[1]

WORKER = (
    "import sys; from tests import trial_objectives; from search.trials import run_trials; "
    "r = run_trials(sys.argv[1], sys.argv[2], worker=sys.argv[3]); print('ran', r.ran)"
)


def _worker(url: str, name: str, wid: str, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen([sys.executable, "-c", WORKER, url, name, wid], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    """The study's database: an SQLite file, and the test PostgreSQL when BITSEARCH_TEST_POSTGRES_URL is set."""
    if request.param == "postgres" and not os.environ.get("BITSEARCH_TEST_POSTGRES_URL"):
        pytest.skip("BITSEARCH_TEST_POSTGRES_URL is not set")
    return request.param


def _study(tmp_path: Path, total: int, backend: str = "sqlite", **fan) -> tuple[str, str, Path]:
    import uuid

    if backend == "postgres":  # Optuna's own schema in the shared test database; a study name of its own
        url, name = os.environ["BITSEARCH_TEST_POSTGRES_URL"], "t-" + uuid.uuid4().hex[:12]
    else:
        url, name = f"sqlite:///{tmp_path / 'study.db'}", "s"
    markers = tmp_path / "markers"
    markers.mkdir()
    fan.setdefault("heartbeat_interval", 1)
    fan.setdefault("grace_period", 2)
    create_study(url, name, ["minimize"], "test-quadratic", {"marker_dir": str(markers)}, Fanout(total, **fan))
    return url, name, markers


def test_fanout_settings_are_validated():
    from quant.errors import BitsearchError

    for bad in ({"total_trials": 0}, {"total_trials": 3, "trial_timeout": -1},
                {"total_trials": 3, "heartbeat_interval": 2, "grace_period": 1}, {"total_trials": 3, "max_retry": -1}):
        with pytest.raises(BitsearchError):
            Fanout(**bad)


def test_two_processes_share_one_study_and_stop_at_total(tmp_path, backend):
    url, name, markers = _study(tmp_path, 6, backend)
    procs = [_worker(url, name, f"w{i}", {"BITSEARCH_TEST_SLOW_TRIAL": "0.3"}) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study, _ = load_fanout_study(url, name)
    rows = study.get_trials(deepcopy=False)
    trials = [t for t in rows if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in trials].count("COMPLETE") == 6
    assert len(trials) == 6  # no trial beyond the total, none run twice
    # a trial two workers started at once beyond the total was closed unrun
    assert all(t.state.name == "FAIL" and "claim" not in t.user_attrs for t in rows if t.user_attrs.get("surplus"))
    workers = {t.user_attrs["worker"] for t in trials}
    assert workers == {"w0", "w1"}, workers


def test_worker_killed_mid_trial_is_rerun_once_and_study_resumes(tmp_path, backend):
    url, name, markers = _study(tmp_path, 3, backend, max_retry=1)
    victim = _worker(url, name, "victim", {"BITSEARCH_TEST_SLOW_TRIAL": "120"})
    kill_once_marked(victim, markers, "started-0-*", "worker")
    study, _ = load_fanout_study(url, name)
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["RUNNING"]

    # The study resumes in another worker: the stale trial is failed, re-queued with its parameters and run.
    run = run_trials(url, name, worker="rescuer", poll=0.5)
    assert run.progress.done == 3 and run.progress.complete == 3 and run.progress.running == 0
    study, _ = load_fanout_study(url, name)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 3, states
    killed = trials[0]
    assert killed.state.name == "FAIL" and killed.user_attrs["worker"] == "victim"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1  # re-run once, never twice
    assert retries[0].state.name == "COMPLETE" and retries[0].params == killed.params
    assert retries[0].user_attrs["worker"] == "rescuer"
    # A further call finds the study done and runs nothing.
    again = run_trials(url, name, worker="late")
    assert again.ran == 0 and again.progress.done == 3
    assert progress_of(load_fanout_study(url, name)[0].get_trials()).done == 3


def test_a_trial_lost_before_its_first_heartbeat_is_rerun_once(tmp_path, backend):
    """A worker killed between `ask()` and its trial's first heartbeat leaves a RUNNING trial with no heartbeat
    row, which Optuna's stale check never fails: the study used to wait for it for ever."""
    import warnings

    url, name, _ = _study(tmp_path, 3, backend)
    study, _ = load_fanout_study(url, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lost = study.ask()  # the worker dies here: no heartbeat was ever recorded
    time.sleep(2.5)  # past the grace period (2 s)
    run = run_trials(url, name, worker="w2")
    trials = load_fanout_study(url, name)[0].get_trials(deepcopy=False)
    assert trials[lost.number].state.name == "FAIL"
    assert [t.system_attrs.get("failed_trial") for t in trials].count(lost.number) == 1  # re-run once
    assert run.completed == 3 and progress_of(trials).done == 3


def test_trial_timeout_fails_the_trial_and_counts_it_once(tmp_path, monkeypatch):
    url, name, markers = _study(tmp_path, 2, trial_timeout=0.3)
    monkeypatch.setenv("BITSEARCH_TEST_SLOW_TRIAL", "5")
    run = run_trials(url, name, worker="w")
    assert run.failed == 2 and run.completed == 0
    study, _ = load_fanout_study(url, name)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 and all(t.state.name == "FAIL" for t in trials)
    assert "timeout" in trials[0].user_attrs["error"]
    assert run.progress.done == 2 and run.progress.failed == 2


def test_unknown_objective_and_missing_study_are_refused(tmp_path):
    from quant.errors import BitsearchError

    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(BitsearchError, match="unknown trial objective"):
        create_study(url, "s", ["minimize"], "nope", {}, Fanout(2))
    with pytest.raises(BitsearchError, match="no fan-out study"):
        run_trials(url, "absent")
