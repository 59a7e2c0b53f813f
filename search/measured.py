"""The searches that measure candidates, run from a search request: `bayes`, `bomp-nas` and `qbitopt`.

The table-driven solvers need only a sensitivity table; these three need more, which the search pipeline
builds here from the request (the service passes a database URL for the studies; see
`service.measured_search`):

- `bayes`: a scorer and a study. The scorer is PTQ on the selection data (default, `scorer: "ptq"`) or a short
  QAFT per trial on the training data (`scorer: "qaft"`, with `qaft_steps`, `qaft_lr`); the Optuna study lives
  in the database it is given (the service's own), named after the search, so a re-run job resumes it. Given
  a scorer reference its workers can rebuild the scorer from (`context["scorer_ref"]`), its trials fan out like
  bomp-nas's (`workers`, `trial_timeout`; `search.solvers.bayes.BayesFanout`).
- `bomp-nas`: a study of architecture + bits trials (`search.solvers.bompnas`) in the service's database, fanned
  out as "study-trials" jobs over the available workers (`workers` settings, the search's own job included);
  a trial lost with a killed worker is re-run once (heartbeats), never counted twice. The front's points
  carry their architecture; the recommended point's trial is re-run (deterministic) and reported on the
  report data, which the study never sees.
- `qbitopt`: a QAT run that re-allocates bits under the budgets (`every_k`, `freeze_at`, the QAT `recipe`),
  checkpointed in the job's folder and resumed from there; its final allocation is one QAT-measured point,
  and the per-layer bits of every re-allocation (`history`) are kept across resumes.

`check_servable` refuses, before anything is queued, a request these methods cannot serve.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from quant.errors import BitsearchError

ProgressFn = Callable[[float, str], None]

MEASURED_SOLVERS = ("bayes", "bomp-nas", "qbitopt")
BAYES_SCORERS = ("ptq", "qaft")


def check_servable(solver: str, settings: dict[str, Any] | None, *, model_ref: str | None, has_train: bool,
                   budgets: Sequence[str] = ()) -> None:
    """Raise `BitsearchError` (a 422 before queueing) when `solver` cannot serve this request, saying what is
    missing. Other solvers pass."""
    settings = dict(settings or {})
    if solver == "bayes":
        scorer = settings.get("scorer", "ptq")
        if scorer not in BAYES_SCORERS:
            raise BitsearchError(f"bayes: scorer must be one of {list(BAYES_SCORERS)}, got {scorer!r}")
        if scorer == "qaft" and not has_train:
            raise BitsearchError("bayes with scorer 'qaft' fine-tunes every trial, so it needs training data: "
                                 "give a data set with a train split (e.g. zoo:digits) or a train role")
        _bayes_settings(settings)
    elif solver == "bomp-nas":
        from search.solvers.bompnas import BompNasConfig, BompNasSettings
        from zoo.families import get_family

        if model_ref is None:
            raise BitsearchError("bomp-nas reshapes a zoo model family: give a zoo model (e.g. zoo:digits-cnn)")
        get_family(model_ref)  # "architecture search cannot reshape ..." for anything else
        if not has_train:
            raise BitsearchError("bomp-nas trains every trial, so it needs training data: give a data set with a "
                                 "train split (e.g. zoo:digits) or a train role")
        BompNasConfig(family=model_ref, budgets=list(budgets), **asdict(BompNasSettings.from_dict(settings)))
    elif solver == "qbitopt":
        from search.solvers.qbitopt import QBitOptSettings

        if not has_train:
            raise BitsearchError("qbitopt re-allocates bits during quantization-aware training, so it needs "
                                 "training data: give a data set with a train split (e.g. zoo:digits) or a train role")
        if not budgets:
            raise BitsearchError("qbitopt re-allocates under budgets: give at least one (e.g. avg_wbits=3)")
        QBitOptSettings(**settings)


# --- bayes ---------------------------------------------------------------------------------------------------


def _bayes_settings(settings: dict[str, Any]):
    from dataclasses import fields

    from search.solvers.bayes import BayesSettings

    known = [f.name for f in fields(BayesSettings)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise BitsearchError(f"bayes: unknown setting(s) {unknown}; it takes {known} (the service sets the "
                             "scorer object and the study itself)")
    return BayesSettings(**settings)


def bayes_solver_options(settings: dict[str, Any], model: Any, calibration: Any, selection: Any, train: Any,
                         quant_config: Any, storage: str | None, study_name: str | None,
                         progress: ProgressFn | None = None) -> dict[str, Any]:
    """The keyword options of `BayesSolver` for a search request: the scorer and the study (`storage`: a URL,
    None: in memory)."""
    st = _bayes_settings(dict(settings or {}))
    scorer = bayes_scorer(settings, model, calibration, selection, train, quant_config)
    return {**st.solver_options(), "scorer": scorer, "storage": storage, "study_name": study_name,
            "progress": progress}


def bayes_scorer(settings: dict[str, Any], model: Any, calibration: Any, selection: Any, train: Any,
                 quant_config: Any) -> Any:
    """The scorer a bayes search request asks for: PTQ on the selection data, or a short QAFT per trial."""
    from search.solvers.scorers import ptq_scorer, qat_scorer

    st = _bayes_settings(dict(settings or {}))
    if selection is None or getattr(selection, "y", None) is None:
        raise BitsearchError("bayes measures every trial: it needs labelled selection data")
    if st.scorer == "qaft":
        from quant.qat import QATRecipe

        if train is None:
            raise BitsearchError("bayes with scorer 'qaft' needs training data")
        recipe = QATRecipe(steps=st.qaft_steps, lr=st.qaft_lr, device="cpu")
        return qat_scorer(model, train, selection, recipe, calibration=calibration)
    return ptq_scorer(model, calibration, selection, quant_config)


def _cancelled(ctx: dict[str, Any], what: str) -> None:
    """A study run ended because it was told to stop: the caller's `on_cancel` says how (the service raises
    its job's cancellation); without one, an error."""
    if ctx.get("on_cancel") is not None:
        ctx["on_cancel"]()
    raise BitsearchError(f"{what} was stopped before its trials were done")


# --- bomp-nas ------------------------------------------------------------------------------------------------


def run_bomp_nas(model_ref: str, weights: str | None, data_ref: str | None, budgets: Sequence[str],
                 settings: dict[str, Any], storage: str, study_name: str, report: Any = None,
                 submit_trial_jobs: Callable[[str, str, int], list[str]] | None = None,
                 progress: ProgressFn | None = None, stop: Callable[[], bool] | None = None,
                 worker: str | None = None, on_cancel: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the BOMP-NAS study of one search; returns the front, the trials and the recommendation.

    `submit_trial_jobs(url, study, n)` queues n "study-trials" jobs (returns their ids); this call runs trials too
    and returns once every lineage of the study is done.
    """
    from search.pareto import ParetoFront, ParetoPoint
    from search.problem import parse_budgets
    from search.solvers.bompnas import BompNasConfig, BompNasSettings, create, front, train_candidate
    from search.trials import load_fanout_study, run_trials
    from zoo.models import get_model_spec

    progress = progress or (lambda f, m: None)
    data_ref = data_ref or get_model_spec(model_ref).dataset
    if data_ref is None:
        raise BitsearchError(f"bomp-nas needs training data for {model_ref}")
    cfg = BompNasConfig(family=model_ref, weights=weights, data=data_ref,
                        budgets=[f"{b.metric}={b.limit!r}" for b in parse_budgets(list(budgets))],
                        **asdict(BompNasSettings.from_dict(settings)))
    url = storage
    t0 = time.perf_counter()
    create(url, study_name, cfg)
    trial_jobs = []
    if submit_trial_jobs is not None and cfg.workers > 1:
        trial_jobs = submit_trial_jobs(url, study_name, cfg.workers - 1)
    progress(0.02, f"bomp-nas: study {study_name}, {cfg.total_trials} trials over {1 + len(trial_jobs)} job(s)")
    total = cfg.total_trials

    def on_trial(p) -> None:
        progress(0.9 * p.done / total, f"bomp-nas: {p.done}/{total} trials done ({p.running} running)")

    run = run_trials(url, study_name, worker=worker, on_trial=on_trial, stop=stop, seed=cfg.seed)
    if run.cancelled:
        _cancelled({"on_cancel": on_cancel}, f"the bomp-nas study {study_name!r}")
    pts = front(url, study_name)
    study, _ = load_fanout_study(url, study_name)
    if not pts:
        states = [t.state.name for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
        raise BitsearchError(
            f"bomp-nas: none of the study's {len(states)} trials ({states.count('COMPLETE')} complete) was a "
            "measured architecture within the budgets; raise total_trials, loosen the budgets, or narrow the "
            "space to smaller shapes"
        )
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):  # closed unrun: two workers started the last trial at once
            continue
        trials.append({
            "number": t.number, "state": t.state.name, "worker": t.user_attrs.get("worker"),
            "score": None if t.values is None else t.values[0], "cost": None if t.values is None else t.values[1],
            "measured": t.user_attrs.get("measured"), "arch": t.user_attrs.get("arch"),
            "retry_of": t.system_attrs.get("failed_trial"), "error": t.user_attrs.get("error"),
        })
    points = []
    from quant.allocation import Allocation

    for p in pts:
        alloc = Allocation.from_dict(p.allocation)
        alloc.metadata.update({"arch": p.arch, "bomp_nas": {"trial": p.trial, "inherited": p.inherited,
                                                            "float_top1": p.float_score}})
        points.append(ParetoPoint(allocation=alloc, predicted=-p.score, metrics=dict(p.metrics), kind="mixed",
                                  label=f"trial {p.trial}", measured={"top1": p.score, "split": "selection"}))
    fr = ParetoFront(metric=cfg.cost_metric, points=points, uniform=[], solver="bomp-nas", table_method="none",
                     budgets=cfg.parsed_budgets(), seconds=time.perf_counter() - t0,
                     notes=[f"bomp-nas: {len(trials)} trial rows, {sum(1 for t in trials if t['state'] == 'COMPLETE')} "
                            f"complete; init {cfg.init}; scores are top-1 on the selection split after QAFT"])
    rec = None
    if pts:
        best = max(range(len(pts)), key=lambda i: (pts[i].score, -pts[i].metrics[cfg.cost_metric]))
        rec = {"index": best, "requested": True, "budgets": [b.to_dict() for b in cfg.parsed_budgets()]}
        if report is not None and getattr(report, "y", None) is not None:
            progress(0.92, "bomp-nas: re-running the recommended trial for the report data")
            p = pts[best]
            again = train_candidate(cfg, p.arch, {n: lb["weight_bits"] for n, lb in p.allocation["layers"].items()})
            from zoo.evaluate import evaluate

            rec["report"] = {**evaluate(again.model, report).to_dict(), "selection_rerun": again.score}
            rec["report"].pop("logits", None)
    progress(1.0, "done")
    return {"front": fr, "trials": trials, "recommendation": rec, "trial_jobs": trial_jobs, "study": study_name,
            "seconds": time.perf_counter() - t0}


# --- qbitopt -------------------------------------------------------------------------------------------------

HISTORY_FILE = "qbitopt-history.json"


def run_qbitopt(model: Any, train: Any, selection: Any, report: Any, budgets: Sequence[str],
                settings: dict[str, Any], weight_bits: Sequence[int], activation_bits: Sequence[int],
                workdir: Path | None = None, progress: ProgressFn | None = None,
                constraints: Any = None) -> dict[str, Any]:
    """QAT with QBitOpt re-allocation, checkpointed in `workdir` and resumed from there; returns the final
    point (QAT-measured on the selection data, reported on the report data) and the bits history."""
    from quant.cost import CostModel
    from quant.layers import discover_layers
    from quant.qat import CHECKPOINT_NAME
    from search.pareto import ParetoFront, ParetoPoint
    from search.problem import parse_budgets
    from search.solvers.qbitopt import QBitOptSettings, qbitopt_finetune
    from zoo.evaluate import evaluate

    progress = progress or (lambda f, m: None)
    s = QBitOptSettings(**(settings or {}))
    recipe = s.qat_recipe()
    if workdir is not None and not recipe.checkpoint_every:
        recipe.checkpoint_every = max(1, min(50, s.every_k))  # a job must survive its worker
    ckpt = workdir / CHECKPOINT_NAME if workdir is not None else None
    resume = ckpt if ckpt is not None and ckpt.exists() else None
    hist_path = workdir / HISTORY_FILE if workdir is not None else None
    history: list[dict[str, Any]] = []
    if resume is not None and hist_path is not None and hist_path.exists():
        history = json.loads(hist_path.read_text())
    seen = {"n": 0}

    def on_step(state) -> None:
        progress(0.9 * state.progress, f"qbitopt: step {state.step}/{state.total_steps}, loss {state.loss:.4f}")

    class _Keep:  # writes the re-allocations as they happen, so a resumed run keeps the earlier ones
        def on_step(self, state) -> None:
            cb = next((c for c in state.trainer.callbacks if hasattr(c, "history") and hasattr(c, "every_k")), None)
            if cb is None or len(cb.history) == seen["n"]:
                return
            history.extend(cb.history[seen["n"]:])
            seen["n"] = len(cb.history)
            if hist_path is not None:
                hist_path.write_text(json.dumps(history))

    budget_list = [f"{b.metric}={b.limit!r}" for b in parse_budgets(list(budgets))]
    t0 = time.perf_counter()
    result, final = qbitopt_finetune(
        model, train, budget_list, recipe, weight_bits=tuple(weight_bits), activation_bits=tuple(activation_bits),
        constraints=constraints, every_k=s.every_k, solver=s.solver, ema=s.ema, freeze_at=s.freeze_at,
        min_gain=s.min_gain, eval_data=selection, callbacks=[on_step, _Keep()], checkpoint_dir=workdir,
        resume_from=resume,
    )
    final.metadata["qbitopt"]["history"] = history
    layers = discover_layers(model, train.x[:2])
    metrics = {k: float(v) for k, v in CostModel(layers, weight_granularity=recipe.weight_granularity)
               .cost(final).metrics().items() if v is not None}
    measured = {"top1": result.metrics.get("top1"), "loss": result.metrics.get("loss"), "split": "selection",
                "qat": True, "steps": result.steps}
    # predicted: QBitOpt's own estimate at its last re-solve (running Fisher), NaN when it never re-solved
    predicted = float(history[-1]["objective_after"]) if history else float("nan")
    point = ParetoPoint(allocation=final, predicted=predicted, metrics=metrics, kind="mixed",
                        label="qbitopt (QAT)", measured=measured)
    fr = ParetoFront(metric=parse_budgets(budget_list)[0].metric, points=[point], uniform=[], solver="qbitopt",
                     table_method="fisher (running, during QAT)", budgets=parse_budgets(budget_list),
                     seconds=time.perf_counter() - t0)
    rec = {"index": 0, "requested": True, "budgets": [b.to_dict() for b in parse_budgets(budget_list)]}
    if report is not None and getattr(report, "y", None) is not None:
        r = evaluate(result.model, report).to_dict()
        r.pop("logits", None)
        rec["report"] = r
    progress(1.0, "done")
    return {"front": fr, "recommendation": rec, "history": history, "resumed": resume is not None,
            "qat": result.to_dict()}


def bits_history(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-layer weight bits against steps, from a QBitOpt history (what the dashboard plots)."""
    out: dict[str, list[Any]] = {"steps": []}
    for rec in history:
        out["steps"].append(rec["step"])
        for layer, label in rec["allocation"].items():
            w = str(label).split("/")[0].lstrip("Ww").split("A")[0]
            try:
                bits: Any = int(w)
            except ValueError:
                bits = label
            out.setdefault(layer, []).append(bits)
    return out


# --- one entry for the search pipeline --------------------------------------------------------------------


def measured_front(name: str, settings: dict[str, Any], *, model: Any, model_ref: str | None, weights: str | None,
                   data_ref: str | None, problem: Any, metric: str, n_points: int, requested: Sequence[float],
                   quant_config: Any, budgets: Sequence[Any], weight_bits: Sequence[int],
                   activation_bits: Sequence[int], train: Any = None, calibration: Any = None,
                   selection: Any = None, report: Any = None, progress: ProgressFn | None = None,
                   context: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
    """The front of a measured solver, for the search pipeline: (ParetoFront, own recommendation or None,
    extras to keep with the result).

    bayes: the front of a bayes sweep (its study in `context["storage"]`, named `context["study"]`; in memory
    without), which the pipeline then measures and recommends from as any front; the recommendation is None.
    bomp-nas / qbitopt: points measured by their own training; the pipeline must not re-measure them (a
    bomp-nas point is another architecture), so they come with their recommendation (index 0-based into the
    front's points, "report": metrics on `report`). `context`: storage, study, workdir, submit_trial_jobs, stop.
    """
    from search.pareto import pareto_front

    ctx = dict(context or {})
    progress = progress or (lambda f, m: None)
    budget_texts = [f"{b.metric}={b.limit!r}" for b in budgets]
    if name == "bayes":
        from search.solvers.bayes import BayesFanout, BayesSolver

        opts = bayes_solver_options(settings, model, calibration, selection, train, quant_config,
                                    ctx.get("storage"), ctx.get("study"),
                                    progress=lambda f, m: progress(0.5 + 0.05 * f, m))
        fan = None
        st = _bayes_settings(dict(settings or {}))
        # Trials over the service's workers; fan-out samples by TPE, so another sampler runs in this process.
        if ctx.get("storage") and ctx.get("scorer_ref") is not None and st.sampler == "tpe":
            fan = BayesFanout(storage=ctx["storage"], scorer=ctx["scorer_ref"], workers=st.workers,
                              trial_timeout=st.trial_timeout, submit_trial_jobs=ctx.get("submit_trial_jobs"),
                              stop=ctx.get("stop"), on_cancel=ctx.get("on_cancel"), worker=ctx.get("worker"),
                              heartbeat_interval=int(ctx.get("trial_heartbeat") or 10),
                              grace_period=ctx.get("trial_grace"))
        solver = BayesSolver(**opts, fanout=fan)
        front = pareto_front(problem, metric, n_points, solver, extra_limits=list(requested))
        study = solver.study
        trials = study.get_trials(deepcopy=False) if study is not None else []
        n = len(trials)
        name_ = getattr(study, "study_name", None)
        extras: dict[str, Any] = {"study": name_, "trials": n, "trial_jobs": list(solver.trial_jobs)}
        summary = f"study {name_!r}, {n} trials"
        if fan is not None:
            states = [t.state.name for t in trials if not t.user_attrs.get("surplus")]
            workers = sorted({str(t.user_attrs.get("worker")) for t in trials if t.state.name == "COMPLETE"})
            summary += (f": {states.count('COMPLETE')} complete, {states.count('FAIL')} failed (re-runs: "
                        f"{sum(1 for t in trials if t.system_attrs.get('failed_trial') is not None)}), run by "
                        f"{len(workers)} runner(s) over {1 + len(solver.trial_jobs)} job(s)")
        extras["summary"] = summary
        return front, None, extras
    if name == "bomp-nas":
        if model_ref is None:
            raise BitsearchError("bomp-nas reshapes a zoo model family: give a zoo model (e.g. zoo:digits-cnn)")
        storage = ctx.get("storage")
        if storage is None:
            import tempfile

            storage = f"sqlite:///{Path(tempfile.mkdtemp(prefix='bitsearch-nas-')) / 'study.db'}"
        settings = dict(settings)
        # The request's bit options apply unless the settings name their own (one activation width per study).
        wb = [int(b) for b in weight_bits if 2 <= int(b) <= 8]
        if wb:
            settings.setdefault("weight_bits", wb)
        if len(list(activation_bits)) == 1:
            settings.setdefault("activation_bits", int(list(activation_bits)[0]))
        out = run_bomp_nas(model_ref, weights, data_ref, budget_texts, settings, storage,
                           ctx.get("study") or "bomp-nas", report=report,
                           submit_trial_jobs=ctx.get("submit_trial_jobs"),
                           progress=lambda f, m: progress(0.5 + 0.45 * f, m), stop=ctx.get("stop"),
                           worker=ctx.get("worker"), on_cancel=ctx.get("on_cancel"))
        extras = {k: out[k] for k in ("trials", "trial_jobs", "study", "seconds")}
        states = [t["state"] for t in out["trials"]]
        extras["summary"] = (f"study {out['study']!r}: {len(states)} trial rows, {states.count('COMPLETE')} complete, "
                             f"{states.count('FAIL')} failed (re-runs: "
                             f"{sum(1 for t in out['trials'] if t['retry_of'] is not None)}), "
                             f"{len(out['trial_jobs'])} trial job(s)")
        return out["front"], out["recommendation"], extras
    if name == "qbitopt":
        if train is None:
            raise BitsearchError("qbitopt needs training data")
        workdir = ctx.get("workdir")
        out = run_qbitopt(model, train, selection, report, budget_texts, settings, weight_bits, activation_bits,
                          workdir=Path(workdir) if workdir is not None else None,
                          progress=lambda f, m: progress(0.5 + 0.45 * f, m),
                          constraints=getattr(problem, "constraints", None))
        point = out["front"].points[0]
        point.allocation.metadata["qbitopt"]["bits_history"] = bits_history(out["history"])
        changes = sum(1 for h in out["history"] if h.get("changed"))
        return out["front"], out["recommendation"], {
            "history": out["history"], "resumed": out["resumed"],
            "summary": f"{len(out['history'])} re-solves, {changes} re-allocations"
                       + (", resumed from a checkpoint" if out["resumed"] else "")
                       + "; per-layer bits in the point's allocation metadata (qbitopt.bits_history)"}
    raise BitsearchError(f"{name!r} is not a measured solver; those are {list(MEASURED_SOLVERS)}")


__all__ = [
    "MEASURED_SOLVERS",
    "measured_front",
    "bayes_scorer",
    "bayes_solver_options",
    "bits_history",
    "check_servable",
    "run_bomp_nas",
    "run_qbitopt",
]
