"""`bomp-nas`: Bayesian multi-objective search over a network's *shape and* its per-layer bits, with
quantization-aware fine-tuning inside the loop (BOMP-NAS, van Son et al., 2023).

The table-driven solvers and `bayes` allocate bits on a fixed architecture. BOMP-NAS searches both: each trial
samples an architecture of a zoo family (`zoo.families`: per-stage width multipliers and depths) and a weight
bit-width per layer of that architecture, then

1. builds the model and initialises it: `init="inherit"` (default) copies the pretrained base model's weights
   into every tensor the shape lets inherit (leading channel slices, first blocks; `zoo.families.inherit_weights`,
   the share of inherited elements is recorded per trial), `init="scratch"` starts from random weights;
2. trains it briefly in float (`train_steps` of Adam on the training data);
3. fine-tunes it quantization-aware at the sampled allocation (`quant.qat.finetune`, the `qaft` recipe), the
   paper's central finding being that QAFT must sit inside the search loop;
4. measures top-1 on the *selection* data (held out from training; never the report data).

Two objectives, as Optuna directions: (selection top-1 ↑, cost ↓), the cost being `cost_metric` of the
allocation on that architecture (`quant.cost`: weight memory, BOPs, average weight bits). Budgets are Optuna
constraints; a trial over budget is costed without training (its cost is known from its shape and bits) and
recorded with the worst score, so the sampler learns the feasible region for free.

The study lives in a database and its trials fan out over workers (`search.trials`): any process that calls
`run_trials(url, study_name)` runs trials of it. `bompnas_search` creates the study and runs it in this process
with `workers` local processes; `front` reads the measured Pareto front back, each point with its architecture.

Data. `data` is a zoo data reference or an `.npz` file of training data; the selection split is `selection_data`
when given, else a seeded `selection_fraction` of `data`. For `zoo:digits` the selection split is the zoo's
calibration split (seed 0), which the zoo's pretrained digits models never trained on, so inheriting their
weights does not leak selection data. For a pretrained model trained on all of `data` (the CIFAR ResNets), give
`selection_data` from elsewhere (e.g. half of the test file, keeping the other half for the report).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from quant.errors import BitsearchError

from ..problem import AllocationProblem, canonical_metric, parse_budgets
from ..trials import Fanout, TrialContext, create_study, load_fanout_study, register_objective, run_trials
from .base import Capabilities, RawResult, Solver, register_solver

OBJECTIVE_KIND = "bomp-nas"
INITS = ("inherit", "scratch")
COST_METRICS = ("weight_memory", "bops", "avg_weight_bits")


@dataclass
class BompNasSettings:
    """The solver settings of a BOMP-NAS search (what `POST /search` takes as `solver.settings`); the model,
    data and budgets come from the search itself. Validated on construction."""

    space: dict[str, list[Any]] | None = None  # narrowing of the family's shape space
    weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    activation_bits: int = 8  # input-activation bits of every layer (32: float activations)
    cost_metric: str = "weight_memory"
    init: str = "inherit"
    train_steps: int = 200  # float training steps per trial (0: none, e.g. with init="inherit")
    train_lr: float = 3e-3
    batch_size: int = 64
    qaft_steps: int = 100
    qaft_lr: float = 0.01
    seed: int = 0
    total_trials: int = 20  # trials of the study, all workers together
    trial_timeout: float | None = None  # seconds per trial (None: no limit)
    workers: int = 2  # trial jobs the search fans out to (the search's own job is one of them)

    def __post_init__(self) -> None:
        if self.space is not None and not isinstance(self.space, dict):
            raise BitsearchError("space must map shape parameters to lists of allowed values")
        bits = list(self.weight_bits) if isinstance(self.weight_bits, (list, tuple)) else [self.weight_bits]
        if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in bits):
            raise BitsearchError(f"weight_bits must be a non-empty list of integers in [2, 8], got {self.weight_bits!r}")
        self.weight_bits = sorted(set(bits))
        if self.activation_bits not in (2, 3, 4, 5, 6, 7, 8, 16, 32):
            raise BitsearchError(f"activation_bits must be 2..8, 16 or 32, got {self.activation_bits!r}")
        self.cost_metric = canonical_metric(self.cost_metric)
        if self.cost_metric not in COST_METRICS:
            raise BitsearchError(f"cost_metric must be one of {list(COST_METRICS)}, got {self.cost_metric!r}")
        if self.init not in INITS:
            raise BitsearchError(f"init must be one of {list(INITS)}, got {self.init!r}")
        for name, low in (("train_steps", 0), ("qaft_steps", 1), ("batch_size", 1), ("seed", 0),
                          ("total_trials", 1), ("workers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise BitsearchError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("train_lr", "qaft_lr") + (("trial_timeout",) if self.trial_timeout is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise BitsearchError(f"{name} must be a positive number, got {v!r}")


    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BompNasSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise BitsearchError(f"unknown bomp-nas setting(s) {unknown}; known: {sorted(known)}")
        return cls(**(d or {}))


#: Settings that steer the fan-out, not what a trial computes (left out of the study's objective config).
FANOUT_SETTINGS = ("total_trials", "trial_timeout", "workers")


@dataclass
class BompNasConfig(BompNasSettings):
    """Everything that decides a BOMP-NAS study's trials: the settings plus the family, data and budgets."""

    family: str = "zoo:digits-cnn"  # a zoo model with a registered family (zoo.families)
    data: str = "zoo:digits"  # training data: a zoo data reference or an .npz path
    selection_data: str | None = None  # held-out data that scores trials (default: a split of `data`)
    selection_fraction: float = 0.2  # share of `data` held out for selection when `selection_data` is None
    data_seed: int = 0
    weights: str | None = None  # pretrained weights of the base model (a file), for models that need one
    budgets: list[str] = field(default_factory=list)  # e.g. ["weight_memory=2KB"]

    def __post_init__(self) -> None:
        super().__post_init__()
        from zoo.families import get_family

        fam = get_family(self.family)
        fam.restrict(self.space)
        if self.selection_data is None and not 0.0 < float(self.selection_fraction) < 1.0:
            raise BitsearchError(f"selection_fraction must be in (0, 1), got {self.selection_fraction!r}")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int) or self.data_seed < 0:
            raise BitsearchError(f"data_seed must be an integer >= 0, got {self.data_seed!r}")
        budgets = parse_budgets(self.budgets)
        for b in budgets:
            if b.metric not in COST_METRICS:
                raise BitsearchError(f"bomp-nas budgets can be on {list(COST_METRICS)}, not {b.metric}")
        self.budgets = [str(b) for b in self.budgets] if isinstance(self.budgets, list) else [str(self.budgets)]
        spec = _base_spec(self.family)
        if self.init == "inherit" and spec.needs_weights and self.weights is None:
            raise BitsearchError(
                f"{spec.ref} has no pretrained weights of its own: give `weights` (a checkpoint) or init='scratch'"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def objective_config(self) -> dict[str, Any]:
        """What the study stores for its workers: everything but the fan-out settings."""
        return {k: v for k, v in asdict(self).items() if k not in FANOUT_SETTINGS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BompNasConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BitsearchError(f"unknown bomp-nas setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def parsed_budgets(self):
        return parse_budgets(self.budgets)


def _base_spec(family: str):
    from zoo.models import get_model_spec

    return get_model_spec(family)


# --- data and the pretrained base, loaded once per worker process ----------------------------------------


@functools.lru_cache(maxsize=4)
def _datasets(data: str, selection_data: str | None, selection_fraction: float, seed: int,
              normalisation: Any = None):
    """(train, selection) of a config: labelled ArrayDatasets, disjoint. Image files are normalised as the
    family's base model expects (`normalisation`), or inherited weights would see inputs they never saw."""
    from zoo.data import DataSplits, load_data, split

    loaded = load_data(data, normalisation, seed=seed)
    if isinstance(loaded, DataSplits):
        train = loaded.train
        selection = loaded.calibration  # zoo data: never trained on by the zoo's models (see docstring)
        if train is None or selection is None:
            raise BitsearchError(f"{data} has no train and calibration splits to train and select on")
    else:
        if selection_data is None:
            parts = split(loaded, calibration=0, test=float(selection_fraction), seed=seed)
            train, selection = parts.train, parts.test
        else:
            train, selection = loaded, None
    if selection_data is not None:
        sel = load_data(selection_data, normalisation, seed=seed)
        selection = sel.test if isinstance(sel, DataSplits) else sel
    if train is None or selection is None or train.y is None or selection.y is None:
        raise BitsearchError("bomp-nas needs labelled training and selection data")
    return train, selection


def _hashable(normalisation: Any) -> Any:
    return None if normalisation is None else tuple(tuple(float(v) for v in part) for part in normalisation)


@functools.lru_cache(maxsize=2)
def _pretrained_state(family: str, weights: str | None):
    from zoo.models import load_model

    return {k: v.detach().clone() for k, v in load_model(family, weights).model.state_dict().items()}


# --- one trial -------------------------------------------------------------------------------------------


def _train_float(model, train, cfg: BompNasConfig, ctx: TrialContext | None) -> None:
    import torch
    import torch.nn.functional as F

    if cfg.train_steps == 0:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train_lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train_lr, total_steps=cfg.train_steps)
        model.train()
        step, epoch = 0, 0
        while step < cfg.train_steps:
            for xb, yb in train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
                if ctx is not None:
                    ctx.check()
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step >= cfg.train_steps:
                    break
            epoch += 1
        model.eval()


class _Deadline:
    """QAT callback: stop the trial when it runs past its time."""

    def __init__(self, ctx: TrialContext | None):
        self.ctx = ctx

    def on_step(self, state: Any) -> None:
        if self.ctx is not None:
            self.ctx.check()


@dataclass
class TrialOutcome:
    """One architecture + allocation, trained, fine-tuned and measured (or only costed, when over budget)."""

    arch: dict[str, Any]
    allocation: Any  # quant.allocation.Allocation
    metrics: dict[str, float]  # cost metrics (internal units: bits, BOPs)
    measured: bool
    score: float | None = None  # top-1 on the selection data after QAFT
    float_score: float | None = None  # top-1 on the selection data after float training, before QAFT
    inherited: dict[str, Any] | None = None
    seconds: float = 0.0
    model: Any = None  # the fine-tuned fake-quant model (not stored in the study)


def cost_of(model: Any, example: Any, allocation: Any) -> dict[str, float]:
    from quant.cost import CostModel
    from quant.layers import discover_layers

    report = CostModel(discover_layers(model, example)).cost(allocation)
    return {k: float(v) for k, v in report.metrics().items() if v is not None}


def train_candidate(cfg: BompNasConfig, arch: dict[str, Any], wbits: dict[str, int] | None,
                    ctx: TrialContext | None = None, budgets_only: bool = False,
                    suggest: Any = None) -> TrialOutcome:
    """Build, initialise, train and fine-tune one candidate; `suggest(layer_names) -> {layer: bits}` picks the
    bits when `wbits` is None (the trial's sampler). Over-budget candidates come back unmeasured."""
    import torch

    from quant.allocation import Allocation, LayerBits
    from quant.layers import discover_layers
    from quant.qat import QATRecipe, finetune
    from zoo.evaluate import evaluate
    from zoo.families import get_family, inherit_weights

    t0 = time.perf_counter()
    spec = _base_spec(cfg.family)
    fam = get_family(cfg.family)
    model = fam.build(arch, spec.num_classes, seed=cfg.seed)
    example = torch.randn((2, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    names = [layer.name for layer in discover_layers(model, example)]
    if wbits is None:
        wbits = suggest(names)
    missing = [n for n in names if n not in wbits]
    if missing:
        raise BitsearchError(f"no weight bits given for layer(s) {missing}")
    alloc = Allocation({n: LayerBits(int(wbits[n]), cfg.activation_bits) for n in names},
                       model=spec.ref, metadata={"arch": dict(arch)})
    metrics = cost_of(model, example, alloc)
    out = TrialOutcome(dict(arch), alloc, metrics, measured=False)
    if budgets_only or not all(b.holds(metrics[b.metric]) for b in cfg.parsed_budgets()):
        out.seconds = time.perf_counter() - t0
        return out
    train, selection = _datasets(cfg.data, cfg.selection_data, cfg.selection_fraction, cfg.data_seed,
                                 _hashable(spec.normalisation))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # tiny models: one intra-op thread is faster and leaves cores to other workers
        if cfg.init == "inherit":
            out.inherited = inherit_weights(model, _pretrained_state(cfg.family, cfg.weights)).to_dict()
        _train_float(model, train, cfg, ctx)
        model.eval()
        out.float_score = float(evaluate(model, selection).top1)
        recipe = QATRecipe(steps=cfg.qaft_steps, lr=cfg.qaft_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           device="cpu", calibration_samples=min(256, len(train)))
        res = finetune(model, alloc, train, recipe, callbacks=[_Deadline(ctx)], eval_data=selection)
    finally:
        torch.set_num_threads(threads)
    out.score = float(res.metrics["top1"])
    out.measured = True
    out.model = res.model
    out.seconds = time.perf_counter() - t0
    return out


@register_objective(OBJECTIVE_KIND)
def _objective_factory(config: dict[str, Any]):
    cfg = BompNasConfig.from_dict(config)
    from zoo.families import get_family

    space = get_family(cfg.family).restrict(cfg.space)
    budgets = cfg.parsed_budgets()

    def objective(trial: Any, ctx: TrialContext) -> list[float]:
        arch = {k: trial.suggest_categorical(f"arch.{k}", list(v)) for k, v in space.items()}
        out = train_candidate(
            cfg, arch, None, ctx,
            suggest=lambda names: {n: trial.suggest_categorical(f"wbits.{n}", cfg.weight_bits) for n in names},
        )
        for b in budgets:
            trial.set_constraint(b.metric, out.metrics[b.metric] / b.limit - 1.0)
        trial.set_user_attr("arch", out.arch)
        trial.set_user_attr("allocation", out.allocation.to_dict())
        trial.set_user_attr("metrics", out.metrics)
        trial.set_user_attr("measured", out.measured)
        trial.set_user_attr("seconds", out.seconds)
        if out.inherited is not None:
            trial.set_user_attr("inherited", out.inherited)
        if out.float_score is not None:
            trial.set_user_attr("float_top1", out.float_score)
        score = out.score if out.measured else 0.0  # over budget: the worst top-1, and a violated constraint
        return [float(score), out.metrics[cfg.cost_metric]]

    return objective


# --- the search ------------------------------------------------------------------------------------------


@dataclass
class FrontPoint:
    """A measured Pareto-optimal trial: its architecture, allocation, selection score and cost."""

    trial: int
    arch: dict[str, Any]
    allocation: dict[str, Any]
    score: float
    metrics: dict[str, float]
    float_score: float | None = None
    inherited: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create(storage: str, study_name: str, config: BompNasConfig, total_trials: int | None = None,
           trial_timeout: float | None = None, heartbeat_interval: int = 10, max_retry: int = 1) -> str:
    """Create the study of a BOMP-NAS search in `storage` (an SQLAlchemy URL); workers then `run_trials` it.
    `total_trials` / `trial_timeout` default to the config's."""
    fan = Fanout(total_trials or config.total_trials,
                 trial_timeout=trial_timeout if trial_timeout is not None else config.trial_timeout,
                 heartbeat_interval=heartbeat_interval, max_retry=max_retry)
    return create_study(storage, study_name, ["maximize", "minimize"], OBJECTIVE_KIND, config.objective_config(),
                        fan)


def _worker_main(storage: str, study_name: str, worker: str) -> int:
    return run_trials(storage, study_name, worker=worker).ran


def bompnas_search(config: BompNasConfig, storage: str, study_name: str, total_trials: int | None = None,
                   workers: int = 1, trial_timeout: float | None = None) -> list[FrontPoint]:
    """Create the study, run it with `workers` local processes (1: in this process), return its front."""
    create(storage, study_name, config, total_trials, trial_timeout)
    if workers <= 1:
        run_trials(storage, study_name, worker="w0")
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.starmap(_worker_main, [(storage, study_name, f"w{i}") for i in range(workers)])
    return front(storage, study_name)


def front(storage: str, study_name: str) -> list[FrontPoint]:
    """The measured, feasible trials not dominated in (selection top-1 ↑, cost ↓), cheapest first."""
    study, _ = load_fanout_study(storage, study_name)
    cfg = BompNasConfig.from_dict(study.user_attrs["bitsearch.objective"]["config"])
    points = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or not t.user_attrs.get("measured"):
            continue
        cons = t.constraints or {}
        if any(c > 0 for c in (cons.values() if isinstance(cons, dict) else cons)):
            continue
        points.append(FrontPoint(t.number, t.user_attrs["arch"], t.user_attrs["allocation"], float(t.values[0]),
                                 t.user_attrs["metrics"], t.user_attrs.get("float_top1"),
                                 t.user_attrs.get("inherited")))
    points.sort(key=lambda p: (p.metrics[cfg.cost_metric], -p.score, p.trial))
    out, best = [], -math.inf
    for p in points:
        if p.score > best:
            out.append(p)
            best = p.score
    return out


@register_solver
class BompNasSolver(Solver):
    """Registry entry of BOMP-NAS. It searches the architecture too, so a fixed-architecture
    `AllocationProblem` is not what it solves: run `bompnas_search(BompNasConfig(...), storage, ...)`."""

    name = "bomp-nas"
    exact = False
    supports_objective = False
    Config: ClassVar[type] = BompNasSettings
    #: It trains every trial on labelled training data (a search request runs it through `search.measured`).
    capabilities = Capabilities(needs_train=True, needs_labels=True)
    #: It reshapes the model: only zoo models of a registered family (zoo.families) qualify.
    searches_architecture: ClassVar[bool] = True

    def __init__(self, **settings: Any):
        self.settings = BompNasSettings(**settings)

    def _solve(self, problem: AllocationProblem) -> RawResult:
        raise BitsearchError(
            "bomp-nas searches the architecture as well as the bits, so it does not solve a fixed-architecture "
            "allocation problem: run search.solvers.bompnas.bompnas_search(BompNasConfig(...), storage, name, "
            "total_trials) (or POST /search with solver 'bomp-nas')"
        )


__all__ = [
    "BompNasConfig",
    "BompNasSettings",
    "BompNasSolver",
    "FrontPoint",
    "TrialOutcome",
    "bompnas_search",
    "cost_of",
    "create",
    "front",
    "train_candidate",
]
