"""One registry for every kind of plug-in (solvers, sensitivity methods, quantizers).

A plug-in is one class with a `name`, registered with `Registry.register` (a class decorator). The registry

- refuses a second plug-in under a name already taken (a silent overwrite hid bugs);
- validates settings against the plug-in's config dataclass: the class's own `Config` when it has one,
  else one derived from its `__init__` keyword arguments. Unknown keys are an error that lists the known
  ones; a `Config.__post_init__` checks values;
- carries capability flags (`Capabilities`) that callers such as `POST /search` check before queueing.

It is a read-only mapping name -> class, so `name in REG`, `REG[name]` and `sorted(REG)` work as with the
plain dicts it replaces.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Generic, Iterator, Mapping, TypeVar

from .errors import BitsearchError

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Capabilities:
    """What a plug-in needs from the run that uses it."""

    needs_labels: bool = False  # labelled data (else it falls back to the model's own predictions)
    needs_train: bool = False  # a training set (it trains)
    needs_scorer: bool = False  # a measured scorer / model object the search pipeline does not pass it
    runs_in_worker: bool = True  # can run inside a service worker
    needs_gpu: bool = False

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


def _derived_config(cls: type) -> type:
    """A dataclass with the keyword arguments of `cls.__init__` (the settings it takes)."""
    fields = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        fields.append((p.name, Any, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


class Registry(Mapping[str, T], Generic[T]):
    """Named plug-ins of one kind (`kind` names them in messages: "solver", "sensitivity method")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    # --- mapping ---
    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"

    # --- registration ---
    def register(self, cls: T) -> T:
        """Class decorator: make `cls` available under `cls.name`; a taken name is refused."""
        name = getattr(cls, "name", None)
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        old = self._items.get(name)
        if old is not None and old is not cls and _qualname(old) != _qualname(cls):
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({_qualname(old)}); "
                f"{_qualname(cls)} needs another name"
            )
        self._items[name] = cls  # the same class again (a module reloaded) replaces itself
        return cls

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    # --- lookup and validation ---
    def get_class(self, name: str) -> T:
        try:
            return self._items[str(name)]
        except KeyError:
            raise BitsearchError(f"unknown {self.kind} {name!r}; known: {sorted(self._items)}") from None

    def config_class(self, name: str) -> type:
        cls = self.get_class(name)
        own = getattr(cls, "Config", None)
        if own is not None and dataclasses.is_dataclass(own):
            return own
        cached = cls.__dict__.get("_derived_config")
        if cached is None:
            cached = _derived_config(cls)
            cls._derived_config = cached
        return cached

    def capabilities(self, name: str) -> Capabilities:
        return getattr(self.get_class(name), "capabilities", None) or Capabilities()

    def check(self, name: str, settings: Mapping[str, Any] | None = None) -> Any:
        """The validated config object of `name`'s `settings`; a `BitsearchError` saying what is wrong."""
        config = self.config_class(name)
        settings = dict(settings or {})
        known = [f.name for f in dataclasses.fields(config)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise BitsearchError(
                f"unknown setting(s) {unknown} for the {name} {self.kind}; it takes {known or 'none'}"
            )
        try:
            out = config(**settings)
            if getattr(self.get_class(name), "Config", None) is None:
                self.get_class(name)(**settings)  # no config of its own: its constructor checks the values
            return out
        except BitsearchError as exc:
            raise BitsearchError(f"{self.kind} {name}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise BitsearchError(f"{self.kind} {name}: {exc}") from None

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every plug-in with its settings (defaults) and capabilities, e.g. for a help page."""
        out = {}
        for name in sorted(self._items):
            config = self.config_class(name)
            out[name] = {
                "settings": {
                    f.name: (None if f.default is dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(config)
                },
                "capabilities": self.capabilities(name).to_dict(),
            }
        return out


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_positive(value: Any, what: str, *, allow_none: bool = False, integer: bool = False) -> None:
    """A `Config.__post_init__` helper: `value` must be a positive number (an integer when `integer`)."""
    if value is None and allow_none:
        return
    kinds: tuple = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise BitsearchError(f"{what} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def check_choice(value: Any, choices: Any, what: str) -> None:
    if value not in choices:
        raise BitsearchError(f"{what} must be one of {list(choices)}, got {value!r}")


__all__ = ["Capabilities", "Registry", "check_choice", "check_positive"]

