"""Data by role: train (QAT), calibration, selection, report.

`resolve_data` turns a spec's `data` and `roles` (and, from Python, data objects) into a `ResolvedData`
with one `ArrayDataset` per role. A role is a zoo data set, an `.npz` file (or, through the service, an
uploaded one), a Python object, or `size` items split off another role's set; a split is taken out of the
set it comes from, so the roles are disjoint by construction. Every role's source, size and seed is kept in
`ResolvedData.record` (the search result stores it).

Default roles from `data` (or the model's own zoo data set): train from its train split; calibration from
its calibration split, else split off its evaluation part; selection and report as two disjoint random
halves of what is left of the evaluation part (the selection half picks the recommendation, the report half
measures it without that choice's bias).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from quant.errors import BitsearchError
from zoo.data import ArrayDataset, DataSplits, Normalisation, as_dataset, load_data

from .spec import ROLES, DataRoles, RoleData

#: Which part of a zoo data set (train/calibration/test splits) each role takes when given that set.
_ZOO_PART = {
    "train": ("train",),
    "calibration": ("calibration", "train"),
    "selection": ("test",),
    "report": ("test",),
}


@dataclass
class ResolvedData:
    """One data set per role (None: not available); `record`: where each came from, its size and seed."""

    train: ArrayDataset | None = None
    calibration: ArrayDataset | None = None
    selection: ArrayDataset | None = None
    report: ArrayDataset | None = None
    data_free: bool = False
    record: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, role: str) -> ArrayDataset | None:
        return getattr(self, role)

    @property
    def evaluation(self) -> ArrayDataset | None:
        """What the front is measured on: the selection set (the report set stays untouched by choices)."""
        return self.selection


def split_off(ds: ArrayDataset, n: int, seed: int, what: str) -> tuple[ArrayDataset, ArrayDataset]:
    """(`n` random items of `ds`, the rest): disjoint, each in the original order."""
    if n >= len(ds):
        raise BitsearchError(
            f"cannot split {n} items for the {what} role off {ds.name} ({len(ds)} items): something must remain"
        )
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    taken, rest = torch.sort(order[:n]).values, torch.sort(order[n:]).values
    return ds.subset(taken), ds.subset(rest)


def _load(source: Any, role: str, normalisation: Normalisation | None, seed: int) -> ArrayDataset:
    if isinstance(source, DataSplits):
        loaded: Any = source
    elif isinstance(source, str):
        loaded = load_data(source, normalisation, seed=seed)
    else:
        return as_dataset(source, role, normalisation)
    if isinstance(loaded, DataSplits):
        for part in _ZOO_PART[role]:
            if getattr(loaded, part) is not None:
                return getattr(loaded, part)
        raise BitsearchError(f"{source} has no part for the {role} role")
    return loaded


def _name(source: Any) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, (tuple, list)):
        return "arrays"
    return getattr(source, "name", type(source).__name__)


def resolve_data(
    data: Any,
    roles: DataRoles | Mapping[str, Any] | None = None,
    *,
    normalisation: Normalisation | None = None,
    model_dataset: str | None = None,
    calib_size: int = 256,
    eval_limit: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    select: bool = True,
) -> ResolvedData:
    """The data of every role; see the module docstring.

    `data`: a reference ("zoo:NAME", an .npz path, "none" for data-free calibration, None for the model's
    own `model_dataset`), a `DataSplits`, or any `as_dataset` input. `roles`: a `DataRoles` (references) or a
    mapping role -> `RoleData` / reference / data object. `num_classes`: labels must be below it.
    `select=False` (nothing is chosen, e.g. uniform PTQ): what is left of the evaluation part all reports.
    """
    if isinstance(data, ResolvedData):
        return data
    out = ResolvedData()
    role_specs: dict[str, Any] = {}
    if isinstance(roles, DataRoles):
        role_specs = {r: getattr(roles, r) for r in ROLES if getattr(roles, r) is not None}
    elif roles:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise BitsearchError(f"unknown data role(s) {sorted(unknown)}; roles: {list(ROLES)}")
        role_specs = {r: v for r, v in roles.items() if v is not None}

    # the pool: the default data set and its parts
    parts: dict[str, ArrayDataset | None] = {"train": None, "calibration": None, "eval": None}
    pool_name = None
    if isinstance(data, str) and data == "none":
        out.data_free = True
        data = None
    if data is None and model_dataset is not None:
        data = model_dataset
    if data is not None:
        pool_name = _name(data)
        loaded = load_data(data, normalisation, seed=seed) if isinstance(data, str) else data
        if isinstance(loaded, DataSplits):
            parts = {"train": loaded.train, "calibration": loaded.calibration, "eval": loaded.test}
        else:
            parts["eval"] = as_dataset(loaded, pool_name, normalisation)
    if parts["eval"] is not None and eval_limit is not None:
        parts["eval"] = parts["eval"].take(eval_limit, seed=seed)

    sets: dict[str, ArrayDataset | None] = {}

    def record(role: str, ds: ArrayDataset | None, **how: Any) -> None:
        sets[role] = ds
        if ds is not None:
            out.record[role] = {**how, "size": len(ds), "seed": seed}

    # 1. roles with a source of their own
    for role, spec in role_specs.items():
        if isinstance(spec, RoleData):
            if spec.source is None:
                continue
            src: Any = spec.source
        else:
            src = spec
        ds = _load(src, role, normalisation, seed)
        if isinstance(spec, RoleData) and spec.size is not None:
            ds = ds.take(spec.size, seed=seed)
        record(role, ds, source=_name(src))

    # 2. the defaults that come straight from the pool's parts
    if "train" not in role_specs and parts["train"] is not None:
        record("train", parts["train"], source=pool_name, part="train")
    if "calibration" not in role_specs and not out.data_free and parts["calibration"] is not None:
        record("calibration", parts["calibration"].take(calib_size, seed=seed), source=pool_name,
               part="calibration")

    # 3. splits, in dependency order (a split is taken out of its origin, which keeps the rest)
    pending = {r: s for r, s in role_specs.items() if isinstance(s, RoleData) and s.split_of is not None}
    if "calibration" not in role_specs and not out.data_free and "calibration" not in sets:
        if parts["eval"] is not None:
            pending["calibration"] = RoleData(split_of="data", size=min(calib_size, len(parts["eval"]) // 2 or 1))
            out.notes.append(
                "calibrating on items split off the evaluation data, held out from every score "
                "(give a calibration role to calibrate on other data)"
            )
    while pending:
        ready = [r for r, s in pending.items() if s.split_of == "data" or s.split_of not in pending]
        if not ready:
            raise BitsearchError(f"data roles split from each other in a cycle: {sorted(pending)}")
        for role in ready:
            s = pending.pop(role)
            origin_ds = parts["eval"] if s.split_of == "data" else sets.get(s.split_of)
            if origin_ds is None:
                raise BitsearchError(f"the {role} role splits {s.split_of!r}, which has no data")
            taken, rest = split_off(origin_ds, s.size, seed, role)
            if s.split_of == "data":
                parts["eval"] = rest
            else:
                record(s.split_of, rest, **{**out.record[s.split_of], "remaining_after": role})
            record(role, taken, split_of=s.split_of, source=pool_name if s.split_of == "data" else None)

    # 4. selection and report share what is left of the evaluation part
    missing = [r for r in ("selection", "report") if r not in sets]
    ev = parts["eval"]
    if missing and ev is not None:
        if len(missing) == 2 and not select:
            record("report", ev, source=pool_name, part="evaluation")
        elif len(missing) == 2:
            if len(ev) < 2:
                raise BitsearchError(f"{ev.name} has {len(ev)} item(s): too few for selection and report halves")
            sel, rep = split_off(ev, len(ev) // 2, seed + 1, "selection")
            record("selection", sel, split_of="data", source=pool_name)
            record("report", rep, split_of="data", source=pool_name)
        else:
            record(missing[0], ev, source=pool_name, part="evaluation")

    for role in ROLES:
        ds = sets.get(role)
        if ds is not None and num_classes is not None and ds.y is not None and len(ds.y):
            top = int(ds.y.max())
            if top >= num_classes:
                raise BitsearchError(
                    f"the {role} data has a label of {top}, but the model has {num_classes} classes (0..{num_classes - 1})"
                )
        setattr(out, role, ds)
    return out


def resolve_training_data(
    data: Any,
    roles: DataRoles | Mapping[str, Any] | None = None,
    *,
    normalisation: Normalisation | None = None,
    model_dataset: str | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    report_size: int = 1000,
) -> ResolvedData:
    """Data for fine-tuning: `train` (labelled), `report` (held out, scores the result) and `calibration`.

    `data` is the training data: a zoo set (its train split; its test split reports), an .npz file or a data
    object (all of it trains, less a held-out report split of at most `report_size` items, recorded). Roles
    given explicitly take precedence. Without any data, the model's own zoo data set is used.
    """
    role_specs: dict[str, Any] = {}
    if isinstance(roles, DataRoles):
        role_specs = {r: getattr(roles, r) for r in ROLES if getattr(roles, r) is not None}
    elif roles:
        role_specs = {r: v for r, v in roles.items() if v is not None}
    out = ResolvedData()
    if isinstance(data, str) and data == "none":
        raise BitsearchError("fine-tuning needs labelled training data; data 'none' (data-free) cannot train")
    if data is None and "train" not in role_specs:
        data = model_dataset
    parts: dict[str, ArrayDataset | None] = {"train": None, "calibration": None, "test": None}
    pool_name = _name(data) if data is not None else None
    if data is not None:
        loaded = load_data(data, normalisation, seed=seed) if isinstance(data, str) else data
        if isinstance(loaded, DataSplits):
            parts = {"train": loaded.train, "calibration": loaded.calibration, "test": loaded.test}
        else:
            parts["train"] = as_dataset(loaded, pool_name, normalisation)

    def given(role: str) -> ArrayDataset | None:
        spec = role_specs.get(role)
        if spec is None:
            return None
        if isinstance(spec, RoleData):
            if spec.source is None:
                raise BitsearchError(f"fine-tuning takes the {role} role from a source, not a split")
            ds = _load(spec.source, role, normalisation, seed)
            ds = ds.take(spec.size, seed=seed) if spec.size else ds
            out.record[role] = {"source": spec.source, "size": len(ds), "seed": seed}
            return ds
        ds = _load(spec, role, normalisation, seed)
        out.record[role] = {"source": _name(spec), "size": len(ds), "seed": seed}
        return ds

    train = given("train")
    if train is None:
        train = parts["train"]
        if train is None:
            raise BitsearchError("fine-tuning needs labelled training data: give data (zoo:NAME or an .npz file)")
        out.record["train"] = {"source": pool_name, "size": len(train), "seed": seed}
    report = given("report")
    if report is None and parts["test"] is not None:
        report = parts["test"]
        out.record["report"] = {"source": pool_name, "part": "test", "size": len(report), "seed": seed}
    if report is None:
        n = min(report_size, len(train) // 10)
        if n >= 1:
            report, train = split_off(train, n, seed, "report")
            out.record["report"] = {"source": pool_name, "split_of": "train", "size": n, "seed": seed}
            out.record["train"]["size"] = len(train)
            out.notes.append(f"scoring on {n} items held out of the training data (give a report role to "
                             "score on other data)")
    if report is not None and eval_limit is not None:
        report = report.take(eval_limit, seed=seed)
        out.record["report"]["size"] = len(report)
    calibration = given("calibration") or parts["calibration"]
    if train.y is None:
        raise BitsearchError(f"the training data {train.name} has no labels; fine-tuning needs labels (y)")
    out.train, out.report, out.calibration = train, report, calibration
    for role in ("train", "report", "calibration"):
        ds = getattr(out, role)
        if ds is not None and num_classes is not None and ds.y is not None and len(ds.y):
            if int(ds.y.max()) >= num_classes:
                raise BitsearchError(f"the {role} data has a label of {int(ds.y.max())}, but the model has "
                                     f"{num_classes} classes (0..{num_classes - 1})")
    return out
