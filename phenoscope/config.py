"""The one config mechanism: plain dataclasses, optionally filled from a TOML or JSON file.

Every configurable component defines a ``@dataclass`` of its options with defaults.
``load_config(Cls, path, overrides)`` builds one from a file and keyword overrides and
rejects unknown keys with a clear message.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {where}; known options: {sorted(known)}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly nested) dict; nested dataclass fields recurse."""
    _check_keys(cls, data, where)
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        ftype = fields[key].type
        sub = _dataclass_type(cls, ftype)
        kwargs[key] = from_dict(sub, value, f"{where}.{key}") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(owner: type, annotation: Any) -> type | None:
    if isinstance(annotation, str):  # postponed annotations
        import sys

        annotation = getattr(sys.modules[owner.__module__], annotation, None)
    return annotation if dataclasses.is_dataclass(annotation) else None


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Load ``cls`` from a ``.toml`` or ``.json`` file (optional), then apply ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file must be .toml or .json, got {path.name}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, where=str(path) if path else "config")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → plain dict (JSON-serialisable for simple field types)."""
    return dataclasses.asdict(cfg)
