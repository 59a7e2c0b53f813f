"""`JsonFile`: the one implementation of to_json / save / from_json / load for bitsearch's file formats
(allocations, sensitivity tables, Pareto fronts, search results). A format defines `to_dict`, `from_dict`
and `json_what` (its name in messages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .errors import BitsearchError


class JsonFile:
    json_what: ClassVar[str] = "file"

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every format defines it
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Any) -> Any:  # pragma: no cover - every format defines it
        raise NotImplementedError

    @classmethod
    def check_header(cls, d: Any, schema: str, version: int) -> None:
        """Refuse `d` unless it is an object with this format's `schema` name and a `version` it reads."""
        if not isinstance(d, Mapping) or d.get("schema") != schema:
            raise BitsearchError(f"not a {cls.json_what} (schema must be {schema!r})")
        if d.get("version") != version:
            raise BitsearchError(f"{cls.json_what} version {d.get('version')!r} is not supported")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BitsearchError(f"the {cls.json_what} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path):
        p = Path(path)
        if not p.is_file():
            raise BitsearchError(f"{cls.json_what} file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BitsearchError(f"the {cls.json_what} file {p} is not UTF-8 JSON text") from None
        except OSError as exc:
            raise BitsearchError(f"cannot read the {cls.json_what} file {p}: {exc.strerror or exc}") from None
        return cls.from_json(text)
