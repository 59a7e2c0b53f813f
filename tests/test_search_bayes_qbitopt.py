"""The measured solvers: `bayes` (Optuna, multi-objective, shared RDB studies) and `qbitopt` (re-allocation
during QAT), on the digits models with tiny trial and step budgets."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from quant.allocation import Allocation, LayerBits
from quant.apply import QuantConfig
from quant.cost import CostModel
from quant.errors import BitsearchError
from quant.qat import QATRecipe
from search import AllocationProblem, measure_front, pareto_front, recommend, solve
from search.solvers import SOLVERS
from search.solvers.bayes import BayesSolver, ptq_scorer
from search.solvers.qbitopt import QBitOptCallback, qbitopt_finetune
from sensitivity import SensitivityOptions, compute_sensitivity

optuna = pytest.importorskip("optuna")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn():
    import zoo

    loaded = zoo.load_model("zoo:digits-cnn")
    splits = zoo.load_digits_splits()
    table = compute_sensitivity(loaded.model, splits.calibration, "fisher",
                                SensitivityOptions(weight_bits=(2, 3, 4, 8), samples=96))
    return loaded, splits, table, CostModel(table.layers)


def scorer_for(cnn):
    loaded, splits, _, _ = cnn
    return ptq_scorer(loaded.model, splits.calibration, splits.calibration, QuantConfig())


def test_both_solvers_are_registered():
    assert {"bayes", "qbitopt"} <= set(SOLVERS)


def test_bayes_solve_meets_the_budget_and_marks_infeasible_trials(cnn, tmp_path):
    _, _, table, cost = cnn
    problem = AllocationProblem(table, cost, ["avg_wbits=3"])
    scorer = scorer_for(cnn)
    url = f"sqlite:///{tmp_path / 'bayes.db'}"
    solver = BayesSolver(scorer=scorer, n_trials=12, storage=url, study_name="one", seed=1)
    sol = solver.solve(problem)
    assert sol.metrics["avg_weight_bits"] <= 3 * (1 + 1e-6)
    assert problem.feasible(sol.choice)
    meta = sol.allocation.metadata["bayes"]
    assert sol.objective == -meta["score"]  # measured top-1, negated: lower is better
    assert scorer(sol.allocation) == pytest.approx(meta["score"])  # the kept score is the scorer's own
    study = optuna.load_study(study_name="one", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 12
    assert any(t.user_attrs.get("warm_start") for t in trials)  # ILP solution and uniform points first
    for t in trials:
        feasible = t.user_attrs["metrics"]["avg_weight_bits"] <= 3 * (1 + 1e-6)
        assert (max(t.constraints.values()) <= 0) == feasible
        assert t.user_attrs["measured"] == feasible
    best = max((t for t in trials if t.user_attrs["measured"]), key=lambda t: t.values[0])
    assert meta["score"] == pytest.approx(best.values[0])
    # the same storage and name for another problem is refused rather than mixed up
    other = AllocationProblem(table, cost, ["avg_wbits=5"])
    with pytest.raises(BitsearchError, match="another problem"):
        BayesSolver(scorer=scorer, n_trials=1, storage=url, study_name="one").solve(other)


def test_bayes_sweep_gives_a_measured_front(cnn):
    loaded, splits, table, cost = cnn
    problem = AllocationProblem(table, cost)
    front = pareto_front(problem, "avg_weight_bits", 6, "bayes", scorer=scorer_for(cnn), n_trials=20, seed=0)
    assert front.solver == "bayes" and front.points
    preds = [p.predicted for p in front.points]
    assert all(a > b for a, b in zip(preds, preds[1:]))  # measured score strictly improves with cost
    assert all("bayes" in p.allocation.metadata for p in front.points)
    measured = measure_front(front, loaded.model, splits.calibration, splits.test)
    rec = recommend(measured, "avg_wbits=4")
    assert rec.metrics["avg_weight_bits"] <= 4 * (1 + 1e-6)


def test_two_workers_share_one_sqlite_study(cnn, tmp_path):
    _, _, table, cost = cnn
    problem = AllocationProblem(table, cost, ["avg_wbits=4"])
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:  # each worker: its own scorer (model copy) and its own storage connections
            solver = BayesSolver(scorer=scorer_for(cnn), n_trials=5, storage=url, study_name="shared", worker=i)
            out[i] = solver.solve(problem)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    study = optuna.load_study(study_name="shared", storage=url)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # 5 each; one fewer in the rare case that both ran the same enqueued trial (SQLite has no row locks)
    assert 9 <= len(done) <= 10
    assert {t.user_attrs["worker"] for t in done} == {"0", "1"}
    for sol in out.values():
        assert problem.feasible(sol.choice)
    # a third worker with a total budget adds only what is missing
    BayesSolver(scorer=scorer_for(cnn), n_trials=10, total_trials=12, storage=url, study_name="shared",
                worker=2).solve(problem)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 12


WORKER = """
import sys
import zoo
from quant.apply import QuantConfig
from quant.cost import CostModel
from search import AllocationProblem
from search.solvers.bayes import BayesSolver, ptq_scorer
from sensitivity.table import SensitivityTable

table = SensitivityTable.load(sys.argv[1])
problem = AllocationProblem(table, CostModel(table.layers), ["avg_wbits=4"])
loaded, splits = zoo.load_model("zoo:digits-cnn"), zoo.load_digits_splits()
scorer = ptq_scorer(loaded.model, splits.calibration, splits.calibration, QuantConfig())
sol = BayesSolver(scorer=scorer, n_trials=3, storage=sys.argv[2], study_name="procs", worker=sys.argv[3]).solve(problem)
assert problem.feasible(sol.choice)
"""


def test_two_processes_share_one_sqlite_study(cnn, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, _, table, _ = cnn
    table.save(tmp_path / "table.json")
    url = f"sqlite:///{tmp_path / 'procs.db'}"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "table.json"), url, f"p{i}"],
                              cwd=root, env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    done = optuna.load_study(study_name="procs", storage=url).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert 5 <= len(done) <= 6 and {t.user_attrs["worker"] for t in done} == {"p0", "p1"}


def test_bayes_needs_a_scorer(cnn):
    _, _, table, cost = cnn
    with pytest.raises(BitsearchError, match="scorer"):
        solve(AllocationProblem(table, cost, ["avg_wbits=4"]), "bayes")


# --- QBitOpt --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    import zoo

    return zoo.load_model("zoo:digits-mlp"), zoo.load_digits_splits()


def test_qbitopt_reallocates_during_qat_and_meets_the_budget(mlp):
    loaded, splits = mlp
    start = Allocation({n: LayerBits(2) for n in ("fc1", "fc2", "fc3")})  # far under budget: bits must move
    result, alloc = qbitopt_finetune(loaded.model, splits.train, ["avg_wbits=4"],
                                     QATRecipe(steps=24, batch_size=64, lr=0.01), weight_bits=(2, 3, 4, 8),
                                     every_k=4, initial=start, calibration=splits.calibration,
                                     eval_data=splits.test)
    info = alloc.metadata["qbitopt"]
    assert info["calls"] == 24 and info["updates"] >= 4  # the hook ran every step, re-solved every 4
    assert info["changes"] >= 1 and alloc != start
    assert result.allocation is alloc
    cm = CostModel(compute_layers(loaded))
    assert cm.cost(alloc).avg_weight_bits <= 4 * (1 + 1e-6)
    # the exact solver used all of the budget it could: no single layer can go up a step and still fit
    assert cm.cost(alloc).avg_weight_bits > 3.0
    assert result.metrics["top1"] > 80


def compute_layers(loaded):
    from quant.layers import discover_layers

    return discover_layers(loaded.model, loaded.example_input)


def test_qbitopt_solver_entry(mlp):
    loaded, splits = mlp
    table = compute_sensitivity(loaded.model, splits.calibration, "fisher",
                                SensitivityOptions(weight_bits=(2, 3, 4, 8), samples=64))
    problem = AllocationProblem(table, CostModel(table.layers), ["avg_wbits=3"])
    with pytest.raises(BitsearchError, match="qbitopt_finetune"):
        solve(problem, "qbitopt")
    sol = solve(problem, "qbitopt", model=loaded.model, train_data=splits.train, every_k=3,
                recipe=QATRecipe(steps=9, batch_size=64), calibration=splits.calibration)
    assert problem.feasible(sol.choice) and sol.metrics["avg_weight_bits"] <= 3 * (1 + 1e-6)
    assert any("re-solves" in n for n in sol.notes)


def test_qbitopt_callback_validates_its_arguments(mlp):
    loaded, _ = mlp
    layers = compute_layers(loaded)
    with pytest.raises(BitsearchError, match="exact solver"):
        QBitOptCallback(lambda t: None, 5, layers, [LayerBits(4)], solver="lp")
    with pytest.raises(BitsearchError, match="activation_part"):
        QBitOptCallback(lambda t: None, 5, layers, [LayerBits(4, 4), LayerBits(4, 8)])
    assert np.isfinite(QBitOptCallback(lambda t: None, 5, layers, [LayerBits(4)]).freeze_at)
